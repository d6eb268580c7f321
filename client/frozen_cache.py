"""The site's disk cache of frozen parameter groups, keyed by content hash.

The server sends a frozen group (the backbone, a stem, an earlier task's adapters
or head) only to sites that do not hold it yet. A site stores each received group
as ``state_dir/frozen/<sha256>.safetensors`` and reports the hashes it holds when a
stage starts, so a later stage, or a later Flower run, does not send it again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unicon_model.log import get_logger
from unicon_model.serialization import group_hashes, parameter_group

logger = get_logger(__name__)


class FrozenCacheError(RuntimeError):
    """A frozen group that is missing from the cache or does not match its hash."""


class FrozenCache:
    """Content-addressed store of parameter groups in a site's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.folder = Path(state_dir) / "frozen"

    def hashes(self) -> list[str]:
        """Return the hashes of every group held, sorted."""
        if not self.folder.is_dir():
            return []
        return sorted(
            p.name.removesuffix(".safetensors") for p in self.folder.glob("*.safetensors")
        )

    def store(self, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, str]) -> None:
        """Split ``tensors`` into groups, check each group's hash, and store it.

        Parameters
        ----------
        tensors : Mapping[str, torch.Tensor]
            Parameters of one or more whole groups, keyed by parameter name.
        expected : Mapping[str, str]
            Hash of each group as the server computed it.
        """
        by_group: dict[str, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            by_group.setdefault(parameter_group(name), {})[name] = value
        self.folder.mkdir(parents=True, exist_ok=True)
        for group, members in by_group.items():
            digest = group_hashes(members)[group]
            if expected.get(group) != digest:
                raise FrozenCacheError(
                    f"frozen group {group!r} received with hash {digest[:12]}, but the server announced "
                    f"{str(expected.get(group))[:12]}; the transfer is corrupt, the round is not run"
                )
            target = self.folder / f"{digest}.safetensors"
            if target.exists():
                continue
            tmp = target.with_name(f".{target.name}.tmp")
            save_file({k: v.contiguous() for k, v in members.items()}, str(tmp))
            os.replace(tmp, target)
            logger.debug("cached frozen group %s as %s", group, digest[:12])

    def load(self, hashes: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """Return the tensors of the named groups from the cache."""
        tensors: dict[str, torch.Tensor] = {}
        for group, digest in sorted(hashes.items()):
            path = self.folder / f"{digest}.safetensors"
            if not path.is_file():
                raise FrozenCacheError(
                    f"{path}: frozen group {group!r} is not in the site cache; the server sends it when the "
                    "site reports it missing, so restart the stage to resend it"
                )
            tensors.update(load_file(str(path)))
        return tensors
