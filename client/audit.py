"""The audit log of what leaves a site, and the guard every reply passes before it is sent.

Each reply a site sends to the server is appended as one JSON line to
``state_dir/audit.jsonl``. The line records the UTC time, the run, stage, round and
message type, and the metric names and values. For each tensor it records the name,
shape, dtype, size in bytes and SHA-256, plus one SHA-256 over all tensors. Hospital IT
can then show what left the site without trusting the server, and `summarize_audit`
totals the log per message type and stage.

`check_reply` runs before a reply is sent. It rejects tensors that are not in the model
spec or have another shape, non-finite values, and metrics that are not finite numbers,
so that nothing but the model's own named tensors and scalar metrics leaves the site.

How the hashes are computed, so that the server or an auditor can recompute them from
the received arrays:

- ``sha256`` of a tensor: SHA-256 of its C-contiguous bytes in its own dtype and byte
  order (``np.ascontiguousarray(array).tobytes()``);
- ``sha256`` of a reply: SHA-256 of the UTF-8 text made of one line
  ``"<name> <dtype.str> <d0>x<d1>x... <tensor sha256>\\n"`` per tensor, in sorted name
  order (a 0-d tensor has an empty shape field).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from unicon_model.log import get_logger

logger = get_logger(__name__)

AUDIT_FILE_NAME = "audit.jsonl"

# Flower 1.42 serializes metric ints as sint64, or as uint64 above the sint64 maximum
# (flwr/common/serde_utils.py), so larger or smaller ints cannot be sent.
_METRIC_INT_MIN = -(2**63)
_METRIC_INT_MAX = 2**64 - 1


class ReplyRejected(Exception):
    """A reply that must not leave the site; ``problems`` lists every reason found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        listing = "; ".join(self.problems)
        super().__init__(f"reply rejected, nothing was sent: {listing}")


# ---------------------------------------------------------------------------------------
# Writing the log
# ---------------------------------------------------------------------------------------


