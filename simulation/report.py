"""The simulation report: ``report.md``, long-format CSVs and PNG plots.

Everything here is read back from the registries the run wrote, so the report of
a run folder can be rebuilt at any time (``unicon simulate --report-only``).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from server.registry import Registry
from unicon_model.log import get_logger
from unicon_model.metrics import AccuracyMatrix, MetricValue

if TYPE_CHECKING:
    from simulation.runner import SimulationResult, Variant

logger = get_logger(__name__)


@dataclass
class VariantSummary:
    """The figures of one method in the comparison table."""

    name: str
    label: str
    final: dict[str, MetricValue]
    average: MetricValue
    backward_transfer: MetricValue
    forgetting: dict[str, MetricValue]
    bytes_total: int
    wall_time_s: float


def _fmt(value: MetricValue | float | None, digits: int = 3) -> str:
    if isinstance(value, MetricValue):
        if value.value is None:
            return f"undefined ({value.reason})" if value.reason else "undefined"
        value = value.value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{value:.{digits}f}"


def _mean(values: dict[str, MetricValue]) -> MetricValue:
    defined = [v.value for v in values.values() if v.value is not None]
    return (
        MetricValue(sum(defined) / len(defined), None)
        if defined
        else MetricValue(None, "no task defined")
    )


def _or_nan(value: float | None) -> float:
    return math.nan if value is None else value


def _human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


def _site_names(site_files: Sequence[Path]) -> list[str]:
    from client.site_config import load_site_config

    return [load_site_config(path).site for path in site_files]


def stage_reports(registry: Path) -> list[dict[str, Any]]:
    """Return the ``metrics.json`` of every version of a registry, in stage order."""
    reg = Registry(registry)
    return [reg.read_json(v, "metrics.json") for v in reg.versions()]


def final_matrix(registry: Path) -> AccuracyMatrix:
    """Return the accuracy matrix of a registry's latest version."""
    reg = Registry(registry)
    latest = reg.latest()
    if latest is None:
        return AccuracyMatrix()
    return AccuracyMatrix.from_rows(reg.read_json(latest, "accuracy_matrix.json")["rows"])


def _bytes_total(reports: Sequence[dict[str, Any]]) -> int:
    total = 0
    for report in reports:
        for round_record in report["rounds"]:
            total += sum(round_record["bytes_sent"].values()) + sum(
                round_record["bytes_received"].values()
            )
    return total


def summarize_variant(
    name: str, label: str, registries: Sequence[Path], wall_time_s: float
) -> VariantSummary:
    """Combine one method's registries (one, or one per stage when isolated) into a summary."""
    reports = [r for registry in registries for r in stage_reports(registry)]
    if name == "joint":
        matrix = final_matrix(registries[0])
        final = {t: matrix.get(matrix.stages[-1], t) for t in matrix.tasks}
        reason = "all tasks trained at once, so nothing comes before or after"
        return VariantSummary(
            name,
            label,
            final,
            _mean(final),
            MetricValue(None, reason),
            {t: MetricValue(None, reason) for t in final},
            0,
            wall_time_s,
        )
    if len(registries) == 1:
        matrix = final_matrix(registries[0])
        final = {t: matrix.get(matrix.stages[-1], t) for t in matrix.tasks} if matrix.stages else {}
        bwt = matrix.backward_transfer()
        forgetting = matrix.forgetting()
        average = matrix.average_final()
    else:
        # Isolated models never revisit a task, so there is nothing to forget or transfer.
        final = {}
        for registry in registries:
            matrix = final_matrix(registry)
            for task in matrix.tasks:
                final[task] = matrix.get(matrix.stages[-1], task)
        defined = [v.value for v in final.values() if v.value is not None]
        average = (
            MetricValue(sum(defined) / len(defined), None)
            if defined
            else MetricValue(None, "no task defined")
        )
        bwt = MetricValue(None, "isolated models are never updated after their stage")
        forgetting = {t: MetricValue(None, "isolated model") for t in final}
    return VariantSummary(
        name, label, final, average, bwt, forgetting, _bytes_total(reports), wall_time_s
    )


