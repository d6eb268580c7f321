"""Typed descriptions of the model: backbone configuration, tasks and the whole model.

A :class:`ModelSpec` plus a weights file is everything needed to rebuild a model
(see :mod:`unicon_model.serialization`). Specs are validated when they are created,
so an invalid value fails where it is written (a JSON file, a curriculum) and not
deep inside a forward pass.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

TASK_KINDS: tuple[str, ...] = ("classification", "prognosis", "segmentation")
MODALITIES: tuple[str, ...] = ("ct", "pet", "petct")
NORMS: tuple[str, ...] = ("group", "instance")

# Input channels per modality; ``petct`` stacks channel 0 = CT and channel 1 = PET.
MODALITY_CHANNELS: dict[str, int] = {"ct": 1, "pet": 1, "petct": 2}

SPEC_FORMAT = "unicon-model-spec"
SPEC_FORMAT_VERSION = 1

# Task names become module keys (``adapters.<task>.``), so dots are not allowed.
_TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class ModelSpecError(ValueError):
    """Invalid backbone, task or model specification."""


def _closest(value: str, allowed: Iterable[str]) -> str:
    """Return a ``Did you mean`` hint for ``value`` among ``allowed``, or an empty string."""
    matches = difflib.get_close_matches(value, list(allowed), n=1)
    return f" Did you mean '{matches[0]}'?" if matches else ""


def _check_choice(owner: str, field_name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = _closest(str(value), allowed)
        raise ModelSpecError(
            f"{owner} field '{field_name}': invalid value {value!r}; "
            f"allowed values are {', '.join(allowed)}.{hint}"
        )


def _check_keys(owner: str, data: Mapping[str, Any], required: set[str], known: set[str]) -> None:
    for key in data:
        if key not in known:
            raise ModelSpecError(
                f"{owner}: unknown key {key!r}; known keys are {', '.join(sorted(known))}."
                f"{_closest(str(key), known)} Remove or rename the key."
            )
    for key in sorted(required):
        if key not in data:
            raise ModelSpecError(f"{owner}: missing required key {key!r}.")


def _positive_int(owner: str, field_name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSpecError(
            f"{owner} field '{field_name}': invalid value {value!r}; expected a positive integer."
        )
    return value


@dataclass(frozen=True)
class BackboneConfig:
    """Shape of the SegResNet-style encoder shared by all tasks.

    Parameters
    ----------
    init_filters : int, default 8
        Channels after the stem; level ``i`` has ``init_filters * 2**i`` channels.
    blocks_down : tuple of int, default (1, 1, 1, 1)
        Residual blocks per level. Level ``i > 0`` starts with a stride-2 convolution,
        so inputs to segmentation tasks need sides divisible by ``2**(len(blocks_down) - 1)``.
    num_groups : int, default 4
        Groups of every GroupNorm; must divide ``init_filters``. Ignored with ``norm="instance"``.
    adapter_rank : int, default 4
        Rank ``r`` of each task's low-rank adapters.
    norm : {"group", "instance"}, default "group"
        Normalization inside the residual blocks. Both are supported by Opacus; BatchNorm
        is not offered because per-sample gradients cannot be computed through it.
    """

    init_filters: int = 8
    blocks_down: tuple[int, ...] = (1, 1, 1, 1)
    num_groups: int = 4
    adapter_rank: int = 4
    norm: str = "group"

    def __post_init__(self) -> None:
        owner = "BackboneConfig"
        _positive_int(owner, "init_filters", self.init_filters)
        _positive_int(owner, "num_groups", self.num_groups)
        _positive_int(owner, "adapter_rank", self.adapter_rank)
        _check_choice(owner, "norm", self.norm, NORMS)

        blocks = tuple(self.blocks_down)
        if not blocks:
            raise ModelSpecError(
                f"{owner} field 'blocks_down': invalid value {self.blocks_down!r}; "
                "expected at least one level, for example (1, 1, 1, 1)."
            )
        for count in blocks:
            _positive_int(owner, "blocks_down", count)
        object.__setattr__(self, "blocks_down", blocks)

        if self.norm == "group" and self.init_filters % self.num_groups != 0:
            raise ModelSpecError(
                f"{owner} field 'num_groups': value {self.num_groups} does not divide "
                f"init_filters={self.init_filters}; choose a divisor of init_filters."
            )

    @property
    def num_levels(self) -> int:
        """Number of resolution levels of the encoder."""
        return len(self.blocks_down)

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of the feature map of each level, finest first."""
        return tuple(self.init_filters * 2**i for i in range(self.num_levels))

    @property
    def size_divisor(self) -> int:
        """Value every spatial side must be divisible by for segmentation outputs."""
        return int(2 ** (self.num_levels - 1))

    @classmethod
    def preset(cls, name: str) -> BackboneConfig:
        """Build a named configuration.

        ``tiny`` (8 filters, blocks (1, 1, 1, 1), 4 groups) is for CPU simulations and tests.
        ``ctfm`` (32 filters, blocks (1, 2, 2, 4, 4), 8 groups) has the layout of the
        CT-FM SegResEncoder (Pai et al., "Vision Foundation Models for Computed Tomography",
        arXiv 2501.09001, 2025), so its published encoder weights fit by shape.
        """
        presets = {
            "tiny": cls(init_filters=8, blocks_down=(1, 1, 1, 1), num_groups=4),
            "ctfm": cls(init_filters=32, blocks_down=(1, 2, 2, 4, 4), num_groups=8),
        }
        if name not in presets:
            raise ModelSpecError(
                f"BackboneConfig preset: unknown name {name!r}; allowed values are "
                f"{', '.join(presets)}.{_closest(name, presets)}"
            )
        return presets[name]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "init_filters": self.init_filters,
            "blocks_down": list(self.blocks_down),
            "num_groups": self.num_groups,
            "adapter_rank": self.adapter_rank,
            "norm": self.norm,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneConfig:
        """Build a configuration from :meth:`to_dict` output, rejecting unknown keys."""
        known = {"init_filters", "blocks_down", "num_groups", "adapter_rank", "norm"}
        _check_keys("BackboneConfig", data, set(), known)
        values = dict(data)
        if "blocks_down" in values:
            blocks = values["blocks_down"]
            if not isinstance(blocks, list | tuple):
                raise ModelSpecError(
                    f"BackboneConfig field 'blocks_down': invalid value {blocks!r}; "
                    "expected a list of positive integers."
                )
            values["blocks_down"] = tuple(blocks)
        return cls(**values)


