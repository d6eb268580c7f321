"""Admin operations on a registry: status, and export of one task for inference."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from server.registry import Registry, RegistryError, write_json_atomic
from unicon_model.metrics import AccuracyMatrix, MetricValue
from unicon_model.serialization import build_model, save_model
from unicon_model.spec import ModelSpec


def registry_status(registry_dir: Path) -> dict[str, Any]:
    """Collect the stages done, their versions, metrics per task and forgetting."""
    registry = Registry(registry_dir)
    versions = registry.versions()
    latest = registry.latest()
    status: dict[str, Any] = {
        "registry": str(registry_dir),
        "latest": latest.name if latest else None,
        "versions": [],
        "accuracy_matrix": None,
    }
    for info in versions:
        metrics = registry.read_json(info, "metrics.json")
        status["versions"].append(
            {
                "version": info.name,
                "stage": info.stage,
                "version_id": info.version_id,
                "created": info.created,
                "sites": metrics.get("sites", []),
                "pooled": metrics.get("pooled", {}),
                "task": metrics.get("task"),
                "privacy": stage_privacy(metrics),
                "central_dp": metrics.get("central_dp"),
            }
        )
    if latest is not None:
        matrix = AccuracyMatrix.from_rows(
            registry.read_json(latest, "accuracy_matrix.json")["rows"]
        )
        status["accuracy_matrix"] = matrix.to_rows()
        status["backward_transfer"] = _plain(matrix.backward_transfer())
        status["forgetting"] = {t: _plain(v) for t, v in matrix.forgetting().items()}
    return status


def stage_privacy(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Collect the DP-SGD figures each site reported during one stage.

    Reads the per-round ``site_metrics`` and ``declined`` of a version's
    ``metrics.json``. A site reports ``dp-epsilon``, ``dp-delta``,
    ``dp-noise-multiplier``, ``dp-steps`` and ``dp-sample-rate`` in every round it
    trains with DP-SGD. Its ``dp-epsilon`` is the total spent on the stage's task over
    the site's whole privacy ledger, earlier runs included, so the last value is the
    total at the end of the stage.

    Parameters
    ----------
    metrics : Mapping
        The content of one version's ``metrics.json``.

    Returns
    -------
    dict
        Per site that trained or declined in a round: ``dp`` (True when the site
        trained with DP-SGD, False when it trained without, None when it declined
        every round), ``rounds_trained`` and ``rounds_declined`` (round number to
        reason). With ``dp`` True also ``epsilon``, ``delta``, ``noise_multiplier``
        and ``sample_rate`` of the last round trained, and ``steps``, the DP-SGD
        steps summed over the stage's rounds.
    """
    sites: dict[str, dict[str, Any]] = {}

    def entry(site: str) -> dict[str, Any]:
        return sites.setdefault(site, {"dp": None, "rounds_trained": [], "rounds_declined": {}})

    for round_record in metrics.get("rounds", []):
        server_round = int(round_record["round"])
        for site, reason in sorted(round_record.get("declined", {}).items()):
            entry(site)["rounds_declined"][str(server_round)] = str(reason)
        for site in round_record.get("accepted", []):
            site_metrics = round_record.get("site_metrics", {}).get(site, {})
            record = entry(site)
            record["rounds_trained"].append(server_round)
            if "dp-epsilon" not in site_metrics:
                # A site either has DP on or off for a whole stage; None stays for declines.
                record["dp"] = bool(record["dp"])
                continue
            record["dp"] = True
            record["epsilon"] = float(site_metrics["dp-epsilon"])
            record["delta"] = _optional_float(site_metrics.get("dp-delta"))
            record["noise_multiplier"] = _optional_float(site_metrics.get("dp-noise-multiplier"))
            record["sample_rate"] = _optional_float(site_metrics.get("dp-sample-rate"))
            record["steps"] = record.get("steps", 0) + int(site_metrics.get("dp-steps", 0))
    return {site: sites[site] for site in sorted(sites)}


def _optional_float(value: Any) -> float | None:
    # None rather than NaN keeps `status_json` valid JSON.
    return None if value is None else float(value)


def _plain(value: MetricValue) -> dict[str, Any]:
    return {"value": value.value, "reason": value.reason}


def _cell(value: MetricValue) -> str:
    return "-" if value.value is None else f"{value.value:.3f}"