def write_metrics_csv(path: Path, reports: Sequence[dict[str, Any]]) -> int:
    """Write long-format metrics (stage, round, site, task, metric, value); return the row count."""
    rows: list[list[Any]] = []
    for report in reports:
        stage, task = report["stage"], report["task"]
        for round_record in report["rounds"]:
            for site, metrics in sorted(round_record["site_metrics"].items()):
                for metric, value in sorted(metrics.items()):
                    rows.append([stage, round_record["round"], site, task, metric, value])
            for site, count in sorted(round_record["bytes_sent"].items()):
                rows.append([stage, round_record["round"], site, task, "bytes-sent", count])
            for site, count in sorted(round_record["bytes_received"].items()):
                rows.append([stage, round_record["round"], site, task, "bytes-received", count])
        for site, evaluation in sorted(report["evaluation"].items()):
            for key, value in sorted(evaluation["metrics"].items()):
                eval_task, _, metric = key.partition(".")
                rows.append([stage, "end", site, eval_task, metric, value])
            for key, reason in sorted(evaluation.get("undefined", {}).items()):
                eval_task, _, metric = key.partition(".")
                rows.append([stage, "end", site, eval_task, metric, f"undefined: {reason}"])
        for pooled_task, pooled in sorted(report["pooled"].items()):
            value = pooled.get("value")
            rows.append(
                [
                    stage,
                    "end",
                    "pooled",
                    pooled_task,
                    pooled["metric"],
                    value if value is not None else f"undefined: {pooled.get('reason')}",
                ]
            )
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stage", "round", "site", "task", "metric", "value"])
        writer.writerows(rows)
    return len(rows)