class AuditLog:
    """Append-only JSON-lines log of the replies a site sent, in ``state_dir/audit.jsonl``.

    Each record is appended with one ``write`` on a file opened in append mode and then
    flushed to disk. The log is never rewritten, so a crash can at worst leave one
    incomplete last line. The next append starts on a new line, and `summarize_audit`
    reports such a line as unreadable.
    """

    def __init__(self, state_dir: Path) -> None:
        self._path = Path(state_dir) / AUDIT_FILE_NAME

    @property
    def path(self) -> Path:
        """The ``audit.jsonl`` file."""
        return self._path

    def append(
        self,
        run_id: str,
        stage: str,
        server_round: int,
        message_type: str,
        arrays: Mapping[str, Any],
        metrics: Mapping[str, float | int | list[int] | list[float]],
    ) -> dict[str, Any]:
        """Append the record of one reply that leaves the site.

        Parameters
        ----------
        run_id : str
            The Flower run.
        stage : str
            The curriculum stage (the task trained or evaluated).
        server_round : int
            The server round the reply answers (0 outside rounds, for example a query).
        message_type : str
            The Flower message type of the reply, for example ``train.stage``.
        arrays : Mapping[str, np.ndarray]
            The tensors sent, by parameter name. Objects with a ``numpy()`` method
            (``flwr.app.Array``, CPU ``torch.Tensor``) are converted.
        metrics : Mapping[str, int | float | list]
            The metrics sent. Non-finite floats are written as the strings ``"nan"``,
            ``"inf"`` and ``"-inf"`` so that every line stays valid JSON.

        Returns
        -------
        dict
            The record written.
        """
        tensors = [_describe_tensor(name, _as_numpy(name, arrays[name])) for name in sorted(arrays)]
        record: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "run_id": run_id,
            "stage": stage,
            "round": int(server_round),
            "message_type": message_type,
            "tensors": tensors,
            "total_bytes": sum(tensor["bytes"] for tensor in tensors),
            "sha256": _reply_digest(tensors),
            "metrics": {str(name): _json_metric(value) for name, value in metrics.items()},
        }
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"

        self._path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._path, "ab") as handle:
            if _ends_without_newline(self._path):
                # An earlier write stopped mid-line; keep this record on a line of its own.
                handle.write(b"\n")
            handle.write(line.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

        logger.info(
            "audit: run=%s stage=%s round=%d %s sent %d tensors, %d bytes, sha256 %s",
            run_id,
            stage,
            server_round,
            message_type,
            len(tensors),
            record["total_bytes"],
            record["sha256"][:16],
        )
        return record


def tensor_digest(arrays: Mapping[str, Any]) -> str:
    """Compute the SHA-256 of a reply's tensors, as written in the audit log.

    The layout of the hashed text is given in the module docstring.
    """
    tensors = [_describe_tensor(name, _as_numpy(name, arrays[name])) for name in sorted(arrays)]
    return _reply_digest(tensors)


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    if hasattr(value, "numpy"):
        return np.asarray(value.numpy())
    raise TypeError(
        f"tensor {name!r} must be a numpy array or provide numpy(), found {type(value).__name__}"
    )


def _describe_tensor(name: str, array: np.ndarray) -> dict[str, Any]:
    return {
        "name": name,
        "shape": [int(size) for size in array.shape],
        "dtype": array.dtype.str,
        "bytes": int(array.nbytes),
        "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest(),
    }


def _reply_digest(tensors: Sequence[Mapping[str, Any]]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        shape = "x".join(str(size) for size in tensor["shape"])
        line = f"{tensor['name']} {tensor['dtype']} {shape} {tensor['sha256']}\n"
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()


def _json_metric(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_json_metric(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, np.generic):
        return _json_metric(value.item())
    return repr(value)


def _ends_without_newline(path: Path) -> bool:
    size = path.stat().st_size
    if size == 0:
        return False
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) != b"\n"


# ---------------------------------------------------------------------------------------
# Summarizing the log
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LargestTensor:
    """The largest tensor sent in a group of replies, in bytes."""

    name: str
    shape: tuple[int, ...]
    bytes: int
    round: int
    run_id: str


@dataclass
class AuditGroup:
    """Totals of the replies of one message type in one stage."""

    message_type: str
    stage: str
    replies: int = 0
    tensors: int = 0
    total_bytes: int = 0
    largest_tensor: LargestTensor | None = None
    metric_names: set[str] = field(default_factory=set)
    run_ids: set[str] = field(default_factory=set)


@dataclass
class AuditSummary:
    """Totals over a site's audit log, per message type and stage.

    Attributes
    ----------
    path : Path
        The audit log read.
    exists : bool
        False when the file does not exist.
    groups : list of AuditGroup
        One group per (message type, stage), sorted.
    replies : int
        Replies read, over all groups.
    unreadable_lines : list of int
        1-based line numbers that are not valid records.
    first_time, last_time : str or None
        UTC times of the oldest and newest reply.
    """

    path: Path
    exists: bool
    groups: list[AuditGroup] = field(default_factory=list)
    replies: int = 0
    unreadable_lines: list[int] = field(default_factory=list)
    first_time: str | None = None
    last_time: str | None = None

    @property
    def total_bytes(self) -> int:
        """Tensor bytes sent over all replies."""
        return sum(group.total_bytes for group in self.groups)

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as plain JSON-compatible types."""
        return {
            "path": str(self.path),
            "exists": self.exists,
            "replies": self.replies,
            "total_bytes": self.total_bytes,
            "first_time": self.first_time,
            "last_time": self.last_time,
            "unreadable_lines": list(self.unreadable_lines),
            "groups": [
                {
                    "message_type": group.message_type,
                    "stage": group.stage,
                    "replies": group.replies,
                    "tensors": group.tensors,
                    "total_bytes": group.total_bytes,
                    "largest_tensor": None
                    if group.largest_tensor is None
                    else {
                        "name": group.largest_tensor.name,
                        "shape": list(group.largest_tensor.shape),
                        "bytes": group.largest_tensor.bytes,
                        "round": group.largest_tensor.round,
                        "run_id": group.largest_tensor.run_id,
                    },
                    "metric_names": sorted(group.metric_names),
                    "run_ids": sorted(group.run_ids),
                }
                for group in self.groups
            ],
        }

    def to_text(self) -> str:
        """Format the summary for a terminal, one block per message type and stage."""
        if not self.exists:
            return f"No audit log at {self.path}: this site has sent no reply yet."
        lines: list[str] = []
        if self.replies == 0:
            lines.append(f"The audit log {self.path} contains no reply.")
        else:
            lines.append(
                f"Audit log {self.path}: {self.replies} replies, "
                f"{_format_bytes(self.total_bytes)} of tensors, "
                f"from {self.first_time} to {self.last_time}."
            )
        for group in self.groups:
            lines.append("")
            lines.append(f"{group.message_type}, stage {group.stage}:")
            lines.append(
                f"  replies {group.replies}, tensors {group.tensors}, "
                f"bytes {_format_bytes(group.total_bytes)}"
            )
            if group.largest_tensor is not None:
                largest = group.largest_tensor
                shape = "x".join(str(size) for size in largest.shape) or "scalar"
                lines.append(
                    f"  largest tensor {largest.name} ({shape}, {_format_bytes(largest.bytes)}, "
                    f"round {largest.round})"
                )
            names = ", ".join(sorted(group.metric_names)) or "none"
            lines.append(f"  metrics: {names}")
        if self.unreadable_lines:
            numbers = ", ".join(str(number) for number in self.unreadable_lines[:10])
            more = " and more" if len(self.unreadable_lines) > 10 else ""
            lines.append("")
            lines.append(
                f"{len(self.unreadable_lines)} unreadable lines (line {numbers}{more}): "
                "an interrupted write or an edited file."
            )
        return "\n".join(lines)


def summarize_audit(state_dir: Path) -> AuditSummary:
    """Read ``state_dir/audit.jsonl`` and total it per message type and stage.

    A missing or empty log gives a summary that states this. Lines that are not valid
    records are counted in ``unreadable_lines`` and otherwise skipped.
    """
    path = Path(state_dir) / AUDIT_FILE_NAME
    if not path.exists():
        return AuditSummary(path=path, exists=False)

    summary = AuditSummary(path=path, exists=True)
    groups: dict[tuple[str, str], AuditGroup] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            record = _parse_record(line)
            if record is None:
                summary.unreadable_lines.append(number)
                continue
            key = (record["message_type"], record["stage"])
            group = groups.setdefault(key, AuditGroup(message_type=key[0], stage=key[1]))
            _add_record(group, record)
            summary.replies += 1
            time = record["time"]
            if summary.first_time is None or time < summary.first_time:
                summary.first_time = time
            if summary.last_time is None or time > summary.last_time:
                summary.last_time = time

    summary.groups = [groups[key] for key in sorted(groups)]
    return summary


def _parse_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    for key, kind in (
        ("time", str),
        ("run_id", str),
        ("stage", str),
        ("round", int),
        ("message_type", str),
        ("tensors", list),
        ("metrics", dict),
    ):
        if not isinstance(record.get(key), kind):
            return None
    for tensor in record["tensors"]:
        if not (
            isinstance(tensor, dict)
            and isinstance(tensor.get("name"), str)
            and isinstance(tensor.get("shape"), list)
            and isinstance(tensor.get("bytes"), int)
        ):
            return None
    return record


def _add_record(group: AuditGroup, record: Mapping[str, Any]) -> None:
    group.replies += 1
    group.run_ids.add(record["run_id"])
    group.metric_names.update(str(name) for name in record["metrics"])
    for tensor in record["tensors"]:
        group.tensors += 1
        group.total_bytes += tensor["bytes"]
        if group.largest_tensor is None or tensor["bytes"] > group.largest_tensor.bytes:
            group.largest_tensor = LargestTensor(
                name=tensor["name"],
                shape=tuple(int(size) for size in tensor["shape"]),
                bytes=tensor["bytes"],
                round=record["round"],
                run_id=record["run_id"],
            )


def _format_bytes(count: int) -> str:
    """Format a byte count exactly, with a binary unit above 1 KiB, e.g. ``2048 B (2.0 KiB)``."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{count} B ({value:.1f} {unit})"
        value /= 1024
    return f"{count} B ({value:.1f} GiB)"


# ---------------------------------------------------------------------------------------
# Reply guard
# ---------------------------------------------------------------------------------------


def check_reply(
    arrays: Mapping[str, Any],
    allowed_shapes: Mapping[str, tuple[int, ...]],
    metrics: Mapping[str, object],
) -> None:
    """Raise `ReplyRejected` unless a reply holds only spec tensors and numeric metrics.

    Parameters
    ----------
    arrays : Mapping[str, np.ndarray or (shape, dtype)]
        The tensors of the reply, by name. Values are numpy arrays, objects with a
        ``numpy()`` method such as ``flwr.app.Array``, or ``(shape, dtype)`` pairs when
        only the layout is known. Values of such pairs are not checked.
    allowed_shapes : Mapping[str, tuple[int, ...]]
        The model spec: every parameter name the site may send, with its shape. A
        reply may send a subset (for example only the trainable tensors of a stage).
    metrics : Mapping[str, object]
        The metrics of the reply.

    Raises
    ------
    ReplyRejected
        Listing every problem found. A tensor is rejected when its name is not in the
        spec (the message gives the closest name), its shape differs from the spec, its
        dtype is not numeric, or it contains NaN or infinite values. A metric is
        rejected unless it is a finite int or float, or a list of finite ints or of
        finite floats. Booleans and strings are never metrics, and ints must lie in
        [-2**63, 2**64 - 1], the range Flower can serialize.
    """
    problems: list[str] = []
    for name in sorted(arrays):
        problems.extend(_tensor_problems(name, arrays[name], allowed_shapes))
    for name in sorted(metrics, key=str):
        problem = _metric_problem(name, metrics[name])
        if problem is not None:
            problems.append(problem)
    if problems:
        raise ReplyRejected(problems)


def _tensor_problems(
    name: str, value: Any, allowed_shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    if name not in allowed_shapes:
        closest = difflib.get_close_matches(name, list(allowed_shapes), n=1)
        hint = f" (closest spec name: {closest[0]!r})" if closest else ""
        return [f"tensor {name!r} is not in the model spec{hint}"]

    array: np.ndarray | None = None
    if isinstance(value, tuple) and len(value) == 2:
        shape = tuple(int(size) for size in value[0])
        dtype = np.dtype(value[1])
    else:
        try:
            array = _as_numpy(name, value)
        except TypeError as error:
            return [str(error)]
        shape = tuple(int(size) for size in array.shape)
        dtype = array.dtype

    expected = tuple(int(size) for size in allowed_shapes[name])
    if shape != expected:
        return [f"tensor {name!r} has shape {shape}, but the model spec has {expected}"]
    if dtype.kind not in "biufc":
        return [f"tensor {name!r} has dtype {dtype}, which is not numeric"]
    if array is not None and dtype.kind in "fc":
        non_finite = int(array.size - np.count_nonzero(np.isfinite(array)))
        if non_finite:
            return [f"tensor {name!r} has {non_finite} NaN or infinite values"]
    return []


def _metric_problem(name: object, value: object) -> str | None:
    if not isinstance(name, str):
        return f"metric name {name!r} is not a string"
    if isinstance(value, list):
        if not value:
            return None
        kinds = {_metric_kind(item) for item in value}
        if kinds == {"int"} or kinds == {"float"}:
            bad = [item for item in value if _scalar_problem(item) is not None]
            if bad:
                return f"metric {name!r} contains {bad[0]!r}: {_scalar_problem(bad[0])}"
            return None
        return (
            f"metric {name!r} must be a list of ints or a list of floats, found items of "
            f"types {sorted({type(item).__name__ for item in value})}"
        )
    if isinstance(value, str):
        return f"metric {name!r} is the string {value!r}; strings are never sent as metrics"
    problem = _scalar_problem(value)
    if problem is not None:
        return f"metric {name!r} is {value!r}: {problem}"
    return None


def _metric_kind(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return type(value).__name__


def _scalar_problem(value: object) -> str | None:
    if isinstance(value, bool):
        return "a bool, not an int or a float"
    if isinstance(value, int):
        if not _METRIC_INT_MIN <= value <= _METRIC_INT_MAX:
            return "an int outside the range [-2**63, 2**64 - 1] that Flower can send"
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return "not finite"
        return None
    return f"a {type(value).__name__}, not an int or a float"