@dataclass(frozen=True)
class TaskSpec:
    """One clinical task that the model learns.

    Parameters
    ----------
    name : str
        Lower-case letters, digits and ``_``, starting with a letter (for example ``ct_seg``).
    kind : {"classification", "prognosis", "segmentation"}
    modality : {"ct", "pet", "petct"}
        ``petct`` inputs have 2 channels, channel 0 CT and channel 1 PET.
    num_classes : int, default 2
        Classification: number of classes (at least 2). Segmentation: number of classes
        including background (at least 2). Ignored for prognosis.
    time_bins : tuple of float, default ()
        Prognosis only: strictly ascending positive bin edges in days. With ``m`` edges the
        head predicts ``m + 1`` discrete hazards; with none it predicts one Cox log-risk.
    depends_on : str or None, default None
        An earlier task whose adapters and head initialize this task's modules.
    """

    name: str
    kind: str
    modality: str
    num_classes: int = 2
    time_bins: tuple[float, ...] = field(default=())
    depends_on: str | None = None

    def __post_init__(self) -> None:
        owner = f"TaskSpec {self.name!r}"
        if not isinstance(self.name, str) or not _TASK_NAME.match(self.name):
            raise ModelSpecError(
                f"TaskSpec field 'name': invalid value {self.name!r}; use lower-case letters, "
                "digits and '_', starting with a letter (for example 'ct_seg')."
            )
        _check_choice(owner, "kind", self.kind, TASK_KINDS)
        _check_choice(owner, "modality", self.modality, MODALITIES)
        _positive_int(owner, "num_classes", self.num_classes)
        if self.kind in ("classification", "segmentation") and self.num_classes < 2:
            raise ModelSpecError(
                f"{owner} field 'num_classes': invalid value {self.num_classes}; a "
                f"{self.kind} task needs at least 2 classes"
                + (" (background counts as one)." if self.kind == "segmentation" else ".")
            )

        bins = tuple(float(edge) for edge in self.time_bins)
        if bins and self.kind != "prognosis":
            raise ModelSpecError(
                f"{owner} field 'time_bins': value {list(bins)} is only valid for prognosis "
                f"tasks, not {self.kind}; remove it."
            )
        for edge in bins:
            if not math.isfinite(edge) or edge <= 0:
                raise ModelSpecError(
                    f"{owner} field 'time_bins': invalid edge {edge}; edges are days, "
                    "finite and greater than 0."
                )
        if any(later <= earlier for earlier, later in itertools.pairwise(bins)):
            raise ModelSpecError(
                f"{owner} field 'time_bins': value {list(bins)} is not strictly ascending; "
                "sort the edges and remove duplicates."
            )
        object.__setattr__(self, "time_bins", bins)

        if self.depends_on is not None and self.depends_on == self.name:
            raise ModelSpecError(f"{owner} field 'depends_on': a task cannot depend on itself.")

    @property
    def in_channels(self) -> int:
        """Number of input image channels of this task's modality."""
        return MODALITY_CHANNELS[self.modality]

    @property
    def num_outputs(self) -> int:
        """Channels of the head output: classes, hazard bins (or 1 Cox log-risk)."""
        if self.kind == "prognosis":
            return len(self.time_bins) + 1 if self.time_bins else 1
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary."""
        return {
            "name": self.name,
            "kind": self.kind,
            "modality": self.modality,
            "num_classes": self.num_classes,
            "time_bins": list(self.time_bins),
            "depends_on": self.depends_on,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        """Build a task from :meth:`to_dict` output, rejecting unknown keys."""
        known = {"name", "kind", "modality", "num_classes", "time_bins", "depends_on"}
        _check_keys(f"TaskSpec {data.get('name')!r}", data, {"name", "kind", "modality"}, known)
        values = dict(data)
        if "time_bins" in values:
            bins = values["time_bins"]
            if not isinstance(bins, list | tuple):
                raise ModelSpecError(
                    f"TaskSpec {data.get('name')!r} field 'time_bins': invalid value {bins!r}; "
                    "expected a list of numbers (days)."
                )
            values["time_bins"] = tuple(bins)
        return cls(**values)


@dataclass(frozen=True)
class ModelSpec:
    """Backbone configuration plus the tasks in the order the model learned them."""

    backbone: BackboneConfig
    tasks: tuple[TaskSpec, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        seen: set[str] = set()
        for task in self.tasks:
            if task.name in seen:
                raise ModelSpecError(
                    f"ModelSpec field 'tasks': task name {task.name!r} appears twice; "
                    "task names must be unique."
                )
            if task.depends_on is not None and task.depends_on not in seen:
                raise ModelSpecError(
                    f"ModelSpec task {task.name!r} field 'depends_on': {task.depends_on!r} is "
                    f"not an earlier task (earlier tasks: {sorted(seen) or 'none'}); "
                    "list the parent task first."
                )
            seen.add(task.name)

    def task(self, name: str) -> TaskSpec:
        """Return the task called ``name``."""
        for task in self.tasks:
            if task.name == name:
                return task
        names = [task.name for task in self.tasks]
        raise ModelSpecError(
            f"ModelSpec: unknown task {name!r}; known tasks are {names}.{_closest(name, names)}"
        )

    @property
    def task_names(self) -> tuple[str, ...]:
        """Task names in learning order."""
        return tuple(task.name for task in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dictionary with a format tag and version."""
        return {
            "format": SPEC_FORMAT,
            "format_version": SPEC_FORMAT_VERSION,
            "backbone": self.backbone.to_dict(),
            "tasks": [task.to_dict() for task in self.tasks],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Build a model spec from :meth:`to_dict` output."""
        _check_keys(
            "ModelSpec", data, {"backbone", "tasks"},
            {"format", "format_version", "backbone", "tasks"},
        )
        if data.get("format", SPEC_FORMAT) != SPEC_FORMAT:
            raise ModelSpecError(
                f"ModelSpec field 'format': invalid value {data['format']!r}; "
                f"expected {SPEC_FORMAT!r}."
            )
        version = data.get("format_version", SPEC_FORMAT_VERSION)
        if version != SPEC_FORMAT_VERSION:
            raise ModelSpecError(
                f"ModelSpec field 'format_version': unsupported value {version!r}; this version "
                f"of unicon_model reads format_version {SPEC_FORMAT_VERSION}."
            )
        tasks = data["tasks"]
        if not isinstance(tasks, list | tuple):
            raise ModelSpecError(
                f"ModelSpec field 'tasks': invalid value {tasks!r}; expected a list of tasks."
            )
        return cls(
            backbone=BackboneConfig.from_dict(data["backbone"]),
            tasks=tuple(TaskSpec.from_dict(task) for task in tasks),
        )