def write_matrix_csv(path: Path, matrix: AccuracyMatrix) -> None:
    """Write the accuracy matrix: one row per stage, one column per task."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["stage", *matrix.tasks])
        for stage in matrix.stages:
            cells = []
            for task in matrix.tasks:
                value = matrix.get(stage, task)
                cells.append("" if value.value is None else f"{value.value:.6f}")
            writer.writerow([stage, *cells])


def plot_matrix(path: Path, matrix: AccuracyMatrix) -> None:
    """Heatmap of the accuracy matrix (blank cells: task not learned yet or undefined)."""
    data: list[list[float]] = [
        [_or_nan(matrix.get(s, t).value) for t in matrix.tasks] for s in matrix.stages
    ]
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(matrix.tasks), 1.2 + 0.8 * len(matrix.stages)))
    image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(matrix.tasks)), matrix.tasks, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.stages)), [f"after {s}" for s in matrix.stages])
    for i, row in enumerate(data):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    color="white" if value < 0.6 else "black",
                )
    fig.colorbar(image, ax=ax, label="task metric (AUC, C-index or Dice)")
    ax.set_title("Accuracy matrix (stage x task)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tasks_across_stages(path: Path, matrices: dict[str, AccuracyMatrix]) -> None:
    """One line per task and method: the task's metric after each stage."""
    fig, ax = plt.subplots(figsize=(7, 4))
    styles = ["-", "--", ":", "-."]
    for index, (name, matrix) in enumerate(matrices.items()):
        for task in matrix.tasks:
            xs, ys = [], []
            for position, stage in enumerate(matrix.stages):
                value = matrix.get(stage, task).value
                if value is not None:
                    xs.append(position)
                    ys.append(value)
            if xs:
                ax.plot(xs, ys, styles[index % len(styles)], marker="o", label=f"{task} ({name})")
        ax.set_xticks(range(len(matrix.stages)), matrix.stages)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("after stage")
    ax.set_ylabel("task metric")
    ax.set_title("Metric of each task across stages")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(path: Path, reports: Sequence[dict[str, Any]]) -> None:
    """Bytes sent per round and site against what full-model FedAvg would send."""
    labels, sent, full = [], [], []
    for report in reports:
        for round_record in report["rounds"]:
            sites = max(1, len(round_record["bytes_sent"]))
            labels.append(f"{report['stage']}\nr{round_record['round']}")
            sent.append(sum(round_record["bytes_sent"].values()) / sites)
            full.append(report["full_model_bytes"])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels)), 4))
    positions = range(len(labels))
    ax.bar([p - 0.2 for p in positions], sent, width=0.4, label="sent per site (UNICON-FL)")
    ax.bar([p + 0.2 for p in positions], full, width=0.4, label="full model (FedAvg)")
    ax.set_yscale("log")
    ax.set_xticks(list(positions), labels, fontsize=7)
    ax.set_ylabel("bytes per site and round")
    ax.set_title("Bytes on the wire, server to site")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ctfm_bytes(curriculum_raw: dict[str, Any]) -> list[tuple[str, int, int]]:
    """Trainable and full-model bytes per stage at the ``ctfm`` backbone size.

    Computed from the model spec (parameter counts times 4 bytes of float32), not
    measured on messages: a ``ctfm`` model is only built, never trained, here.
    """
    from server.curriculum import load_curriculum_mapping
    from unicon_model.model import UniconModel
    from unicon_model.spec import BackboneConfig

    curriculum = load_curriculum_mapping(curriculum_raw, "ctfm-estimate")
    model = UniconModel(BackboneConfig.preset("ctfm"))
    rows = []
    for stage in curriculum.stages:
        model.grow(stage.task)
        sets = model.trainable_sets(
            stage.task.name, finetune_shared=stage.settings.train == "shared"
        )
        names = set(sets.new + (sets.shared if stage.settings.train == "shared" else []))
        shapes = {n: p for n, p in model.state_dict().items()}
        trainable = sum(shapes[n].numel() * shapes[n].element_size() for n in names)
        full = sum(v.numel() * v.element_size() for v in shapes.values())
        rows.append((stage.name, int(trainable), int(full)))
    return rows


