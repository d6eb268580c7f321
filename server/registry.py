"""The model registry: one version per completed stage, round checkpoints, a run log.

Layout of a registry folder::

    LATEST                      name of the newest version folder
    runs.jsonl                  append-only log of runs and stages
    versions/v001-ct_cls/       one folder per completed stage
        spec.json               model spec (architecture, tasks in order)
        weights.safetensors     all parameters
        version.json            version id, stage, parent, group hashes, time
        curriculum.json         the curriculum the stage ran under
        metrics.json            per-round and per-site metrics, bytes on the wire
        accuracy_matrix.json    stage x task matrix up to this stage
        fisher.safetensors      merged diagonal Fisher (only when a later stage uses EWC)
    checkpoints/<stage>/        the running stage's last completed round

Every file is written to a temporary name and renamed, and a version folder is
renamed into place only when complete, so a crash never leaves a half-written
version or checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from unicon_model.log import get_logger
from unicon_model.model import UniconModel
from unicon_model.serialization import group_hashes, load_model, save_model, version_id

logger = get_logger(__name__)


class RegistryError(RuntimeError):
    """A registry folder that cannot serve the request, with the fix in the message."""


@dataclass(frozen=True)
class VersionInfo:
    """One registry version: the model after a completed stage."""

    name: str
    path: Path
    index: int
    stage: str
    version_id: str
    created: str


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False, encoding="utf-8"
    ) as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def save_tensors_atomic(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write tensors as safetensors through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


class Registry:
    """A registry folder on the server.

    Parameters
    ----------
    root : Path
        The registry folder; created on first write.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    # Versions ---------------------------------------------------------------

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    def versions(self) -> list[VersionInfo]:
        """Return every completed version, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        infos = []
        for folder in sorted(self.versions_dir.iterdir()):
            meta_file = folder / "version.json"
            if not folder.is_dir() or folder.name.startswith(".") or not meta_file.is_file():
                continue
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            infos.append(
                VersionInfo(
                    name=folder.name,
                    path=folder,
                    index=int(meta["index"]),
                    stage=str(meta["stage"]),
                    version_id=str(meta["version_id"]),
                    created=str(meta["created"]),
                )
            )
        return infos

    def latest(self) -> VersionInfo | None:
        """Return the version named by ``LATEST``, or ``None`` for an empty registry."""
        pointer = self.root / "LATEST"
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        for info in self.versions():
            if info.name == name:
                return info
        raise RegistryError(
            f"{pointer}: names version {name!r}, which is not in {self.versions_dir}; "
            "restore that folder or rewrite LATEST with an existing version name"
        )

    def version_for_stage(self, stage: str) -> VersionInfo | None:
        """Return the version written by ``stage``, if that stage completed."""
        for info in self.versions():
            if info.stage == stage:
                return info
        return None

    def load_model(self, info: VersionInfo) -> UniconModel:
        """Rebuild the exact model of a version."""
        return load_model(info.path)

    def read_json(self, info: VersionInfo, name: str) -> Any:
        """Read one JSON file of a version (``metrics.json``, ``accuracy_matrix.json``, ...)."""
        return json.loads((info.path / name).read_text(encoding="utf-8"))

    def load_fisher(self, info: VersionInfo) -> dict[str, torch.Tensor] | None:
        """Return the merged Fisher stored with a version, if any."""
        path = info.path / "fisher.safetensors"
        return load_file(str(path)) if path.is_file() else None

    def write_version(
        self,
        *,
        index: int,
        stage: str,
        model: UniconModel,
        curriculum: Mapping[str, Any],
        metrics: Mapping[str, Any],
        accuracy_matrix: Mapping[str, Any],
        fisher: Mapping[str, torch.Tensor] | None = None,
    ) -> VersionInfo:
        """Write a completed stage as a new version and point ``LATEST`` at it."""
        name = f"v{index + 1:03d}-{stage}"
        final = self.versions_dir / name
        if final.exists():
            raise RegistryError(
                f"{final}: version already exists; stage {stage!r} completed before. "
                "Use a new registry folder to run it again"
            )
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.versions_dir, prefix=f".{name}."))
        state = model.state_dict()
        parent = self.latest()
        save_model(model, staging)
        write_json_atomic(staging / "curriculum.json", curriculum)
        write_json_atomic(staging / "metrics.json", metrics)
        write_json_atomic(staging / "accuracy_matrix.json", accuracy_matrix)
        if fisher:
            save_tensors_atomic(staging / "fisher.safetensors", fisher)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        vid = version_id(state)
        write_json_atomic(
            staging / "version.json",
            {
                "index": index,
                "stage": stage,
                "version_id": vid,
                "parent": parent.name if parent else None,
                "group_hashes": group_hashes(state),
                "created": created,
            },
        )
        os.replace(staging, final)
        self._write_latest(name)
        self.log_event({"event": "version", "stage": stage, "version": name, "version_id": vid})
        logger.info("registry: wrote version %s (id %s)", name, vid[:12])
        return VersionInfo(
            name=name, path=final, index=index, stage=stage, version_id=vid, created=created
        )

    def _write_latest(self, name: str) -> None:
        tmp = self.root / ".LATEST.tmp"
        tmp.write_text(name + "\n", encoding="utf-8")
        os.replace(tmp, self.root / "LATEST")

    # Round checkpoints ---------------------------------------------------------

    def checkpoint_dir(self, stage: str) -> Path:
        return self.root / "checkpoints" / stage

    def save_checkpoint(
        self,
        stage: str,
        server_round: int,
        trainable: Mapping[str, torch.Tensor],
        meta: Mapping[str, Any],
    ) -> None:
        """Save the stage's trainable tensors after a completed round.

        The tensors are written first and ``round.json`` last, so a checkpoint
        whose JSON names round ``r`` always has the tensors of round ``r``.
        """
        folder = self.checkpoint_dir(stage)
        save_tensors_atomic(folder / f"round-{server_round:04d}.safetensors", trainable)
        write_json_atomic(folder / "round.json", {"round": server_round, **meta})
        for old in folder.glob("round-*.safetensors"):
            if old.name != f"round-{server_round:04d}.safetensors":
                old.unlink()

    def load_checkpoint(
        self, stage: str
    ) -> tuple[int, dict[str, torch.Tensor], dict[str, Any]] | None:
        """Return ``(round, trainable tensors, meta)`` of a stage's last completed round."""
        folder = self.checkpoint_dir(stage)
        meta_file = folder / "round.json"
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        server_round = int(meta.pop("round"))
        tensors = load_file(str(folder / f"round-{server_round:04d}.safetensors"))
        return server_round, tensors, meta

    def clear_checkpoint(self, stage: str) -> None:
        """Remove a stage's round checkpoints once its version is written."""
        shutil.rmtree(self.checkpoint_dir(stage), ignore_errors=True)

    # Run log -----------------------------------------------------------------

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Append one event to ``runs.jsonl`` (the run log is never rewritten)."""
        self.root.mkdir(parents=True, exist_ok=True)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **event}
        with (self.root / "runs.jsonl").open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
