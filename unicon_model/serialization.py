"""Saving and loading models as ``spec.json`` plus ``weights.safetensors``, and content hashes.

No pickle is involved: the spec is JSON and the weights are safetensors. Files are
written to a temporary name in the same folder, flushed to disk and moved into place
with ``os.replace``, so a reader sees either the old file or the new one. ``spec.json``
records the version id of the weights it was written with, so a pair of files from two
different saves is detected on load.

Hashes: :func:`group_hashes` gives one SHA-256 per parameter group (``backbone``,
``stems.<modality>``, ``adapters.<task>``, ``heads.<task>``) over the sorted tensor
names, dtypes, shapes and raw bytes; :func:`version_id` hashes those group hashes.
Sites use group hashes to cache frozen tensors, and the registry uses version ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from unicon_model.log import get_logger
from unicon_model.model import UniconModel
from unicon_model.spec import ModelSpec, ModelSpecError

logger = get_logger(__name__)

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"
_GROUPED_PREFIXES = ("stems", "adapters", "heads")


class ModelFileError(ValueError):
    """A model folder or tensor file that cannot be read or does not match its spec."""


def parameter_group(name: str) -> str:
    """Return the group of a parameter name: ``backbone``, ``stems.ct``, ``adapters.t``, ...."""
    parts = name.split(".")
    if parts[0] == "backbone":
        return "backbone"
    if parts[0] in _GROUPED_PREFIXES and len(parts) > 2:
        return f"{parts[0]}.{parts[1]}"
    raise ModelFileError(
        f"parameter name {name!r} has no known group; names start with backbone., "
        "stems.<modality>., adapters.<task>. or heads.<task>."
    )


def tensor_bytes(tensor: Tensor) -> bytes:
    """Return the raw bytes of a tensor in C order (any dtype, on any device)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def group_hashes(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Hash each parameter group of a state dict.

    Each group's SHA-256 covers, for every tensor name in sorted order, the name, the dtype,
    the shape and the raw bytes, so any change to any of them changes the hash.

    Returns
    -------
    dict of str to str
        Group name to 64-character hexadecimal digest, sorted by group name.
    """
    members: dict[str, list[str]] = {}
    for name in state:
        members.setdefault(parameter_group(name), []).append(name)

    hashes: dict[str, str] = {}
    for group in sorted(members):
        digest = hashlib.sha256()
        for name in sorted(members[group]):
            tensor = state[name]
            header = json.dumps([name, str(tensor.dtype), list(tensor.shape)])
            digest.update(header.encode("utf-8"))
            digest.update(tensor_bytes(tensor))
        hashes[group] = digest.hexdigest()
    return hashes


def version_id(state: Mapping[str, Tensor]) -> str:
    """Return a 64-character SHA-256 over the sorted group hashes of a state dict."""
    digest = hashlib.sha256()
    for group, group_hash in group_hashes(state).items():
        digest.update(f"{group}={group_hash}\n".encode())
    return digest.hexdigest()


def _temporary_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_text(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically (temporary file, fsync, ``os.replace``)."""
    temporary = _temporary_path(path)
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def save_tensors(
    path: Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write named tensors to a safetensors file atomically (copies to contiguous CPU tensors)."""
    contiguous = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    temporary = _temporary_path(path)
    try:
        save_file(contiguous, str(temporary), metadata=dict(metadata or {}))
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Read all tensors of a safetensors file onto the CPU."""
    if not path.is_file():
        raise ModelFileError(f"{path}: tensor file not found.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ModelFileError(
            f"{path}: cannot read safetensors data ({error}); the file is damaged or not a "
            "safetensors file. Copy it again from its source."
        ) from error


def build_model(spec: ModelSpec, seed: int | None = None) -> UniconModel:
    """Build a model with the spec's backbone and its tasks grown in order (fresh weights)."""
    model = UniconModel(spec.backbone, seed=seed)
    for task in spec.tasks:
        model.grow(task)
    return model


def save_model(model: UniconModel, directory: Path) -> str:
    """Write ``spec.json`` and ``weights.safetensors`` of a model and return its version id.

    The weights are written first and the spec last, each atomically. ``spec.json`` contains
    :meth:`ModelSpec.to_dict` plus a ``weights`` entry with the file name, version id and
    group hashes.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    version = version_id(state)

    save_tensors(directory / WEIGHTS_FILE, state, {"version_id": version})
    document: dict[str, Any] = model.spec.to_dict()
    document["weights"] = {
        "file": WEIGHTS_FILE,
        "version_id": version,
        "group_hashes": group_hashes(state),
    }
    atomic_write_text(directory / SPEC_FILE, json.dumps(document, indent=2) + "\n")
    logger.info("save_model: wrote version %s to %s", version[:12], directory)
    return version


def read_spec(directory: Path) -> tuple[ModelSpec, dict[str, Any]]:
    """Read ``spec.json`` of a model folder: the spec and its ``weights`` entry."""
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise ModelFileError(f"{path}: model spec not found; save the model with save_model().")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFileError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}.") from None
    if not isinstance(document, dict):
        raise ModelFileError(f"{path}: expected a JSON object, found {type(document).__name__}.")
    weights = document.pop("weights", {})
    try:
        spec = ModelSpec.from_dict(document)
    except ModelSpecError as error:
        raise ModelFileError(f"{path}: {error}") from error
    return spec, weights if isinstance(weights, dict) else {}


def load_model(directory: Path) -> UniconModel:
    """Rebuild a model saved by :func:`save_model`, with exactly its weights.

    Raises :class:`ModelFileError` when a file is missing or damaged, when tensor names or
    shapes differ from what the spec builds, or when the weights are not the ones the
    spec was saved with.
    """
    directory = Path(directory)
    spec, weights_entry = read_spec(directory)
    weights_path = directory / str(weights_entry.get("file", WEIGHTS_FILE))
    state = load_tensors(weights_path)

    model = build_model(spec)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{name}: file {tuple(state[name].shape)}, spec {tuple(expected[name].shape)}"
        for name in sorted(set(state) & set(expected))
        if state[name].shape != expected[name].shape
    ]
    if missing or unexpected or mismatched:
        raise ModelFileError(
            f"{weights_path}: tensors do not match {directory / SPEC_FILE}; "
            f"missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"shape mismatches {mismatched[:10]}."
        )

    recorded = weights_entry.get("version_id")
    actual = version_id(state)
    if recorded is not None and recorded != actual:
        raise ModelFileError(
            f"{weights_path}: version {actual[:12]} differs from version {str(recorded)[:12]} "
            f"recorded in {SPEC_FILE}; the files come from different saves. Save the model again."
        )
    model.load_state_dict(state, strict=True)
    return model