def privacy_lines(reports: Sequence[dict[str, Any]]) -> list[str]:
    """Return the report's "Privacy" section: DP-SGD figures per site and task.

    One row per stage and site that trained or declined in the stage, read from the
    registry's ``metrics.json`` by `server.admin.stage_privacy`. Sites that trained
    without DP-SGD are listed as "no DP".
    """
    from server.admin import stage_privacy

    lines = [
        "",
        "## Privacy",
        "",
        "| stage | task | site | epsilon | delta | noise multiplier | DP-SGD steps | rounds trained | rounds declined |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        for site, figures in stage_privacy(report).items():
            trained = ", ".join(str(number) for number in figures["rounds_trained"]) or "none"
            declined = (
                "; ".join(
                    f"{server_round}: {reason}".replace("|", "\\|")
                    for server_round, reason in figures["rounds_declined"].items()
                )
                or "none"
            )
            if figures["dp"]:
                cells = [
                    _fmt(figures["epsilon"]),
                    f"{figures['delta']:.0e}" if figures.get("delta") else "undefined",
                    _fmt(figures.get("noise_multiplier")),
                    str(figures["steps"]),
                ]
            else:
                label = "no DP" if figures["dp"] is False else "unknown (declined every round)"
                cells = [label, "-", "-", "-"]
            lines.append(
                f"| {report['stage']} | {report['task']} | {site} | "
                + " | ".join(cells)
                + f" | {trained} | {declined} |"
            )
    central = [report for report in reports if report.get("central_dp")]
    if central:
        lines += [
            "",
            "Central DP at the server (each site's update clipped, Gaussian noise on the aggregate):",
            "",
            "| stage | noise multiplier | clipping norm | noisy aggregates | delta | site-level epsilon |",
            "|---|---|---|---|---|---|",
        ]
        for report in central:
            figures = report["central_dp"]
            epsilon = figures.get("epsilon")
            lines.append(
                f"| {report['stage']} | {figures['noise_multiplier']:.3f} | "
                f"{figures['clipping_norm']:.3g} | {figures['releases']} | "
                f"{figures['delta']:.0e} | "
                + (_fmt(epsilon) if epsilon is not None else "unbounded (no noise)")
                + " |"
            )
    lines += [
        "",
        "Epsilon is the site's total for the task at the end of the stage, computed by its",
        "privacy ledger with Opacus's RDP accountant over every DP-SGD round ever run on the",
        "task's data, earlier runs included; steps count this stage's rounds only. Epsilon is",
        "accounted per task: when two tasks train on the same patients, a patient's total",
        "privacy loss is the composition of both tasks' rounds, which is larger.",
    ]
    return lines


def write_report(
    result: SimulationResult,
    preset: str,
    curriculum_raw: dict[str, Any],
    variants: Sequence[Variant],
) -> Path:
    """Write report.md, metrics.csv, accuracy_matrix.csv and the plots into the run folder."""
    out = result.out_dir
    main_registry = result.registries["unicon"]
    reports = stage_reports(main_registry)
    matrix = final_matrix(main_registry)
    rows_written = write_metrics_csv(out / "metrics.csv", reports)
    write_matrix_csv(out / "accuracy_matrix.csv", matrix)
    plot_matrix(out / "accuracy_matrix.png", matrix)
    plot_bytes(out / "bytes_per_round.png", reports)

    summaries = []
    matrices = {"unicon": matrix}
    for variant in variants:
        registries = [
            p
            for key, p in result.registries.items()
            if key == variant.name or key.startswith(f"{variant.name}-")
        ]
        summaries.append(
            summarize_variant(
                variant.name, variant.label, registries, result.wall_time_s.get(variant.name, 0.0)
            )
        )
        if variant.name == "sequential":
            matrices["sequential"] = final_matrix(registries[0])
    plot_tasks_across_stages(out / "tasks_across_stages.png", matrices)

    lines = [f"# UNICON-FL simulation report: preset `{preset}`", ""]
    lines += [
        f"- sites: {len(result.site_files)} ({', '.join(_site_names(result.site_files))})",
        f"- stages: {', '.join(r['stage'] for r in reports)}",
        "- wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.wall_time_s.items()),
        f"- registry: `{main_registry.relative_to(out)}`; long-format metrics: `metrics.csv` ({rows_written} rows)",
        "",
        "Metrics: classification AUC, prognosis Harrell's C-index, segmentation mean foreground Dice,",
        "each the mean over the sites that evaluated the task, weighted by their evaluation cases.",
        "A site evaluates on its test split, or on its validation split when it has no test cases.",
        "",
        "## Per stage",
        "",
        "| stage | task | sites | excluded | trainable / total parameters | rounds | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for report in reports:
        excluded = (
            ", ".join(f"{s} ({why})" for s, why in report["excluded_sites"].items()) or "none"
        )
        lines.append(
            f"| {report['stage']} | {report['task']} | {', '.join(report['sites'])} | {excluded} | "
            f"{report['trainable_parameters']:,} / {report['total_parameters']:,} | {len(report['rounds'])} | "
            f"{report['wall_time_s']:.0f} s |"
        )
    lines += ["", "## Accuracy matrix (rows: after stage; columns: task)", ""]
    lines += [
        "| after stage | " + " | ".join(matrix.tasks) + " |",
        "|---|" + "---|" * len(matrix.tasks),
    ]
    for stage in matrix.stages:
        cells = []
        for task in matrix.tasks:
            value = matrix.get(stage, task)
            cells.append(
                "" if value.value is None and value.reason == "not evaluated" else _fmt(value)
            )
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    forgetting = matrix.forgetting()
    if reports:
        cases = ", ".join(
            f"{task} {pooled.get('cases', 0)} at {pooled.get('sites', 0)} sites"
            for task, pooled in reports[-1]["pooled"].items()
        )
        lines += ["", f"Evaluation cases behind the last row: {cases}."]
    lines += [
        "",
        f"Backward transfer: {_fmt(matrix.backward_transfer())}. Average final metric: {_fmt(matrix.average_final())}.",
        "Forgetting per task (best earlier value minus final value; 0 means nothing was lost): "
        + ", ".join(f"{t} {_fmt(v)}" for t, v in forgetting.items()),
        "",
        "![accuracy matrix](accuracy_matrix.png)",
        "",
        "## Per-site evaluation after the last stage",
        "",
    ]
    if reports:
        last = reports[-1]
        lines += ["| site | metric | value |", "|---|---|---|"]
        for site, evaluation in sorted(last["evaluation"].items()):
            for key, value in sorted(evaluation["metrics"].items()):
                lines.append(f"| {site} | {key} | {value:.4g} |")
            for key, reason in sorted(evaluation.get("undefined", {}).items()):
                lines.append(f"| {site} | {key} | undefined: {reason} |")
    lines += [
        "",
        "## Bytes on the wire",
        "",
        "| stage | round | sent per site | received per site | full model (FedAvg) |",
        "|---|---|---|---|---|",
    ]
    for report in reports:
        for round_record in report["rounds"]:
            sites = max(1, len(round_record["bytes_sent"]))
            received_sites = max(1, len(round_record["bytes_received"]))
            lines.append(
                f"| {report['stage']} | {round_record['round']} | {_human_bytes(sum(round_record['bytes_sent'].values()) / sites)} | "
                f"{_human_bytes(sum(round_record['bytes_received'].values()) / received_sites)} | {_human_bytes(report['full_model_bytes'])} |"
            )
    lines += [
        "",
        "Round 1 of a stage also carries the frozen groups a site does not hold yet; later rounds carry",
        "only the stage's trainable tensors.",
        "",
        "![bytes per round](bytes_per_round.png)",
        "",
        "At the `ctfm` backbone size (computed from the model spec, float32, not measured):",
        "",
        "| stage | trainable bytes per round | full model | ratio |",
        "|---|---|---|---|",
    ]
    try:
        for stage, trainable, full in ctfm_bytes(curriculum_raw):
            lines.append(
                f"| {stage} | {_human_bytes(trainable)} | {_human_bytes(full)} | {full / max(1, trainable):.0f}x |"
            )
    except Exception as error:  # the estimate must never cost the run its report
        logger.warning("ctfm byte estimate failed: %s", error)
        lines.append(f"| (estimate failed: {error}) | | | |")

    lines += privacy_lines(reports)
    lines += ["", "## Methods compared on the same sites and seed", ""]
    tasks = matrix.tasks
    lines += [
        "| method | "
        + " | ".join(tasks)
        + " | average | backward transfer | max forgetting | bytes | time |",
        "|---|" + "---|" * (len(tasks) + 5),
    ]
    for summary in summaries:
        defined_forgetting = [v.value for v in summary.forgetting.values() if v.value is not None]
        max_forgetting = max(defined_forgetting) if defined_forgetting else None
        lines.append(
            f"| {summary.label} | "
            + " | ".join(_fmt(summary.final.get(t, MetricValue(None, "not run"))) for t in tasks)
            + f" | {_fmt(summary.average)} | {_fmt(summary.backward_transfer)} | {_fmt(max_forgetting)} | "
            f"{_human_bytes(summary.bytes_total)} | {summary.wall_time_s:.0f} s |"
        )
    if len(summaries) == 1:
        lines += [
            "",
            "Run with `--compare` to add sequential fine-tuning and isolated per-task training.",
        ]
    lines += ["", "![metric per task across stages](tasks_across_stages.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
