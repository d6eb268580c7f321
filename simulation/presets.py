"""Simulation presets: which virtual sites to build and how the curriculum is sized.

A preset is a recipe, not data: it builds its sites into the run's output folder
(generated studies, or manifests that point at real studies) and writes the
curriculum the run uses next to them, so a run folder is self-describing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from server.curriculum import DEFAULT_CURRICULUM


class PresetError(ValueError):
    """A preset that cannot run with the given options, with the fix."""


@dataclass(frozen=True)
class PresetOptions:
    """User overrides that every preset accepts."""

    out_dir: Path
    num_sites: int | None = None
    rounds: int | None = None
    seed: int = 0
    data_dir: Path | None = None
    sites_dir: Path | None = None
    curriculum: Path | None = None


@dataclass(frozen=True)
class Preset:
    """A named recipe for sites and curriculum."""

    name: str
    description: str
    default_sites: int
    build_sites: Callable[[PresetOptions, Path], list[Path]]
    curriculum: Callable[[PresetOptions], dict[str, Any]]
    needs_data: bool = False


def _default_curriculum() -> dict[str, Any]:
    return dict(yaml.safe_load(DEFAULT_CURRICULUM.read_text(encoding="utf-8")))


def _with_overrides(raw: dict[str, Any], options: PresetOptions, **defaults: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    raw["seed"] = options.seed
    raw.setdefault("defaults", {}).update(defaults)
    if options.rounds is not None:
        raw["defaults"]["rounds"] = options.rounds
        for stage in raw["stages"]:
            stage.pop("rounds", None)
    return raw


def _generated_sites(tiny: bool) -> Callable[[PresetOptions, Path], list[Path]]:
    def build(options: PresetOptions, sites_root: Path) -> list[Path]:
        from simulation.generate import generate_federation

        num_sites = options.num_sites or (3 if tiny else 4)
        return generate_federation(sites_root, num_sites=num_sites, seed=options.seed, tiny=tiny)

    return build


def _demo_curriculum(options: PresetOptions) -> dict[str, Any]:
    return _with_overrides(_default_curriculum(), options)


def _smoke_curriculum(options: PresetOptions) -> dict[str, Any]:
    raw = _with_overrides(
        _default_curriculum(),
        options,
        rounds=options.rounds or 1,
        local_epochs=1,
        batch_size=2,
        min_sites=1,
        timeout_s=600,
    )
    raw["defaults"]["preprocess"] = {
        **raw["defaults"].get("preprocess", {}),
        "patch_size": [16, 16, 16],
    }
    return raw


def _real_sample_sites(options: PresetOptions, sites_root: Path) -> list[Path]:
    from simulation.real_sites import build_real_sample_sites

    assert options.data_dir is not None  # checked by resolve_preset
    return build_real_sample_sites(
        options.data_dir, sites_root, num_sites=options.num_sites or 3, seed=options.seed
    )


def _real_sample_curriculum(options: PresetOptions) -> dict[str, Any]:
    raw = _with_overrides(_default_curriculum(), options, min_sites=1, local_epochs=1, batch_size=2)
    raw["name"] = "real-sample"
    # The real sample holds no survival cohort with images, so the prognosis stage is left out.
    raw["stages"] = [s for s in raw["stages"] if s["name"] != "ct_prog"]
    raw["defaults"]["preprocess"] = {**raw["defaults"]["preprocess"], "spacing": [4.0, 4.0, 4.0]}
    for stage in raw["stages"]:
        if stage["name"] == "ct_cls":
            # AdrenalMNIST3D volumes are 28^3 voxels of about 2.3 mm.
            stage["preprocess"] = {"spacing": [2.0, 2.0, 2.0], "patch_size": [32, 32, 32]}
    return raw


def _adrenal_sites(options: PresetOptions, sites_root: Path) -> list[Path]:
    from simulation.real_sites import build_adrenal_sites

    assert options.data_dir is not None  # checked by resolve_preset
    return build_adrenal_sites(
        options.data_dir, sites_root, num_sites=options.num_sites or 4, seed=options.seed
    )


def _adrenal_curriculum(options: PresetOptions) -> dict[str, Any]:
    raw = _with_overrides(
        _default_curriculum(),
        options,
        rounds=options.rounds or 5,
        local_epochs=2,
        batch_size=16,
        min_sites=2,
    )
    raw["name"] = "adrenal"
    raw["stages"] = [
        {
            "name": "ct_cls",
            "task": {"kind": "classification", "modality": "ct", "num_classes": 2},
            "preprocess": {"spacing": [2.0, 2.0, 2.0], "patch_size": [32, 32, 32]},
        }
    ]
    return raw


PRESETS: dict[str, Preset] = {
    "demo": Preset(
        "demo",
        "four virtual hospitals with generated CT and PET/CT studies, default curriculum",
        4,
        _generated_sites(tiny=False),
        _demo_curriculum,
    ),
    "smoke": Preset(
        "smoke",
        "the demo path at the smallest settings (three tiny sites, one round per stage)",
        3,
        _generated_sites(tiny=True),
        _smoke_curriculum,
    ),
    "real-sample": Preset(
        "real-sample",
        "virtual hospitals built from the real studies (AdrenalMNIST3D, LUNG1, TotalSegmentator, STS)",
        3,
        _real_sample_sites,
        _real_sample_curriculum,
        needs_data=True,
    ),
    "adrenal": Preset(
        "adrenal",
        "AdrenalMNIST3D across four non-IID sites, evaluated on the official test split",
        4,
        _adrenal_sites,
        _adrenal_curriculum,
        needs_data=True,
    ),
}


def resolve_preset(name: str, options: PresetOptions) -> Preset:
    """Return the preset ``name`` after checking that its options are usable."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
    preset = PRESETS[name]
    if preset.needs_data and options.sites_dir is None:
        if options.data_dir is None:
            raise PresetError(
                f"preset {name!r} builds its sites from real studies; pass --data DIR "
                "(for example --data ../shared/data/real)"
            )
        if not options.data_dir.is_dir():
            raise PresetError(
                f"--data {options.data_dir}: folder not found; pass the folder of the real studies"
            )
    return preset