def format_status(status: dict[str, Any]) -> str:
    """Render ``registry_status`` as a readable text table."""
    if not status["versions"]:
        return f"Registry {status['registry']}: no completed stage yet."
    lines = [f"Registry {status['registry']} (latest: {status['latest']})", ""]
    lines.append(f"{'version':<22} {'stage':<14} {'id':<14} {'created':<21} sites")
    for version in status["versions"]:
        lines.append(
            f"{version['version']:<22} {version['stage']:<14} {version['version_id'][:12]:<14} "
            f"{version['created']:<21} {', '.join(version['sites'])}"
        )
    matrix = AccuracyMatrix.from_rows(status["accuracy_matrix"])
    lines += ["", "Accuracy matrix (rows: after stage; columns: task; AUC, C-index or Dice)"]
    width = max(12, *(len(t) + 2 for t in matrix.tasks))
    lines.append(f"{'after stage':<14}" + "".join(f"{t:>{width}}" for t in matrix.tasks))
    for stage in matrix.stages:
        lines.append(
            f"{stage:<14}"
            + "".join(f"{_cell(matrix.get(stage, t)):>{width}}" for t in matrix.tasks)
        )
    bwt = status["backward_transfer"]
    lines.append("")
    lines.append(
        "Backward transfer: "
        + (f"{bwt['value']:.4f}" if bwt["value"] is not None else f"undefined ({bwt['reason']})")
    )
    forgetting = ", ".join(
        f"{t} {v['value']:.4f}" if v["value"] is not None else f"{t} undefined"
        for t, v in status["forgetting"].items()
    )
    lines.append(f"Forgetting per task: {forgetting}")
    lines += [
        "",
        "Privacy (DP-SGD epsilon per site on each stage's task, total over the site's ledger)",
    ]
    for version in status["versions"]:
        cells = [
            f"{site} {_privacy_cell(figures)}"
            for site, figures in version.get("privacy", {}).items()
        ]
        central = version.get("central_dp")
        if central:
            epsilon = central.get("epsilon")
            cells.append(
                "central DP "
                + (f"epsilon {epsilon:.2f}" if epsilon is not None else "without noise")
            )
        lines.append(f"{version['stage']:<14} " + (", ".join(cells) or "no site trained"))
    return "\n".join(lines)


def _privacy_cell(figures: Mapping[str, Any]) -> str:
    if figures["dp"] is None:
        return "declined every round"
    if not figures["dp"]:
        return "no DP"
    delta = figures.get("delta")
    return f"epsilon {figures['epsilon']:.2f}" + (f" (delta {delta:.0e})" if delta else "")


def export_task(registry_dir: Path, task: str, out_dir: Path) -> Path:
    """Write the spec and weights a hospital needs to run one task for inference.

    The exported model holds the backbone, the task's stem, adapters and head only;
    other tasks' modules are left out, and ``depends_on`` is dropped because the
    task already holds its own copy of what it started from.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RegistryError(
            f"--out {out_dir}: already exists and is not an empty folder; pass a new folder "
            "(an export never overwrites files)"
        )
    if not registry_dir.is_dir():
        raise RegistryError(
            f"--registry {registry_dir}: folder not found; pass the registry folder of a run"
        )
    registry = Registry(registry_dir)
    latest = registry.latest()
    if latest is None:
        raise RegistryError(f"{registry_dir}: no version found in the registry; run a stage first")
    model = registry.load_model(latest)
    spec = model.spec
    chosen = [t for t in spec.tasks if t.name == task]
    if not chosen:
        raise RegistryError(
            f"task {task!r} is not in version {latest.name}; tasks are {[t.name for t in spec.tasks]}"
        )
    single = ModelSpec(
        backbone=spec.backbone, tasks=(dataclasses.replace(chosen[0], depends_on=None),)
    )
    exported = build_model(single)
    source = model.state_dict()
    target = exported.state_dict()
    missing = [k for k in target if k not in source]
    if missing:
        raise RegistryError(
            f"version {latest.name} lacks parameters {missing[:5]} of task {task!r}"
        )
    exported.load_state_dict({k: source[k] for k in target})
    save_model(exported, out_dir)
    write_json_atomic(
        out_dir / "export.json",
        {
            "task": task,
            "from_version": latest.name,
            "version_id": latest.version_id,
            "preprocess": _task_preprocess(registry.read_json(latest, "curriculum.json"), task),
            "input": "float32 (B, C, D, H, W) in RAS orientation at `preprocess.spacing`; "
            "CT: Hounsfield window scaled to [0, 1]; PET: SUV / suv_scale; petct: channels [CT, PET]",
            "load": "unicon_model.serialization.load_model(folder), then model(images, task)",
        },
    )
    return out_dir


def _task_preprocess(curriculum: dict[str, Any], task: str) -> dict[str, Any] | None:
    """Return the preprocessing of the stage that trained ``task``, from a curriculum snapshot."""
    for stage in curriculum.get("stages", []):
        if stage.get("task", {}).get("name") == task:
            preprocess: dict[str, Any] = stage.get("preprocess", {})
            return preprocess
    return None


def status_json(registry_dir: Path) -> str:
    """Return ``registry_status`` as indented JSON."""
    return json.dumps(registry_status(registry_dir), indent=2)
