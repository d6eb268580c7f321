"""The curriculum: model settings and the continual stages, read from one YAML file.

A curriculum is validated once, at load, into frozen dataclasses. Every error names
the file, the key path, the value found and what to write instead.

Example (the default curriculum ships as ``server/curricula/default.yaml``)::

    name: default
    seed: 0
    model:
      backbone: tiny              # preset name, or a mapping of BackboneConfig fields
      pretrained: null            # local safetensors file of a SegResNet encoder
    defaults:                     # apply to every stage unless the stage overrides them
      rounds: 3
      local_epochs: 1
      learning_rate: 0.003
    stages:
      - name: ct_cls
        task: {kind: classification, modality: ct, num_classes: 2}
      - name: petct_seg
        task: {kind: segmentation, modality: petct, num_classes: 2, depends_on: ct_seg}
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from unicon_model.spec import BackboneConfig, TaskSpec

TRAIN_MODES = ("new", "shared")
CONSOLIDATION_METHODS = ("none", "ewc", "lwf", "l2sp")
OPTIMIZERS = ("adam", "sgd")
DEFAULT_CURRICULUM = Path(__file__).with_name("curricula") / "default.yaml"


class CurriculumError(ValueError):
    """A curriculum file that cannot be used, with the key and the fix in the message."""


@dataclass(frozen=True)
class PreprocessSettings:
    """Resampling and patch geometry of a stage, in millimetres and voxels."""

    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0)
    patch_size: tuple[int, int, int] = (32, 32, 32)
    ct_window: tuple[float, float] = (-1000.0, 400.0)
    suv_scale: float = 10.0


@dataclass(frozen=True)
class CentralDPSettings:
    """Server-side differential privacy on the aggregate (Flower's DP strategy wrappers)."""

    noise_multiplier: float
    clipping_norm: float


@dataclass(frozen=True)
class StageSettings:
    """Training settings of one stage. Every field may appear under ``defaults`` or in a stage."""

    rounds: int = 3
    local_epochs: int = 1
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    batch_size: int = 4
    min_sites: int = 1
    timeout_s: float = 600.0
    train: str = "new"
    consolidation: str = "none"
    consolidation_weight: float = 1.0
    preprocess: PreprocessSettings = field(default_factory=PreprocessSettings)
    central_dp: CentralDPSettings | None = None


@dataclass(frozen=True)
class Stage:
    """One continual stage: the task it adds and how it trains."""

    name: str
    task: TaskSpec
    settings: StageSettings


@dataclass(frozen=True)
class Curriculum:
    """Model settings and the ordered stages of a federation."""

    name: str
    seed: int
    backbone: BackboneConfig
    pretrained: Path | None
    stages: tuple[Stage, ...]
    source: Path | None = None

    def stage(self, name: str) -> Stage:
        """Return the stage called ``name``; raise with the known names otherwise."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        known = [s.name for s in self.stages]
        raise CurriculumError(
            f"{self.source or 'curriculum'}: no stage named {name!r}; stages are {known}"
            + _suggest(name, known)
        )

    def index(self, name: str) -> int:
        """Return the 0-based position of a stage."""
        return [s.name for s in self.stages].index(self.stage(name).name)

    def fisher_needed_after(self, index: int) -> bool:
        """Return whether a later stage uses EWC and so needs a Fisher from stage ``index``."""
        return any(s.settings.consolidation == "ewc" for s in self.stages[index + 1 :])

    def to_dict(self) -> dict[str, Any]:
        """Return a plain mapping that ``load_curriculum_mapping`` reads back."""
        return {
            "name": self.name,
            "seed": self.seed,
            "model": {
                "backbone": dataclasses.asdict(self.backbone),
                "pretrained": str(self.pretrained) if self.pretrained else None,
            },
            "stages": [
                {
                    "name": s.name,
                    "task": _task_to_dict(s.task),
                    **_settings_to_dict(s.settings),
                }
                for s in self.stages
            ],
        }


def _task_to_dict(task: TaskSpec) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": task.name,
        "kind": task.kind,
        "modality": task.modality,
        "num_classes": task.num_classes,
    }
    if task.time_bins:
        out["time_bins"] = list(task.time_bins)
    if task.depends_on:
        out["depends_on"] = task.depends_on
    return out


def _settings_to_dict(settings: StageSettings) -> dict[str, Any]:
    raw = dataclasses.asdict(settings)
    raw["preprocess"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in raw["preprocess"].items()
    }
    if raw["central_dp"] is None:
        del raw["central_dp"]
    return raw


def _suggest(value: str, allowed: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(value, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Reader:
    """Reads typed values out of nested mappings, naming the key path in errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> CurriculumError:
        return CurriculumError(f"{self.source}: {key}: {message}")

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"expected a mapping, found {type(value).__name__} {value!r}")
        return value

    def check_keys(self, value: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for name in value:
            if name not in allowed:
                raise self.fail(
                    f"{key}.{name}",
                    f"unknown key; allowed keys are {sorted(allowed)}"
                    + _suggest(str(name), allowed),
                )

    def number(self, value: Any, key: str, kind: type, minimum: float | None = None) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, found {value!r}")
        if kind is int and not float(value).is_integer():
            raise self.fail(key, f"expected an integer, found {value!r}")
        if minimum is not None and value < minimum:
            raise self.fail(key, f"must be at least {minimum}, found {value!r}")
        return kind(value)

    def choice(self, value: Any, key: str, allowed: tuple[str, ...]) -> str:
        if value not in allowed:
            raise self.fail(
                key,
                f"invalid value {value!r}; allowed values are {list(allowed)}"
                + _suggest(str(value), allowed),
            )
        return str(value)

    def triple(self, value: Any, key: str, kind: type) -> tuple[Any, ...]:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = [value, value, value]
        if not isinstance(value, list | tuple) or len(value) != 3:
            raise self.fail(key, f"expected a number or a list of 3 numbers, found {value!r}")
        return tuple(self.number(v, key, kind, minimum=0) for v in value)


_SETTING_KEYS = tuple(f.name for f in dataclasses.fields(StageSettings))
_PREPROCESS_KEYS = tuple(f.name for f in dataclasses.fields(PreprocessSettings))
_TASK_KEYS = ("name", "kind", "modality", "num_classes", "time_bins", "depends_on")


def _read_settings(
    reader: _Reader, raw: Mapping[str, Any], key: str, base: StageSettings
) -> StageSettings:
    updates: dict[str, Any] = {}
    for name, value in raw.items():
        where = f"{key}.{name}"
        if name in ("rounds", "local_epochs", "batch_size", "min_sites"):
            updates[name] = reader.number(value, where, int, minimum=1)
        elif name in ("learning_rate", "consolidation_weight"):
            updates[name] = reader.number(value, where, float, minimum=0)
        elif name == "timeout_s":
            updates[name] = reader.number(value, where, float, minimum=1)
        elif name == "optimizer":
            updates[name] = reader.choice(value, where, OPTIMIZERS)
        elif name == "train":
            updates[name] = reader.choice(value, where, TRAIN_MODES)
        elif name == "consolidation":
            updates[name] = reader.choice(value, where, CONSOLIDATION_METHODS)
        elif name == "preprocess":
            updates[name] = _read_preprocess(reader, value, where, base.preprocess)
        elif name == "central_dp":
            updates[name] = _read_central_dp(reader, value, where)
    settings = dataclasses.replace(base, **updates)
    if settings.consolidation != "none" and settings.train == "new":
        raise reader.fail(
            f"{key}.consolidation",
            f"{settings.consolidation!r} only acts on shared parameters, but train is 'new' "
            "(shared parameters stay frozen); set train: shared or consolidation: none",
        )
    return settings


def _read_preprocess(
    reader: _Reader, value: Any, key: str, base: PreprocessSettings
) -> PreprocessSettings:
    raw = reader.mapping(value, key)
    reader.check_keys(raw, key, _PREPROCESS_KEYS)
    updates: dict[str, Any] = {}
    if "spacing" in raw:
        updates["spacing"] = reader.triple(raw["spacing"], f"{key}.spacing", float)
    if "patch_size" in raw:
        patch = reader.triple(raw["patch_size"], f"{key}.patch_size", int)
        if any(p % 16 for p in patch):
            raise reader.fail(
                f"{key}.patch_size", f"each size must be a multiple of 16, found {list(patch)}"
            )
        updates["patch_size"] = patch
    if "ct_window" in raw:
        window = raw["ct_window"]
        if not isinstance(window, list | tuple) or len(window) != 2 or window[0] >= window[1]:
            raise reader.fail(
                f"{key}.ct_window", f"expected [low, high] in HU with low < high, found {window!r}"
            )
        updates["ct_window"] = (float(window[0]), float(window[1]))
    if "suv_scale" in raw:
        updates["suv_scale"] = reader.number(
            raw["suv_scale"], f"{key}.suv_scale", float, minimum=1e-6
        )
    return dataclasses.replace(base, **updates)


def _read_central_dp(reader: _Reader, value: Any, key: str) -> CentralDPSettings | None:
    if value is None:
        return None
    raw = reader.mapping(value, key)
    reader.check_keys(raw, key, ("noise_multiplier", "clipping_norm"))
    for name in ("noise_multiplier", "clipping_norm"):
        if name not in raw:
            raise reader.fail(
                f"{key}.{name}", "missing; central DP needs noise_multiplier and clipping_norm"
            )
    return CentralDPSettings(
        noise_multiplier=reader.number(
            raw["noise_multiplier"], f"{key}.noise_multiplier", float, 0
        ),
        clipping_norm=reader.number(raw["clipping_norm"], f"{key}.clipping_norm", float, 1e-9),
    )


def _read_task(reader: _Reader, value: Any, key: str, stage_name: str) -> TaskSpec:
    raw = reader.mapping(value, key)
    reader.check_keys(raw, key, _TASK_KEYS)
    for name in ("kind", "modality"):
        if name not in raw:
            raise reader.fail(f"{key}.{name}", "missing")
    bins = raw.get("time_bins") or ()
    if not isinstance(bins, list | tuple):
        raise reader.fail(
            f"{key}.time_bins", f"expected a list of bin edges in days, found {bins!r}"
        )
    try:
        return TaskSpec(
            name=str(raw.get("name", stage_name)),
            kind=str(raw["kind"]),
            modality=str(raw["modality"]),
            num_classes=int(raw.get("num_classes", 2)),
            time_bins=tuple(float(b) for b in bins),
            depends_on=raw.get("depends_on"),
        )
    except ValueError as error:
        raise reader.fail(key, str(error)) from error


def load_curriculum_mapping(raw: Any, source: str = "curriculum") -> Curriculum:
    """Validate a parsed curriculum mapping into a ``Curriculum``.

    Raises
    ------
    CurriculumError
        On any unknown key, wrong type, or inconsistent stage (for example a task
        that depends on a task no earlier stage adds).
    """
    reader = _Reader(source)
    top = reader.mapping(raw, "(top level)")
    reader.check_keys(top, "(top level)", ("name", "seed", "model", "defaults", "stages"))

    model = reader.mapping(top.get("model", {}), "model")
    reader.check_keys(model, "model", ("backbone", "pretrained"))
    backbone_raw = model.get("backbone", "tiny")
    try:
        if isinstance(backbone_raw, str):
            backbone = BackboneConfig.preset(backbone_raw)
        else:
            fields = dict(reader.mapping(backbone_raw, "model.backbone"))
            for name in ("blocks_down",):
                if name in fields:
                    fields[name] = tuple(fields[name])
            backbone = BackboneConfig(**fields)
    except (TypeError, ValueError) as error:
        raise reader.fail(
            "model.backbone",
            f"{error}; use a preset name ('tiny', 'ctfm') or BackboneConfig fields",
        ) from error
    pretrained_raw = model.get("pretrained")
    pretrained = None
    if pretrained_raw:
        pretrained = Path(str(pretrained_raw))
        if not pretrained.is_absolute() and source not in ("curriculum",):
            pretrained = Path(source).parent / pretrained

    defaults_raw = reader.mapping(top.get("defaults", {}), "defaults")
    reader.check_keys(defaults_raw, "defaults", _SETTING_KEYS)
    defaults = _read_settings(reader, defaults_raw, "defaults", StageSettings())

    stages_raw = top.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise reader.fail("stages", f"expected a non-empty list of stages, found {stages_raw!r}")
    stages: list[Stage] = []
    seen_tasks: dict[str, TaskSpec] = {}
    for index, stage_value in enumerate(stages_raw):
        key = f"stages[{index}]"
        stage_raw = reader.mapping(stage_value, key)
        reader.check_keys(stage_raw, key, ("name", "task", *_SETTING_KEYS))
        raw_name = stage_raw.get("name")
        if not isinstance(raw_name, str) or not raw_name:
            raise reader.fail(f"{key}.name", f"expected a stage name, found {raw_name!r}")
        name = raw_name
        if any(s.name == name for s in stages):
            raise reader.fail(
                f"{key}.name", f"duplicate stage name {name!r}; stage names must be unique"
            )
        task = _read_task(reader, stage_raw.get("task"), f"{key}.task", name)
        if task.name in seen_tasks:
            raise reader.fail(
                f"{key}.task.name", f"task {task.name!r} is already added by an earlier stage"
            )
        if task.depends_on and task.depends_on not in seen_tasks:
            raise reader.fail(
                f"{key}.task.depends_on",
                f"{task.depends_on!r} is not added by an earlier stage; earlier tasks are {list(seen_tasks)}",
            )
        settings_raw = {k: v for k, v in stage_raw.items() if k not in ("name", "task")}
        settings = _read_settings(reader, settings_raw, key, defaults)
        seen_tasks[task.name] = task
        stages.append(Stage(name=name, task=task, settings=settings))

    seed = reader.number(top.get("seed", 0), "seed", int, minimum=0)
    return Curriculum(
        name=str(top.get("name", "curriculum")),
        seed=seed,
        backbone=backbone,
        pretrained=pretrained,
        stages=tuple(stages),
        source=Path(source) if source != "curriculum" else None,
    )


def load_curriculum(path: Path | str | None = None) -> Curriculum:
    """Read and validate a curriculum YAML file (the default curriculum when ``None``)."""
    path = Path(path) if path else DEFAULT_CURRICULUM
    if not path.is_file():
        raise CurriculumError(f"{path}: curriculum file not found; pass an existing YAML file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise CurriculumError(f"{path}: invalid YAML: {error}") from error
    return load_curriculum_mapping(raw, str(path))
