"""Running a whole federation on one machine through Flower's simulation engine.

The ServerApp and ClientApp are the ones hospitals deploy; only their settings are
passed in directly (``create_server_app(settings)``, ``create_client_app(sites)``)
because ``flwr.simulation.run_simulation`` hands the apps an empty run config.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from client.site_config import find_site_files, load_site_config
from client.validation import check_site
from server.app import ServerSettings, create_server_app
from server.curriculum import CurriculumError, load_curriculum, load_curriculum_mapping
from server.federation import StageFailed
from simulation.presets import PresetOptions, resolve_preset
from unicon_model.log import configure_logging, get_logger

logger = get_logger(__name__)


class SimulationError(RuntimeError):
    """A simulation that could not start or finish, with the fix."""


@dataclass(frozen=True)
class Variant:
    """One method run on the same sites: the UNICON setting or a baseline."""

    name: str
    label: str
    train: str = "new"
    consolidation: str = "none"
    isolated: bool = False
    joint: bool = False


UNICON = Variant("unicon", "UNICON (frozen backbone, new adapters and heads)")
BASELINES = (
    Variant(
        "sequential",
        "sequential fine-tuning (shared parameters train, no consolidation)",
        train="shared",
    ),
    Variant("isolated", "isolated per-task models (no transfer)", isolated=True),
    Variant("joint", "joint pooled training (all data in one place; upper bound)", joint=True),
)


@dataclass
class SimulationResult:
    """Output locations and timings of one simulation."""

    out_dir: Path
    registries: dict[str, Path] = field(default_factory=dict)
    wall_time_s: dict[str, float] = field(default_factory=dict)
    site_files: list[Path] = field(default_factory=list)


def _variant_curriculum(raw: dict, variant: Variant) -> list[dict]:
    """Return one or more curricula (isolated: one per stage) for a variant."""
    raw = {**raw, "defaults": {**raw.get("defaults", {})}}
    if variant.isolated:
        curricula = []
        for stage in raw["stages"]:
            task = {k: v for k, v in stage["task"].items() if k != "depends_on"}
            curricula.append(
                {
                    **raw,
                    "name": f"{raw.get('name', 'curriculum')}-{stage['name']}",
                    "stages": [{**stage, "task": task}],
                }
            )
        return curricula
    raw["defaults"]["train"] = variant.train
    raw["defaults"]["consolidation"] = variant.consolidation
    if variant is not UNICON:
        # A baseline overrides every stage, also stages that set their own mode.
        raw["stages"] = [
            {**stage, "train": variant.train, "consolidation": variant.consolidation}
            for stage in raw["stages"]
        ]
    return [raw]


def _run_flower(curriculum_file: Path, registry: Path, site_files: list[Path], run_id: str) -> None:
    from flwr.simulation import run_simulation

    from client.app import create_client_app

    # Every simulated node is registered before the ServerApp starts, so there is nothing to wait for.
    settings = ServerSettings(
        curriculum=curriculum_file, registry=registry, run_id=run_id, node_wait_s=0.0
    )
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, min(len(site_files), os.cpu_count() or 1)),
            "include_dashboard": False,
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            run_simulation(
                server_app=create_server_app(settings),
                client_app=create_client_app(site_files),
                num_supernodes=len(site_files),
                backend_config=backend_config,  # type: ignore[arg-type]
            )
        except StageFailed as error:
            raise SimulationError(str(error)) from error
    from server.registry import Registry

    versions = Registry(registry).versions()
    expected = len(load_curriculum(curriculum_file).stages)
    if len(versions) < expected:
        raise SimulationError(
            f"the federation stopped after {len(versions)} of {expected} stages; see the log in "
            f"{registry.parent / 'simulation.log'} for the stage that failed"
        )


def check_sites(site_files: list[Path]) -> None:
    """Run ``unicon site check`` on every site before round 1; raise on the first unusable one."""
    for path in site_files:
        report = check_site(load_site_config(path))
        if not report.ok:
            raise SimulationError(f"site {path} failed its check:\n{report.to_text()}")
        logger.info("site check passed: %s", path)


def run_preset(
    preset_name: str,
    options: PresetOptions,
    compare: bool = False,
) -> SimulationResult:
    """Build the preset's sites, run the federation (and baselines), write the report."""
    preset = resolve_preset(preset_name, options)
    out = options.out_dir
    out.mkdir(parents=True, exist_ok=True)
    configure_logging(log_file=out / "simulation.log")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    result = SimulationResult(out_dir=out)

    # Read the curriculum first: a typo in it must not cost the time of building sites.
    try:
        if options.curriculum is not None:
            raw = load_curriculum(options.curriculum).to_dict()
            if options.rounds is not None:
                for stage in raw["stages"]:
                    stage["rounds"] = options.rounds
        else:
            raw = preset.curriculum(options)
        load_curriculum_mapping(raw, str(options.curriculum or f"preset {preset_name}"))
    except CurriculumError as error:
        raise SimulationError(str(error)) from error

    started = time.monotonic()
    if options.sites_dir is not None:
        site_files = find_site_files(options.sites_dir)
        if not site_files:
            raise SimulationError(f"--sites-dir {options.sites_dir}: no site YAML files found")
    else:
        try:
            site_files = preset.build_sites(options, out / "sites")
        except (ValueError, OSError) as error:
            raise SimulationError(f"building the {preset_name} sites failed: {error}") from error
    result.site_files = site_files
    logger.info(
        "preset %s: %d sites built in %.1f s",
        preset_name,
        len(site_files),
        time.monotonic() - started,
    )
    check_sites(site_files)

    variants = [UNICON, *(BASELINES if compare else ())]
    for variant in variants:
        variant_start = time.monotonic()
        for part, curriculum_raw in enumerate(_variant_curriculum(raw, variant)):
            suffix = f"-{part}" if variant.isolated else ""
            curriculum_file = out / f"curriculum-{variant.name}{suffix}.yaml"
            curriculum_file.write_text(
                yaml.safe_dump(curriculum_raw, sort_keys=False), encoding="utf-8"
            )
            registry = out / (
                "registry" if variant is UNICON else f"baselines/{variant.name}{suffix}/registry"
            )
            logger.info("variant %s: running %s", variant.name, curriculum_file.name)
            if variant.joint:
                from simulation.joint import run_joint

                run_joint(load_curriculum(curriculum_file), site_files, registry)
                result.registries[variant.name] = registry
                continue
            _run_flower(
                curriculum_file,
                registry,
                site_files,
                run_id=f"{preset_name}-{variant.name}{suffix}",
            )
            result.registries[f"{variant.name}{suffix}"] = registry
        result.wall_time_s[variant.name] = round(time.monotonic() - variant_start, 1)

    from simulation.report import write_report

    write_report(result, preset_name, raw, variants)
    logger.info("report written to %s", out / "report.md")
    return result
