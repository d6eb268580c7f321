"""Benchmark: ct_cls task metric against the DP-SGD epsilon of every site.

The privacy settings are target epsilon 1, 4 and 8 at every site, and no DP. For each
setting and seed, the benchmark generates the same virtual hospitals
(``simulation.generate``) and runs the ``ct_cls`` stage through Flower's simulation
engine. It then evaluates the final model. It prints one table and writes
``OUT/privacy_benchmark.csv`` with one row per setting and seed.

By default the sites, the stage settings and the backbone are the ``demo`` preset's:
four hospitals of 56-72 cases, 8 rounds of 3 local epochs, and the tiny backbone
pretrained on generated phantoms (cached in ``<parent of OUT>/.pretrained/``, as the
presets do). Without DP this stage learns (test AUC about 0.7), so the cost of each
epsilon can be read against it. ``--tiny`` runs the default curriculum's stage on tiny
sites with a random backbone instead. That checks that the pipeline runs and measures
nothing.

Two metrics are reported. ``site_auc`` is what the federation itself records: the mean
of the sites' test AUCs, weighted by test cases, over the sites where AUC is defined.
``pooled_auc`` and ``pooled_accuracy`` are computed here on the union of all sites'
test cases, which only a simulation can see; it is less noisy on small sites.

Run from the repository root::

    .venv/bin/python -m simulation.bench_privacy --out runs/bench-privacy

This is a benchmark, not a test: it runs one federation per setting and seed, and takes
minutes on a CPU.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader

from server.federation import StageFailed
from simulation.bench import int_at_least
from simulation.presets import DEMO_CASES_PER_SITE
from unicon_model.log import configure_logging, get_logger

logger = get_logger(__name__)

TASK = "ct_cls"
DEFAULT_EPSILONS = (1.0, 4.0, 8.0)
DEFAULT_DELTA = 1.0e-5
CSV_NAME = "privacy_benchmark.csv"


@dataclass(frozen=True)
class BenchRow:
    """Outcome of one federation: one privacy setting and one seed."""

    setting: str
    target_epsilon: float | None
    seed: int
    epsilon_spent_max: float | None
    noise_multiplier_mean: float | None
    dp_steps_per_site: int | None
    declined_rounds: int
    site_auc: float | None
    pooled_auc: float | None
    pooled_accuracy: float | None
    test_cases: int
    wall_time_s: float
    batch_size: int = 0
    min_train_cases: int = 0
    """Minimum number of ``ct_cls`` training cases over the sites. Under DP-SGD, each sample of
    that site costs the most privacy."""


def bench_curriculum(
    rounds: int | None, seed: int, num_sites: int, demo_out: Path | None = None
) -> dict[str, Any]:
    """Return a curriculum reduced to its ``ct_cls`` stage.

    With ``demo_out``, it is the ``demo`` preset's curriculum for the output folder
    ``demo_out``, so it names the pretrained backbone and sets the demo's rounds, local
    epochs and learning rate. The backbone is pretrained, or reused from
    ``<parent of demo_out>/.pretrained``. Without it, the default curriculum with a
    random backbone. Every site must take part in every round (``min_sites`` equals the
    number of sites), so that a setting where a site declines fails loudly instead of
    averaging fewer sites.
    """
    from server.curriculum import DEFAULT_CURRICULUM
    from simulation.presets import PRESETS, PresetOptions

    raw: dict[str, Any]
    if demo_out is not None:
        options = PresetOptions(out_dir=demo_out, rounds=rounds, seed=seed)
        raw = PRESETS["demo"].curriculum(options)
    else:
        raw = yaml.safe_load(DEFAULT_CURRICULUM.read_text(encoding="utf-8"))
        raw["seed"] = seed
        if rounds is not None:
            raw["defaults"]["rounds"] = rounds
    raw["name"] = "bench-privacy"
    raw["stages"] = [stage for stage in raw["stages"] if stage["name"] == TASK]
    raw["defaults"]["min_sites"] = num_sites
    return raw


def prepare_sites(
    folder: Path,
    num_sites: int,
    seed: int,
    cases_per_site: int | tuple[int, int] | None,
    tiny: bool,
    target_epsilon: float | None,
    delta: float,
) -> list[Path]:
    """Generate the sites of one run and turn DP-SGD on at every site.

    Each run gets its own site folders, so every setting starts from an empty privacy
    ledger. The same seed writes the same studies.
    """
    from simulation.generate import generate_federation

    if folder.exists():
        shutil.rmtree(folder)
    site_files = generate_federation(
        folder,
        num_sites=num_sites,
        seed=seed,
        cases_per_site=cases_per_site,
        tasks=[TASK],
        tiny=tiny,
    )
    if target_epsilon is not None:
        for site_file in site_files:
            document = yaml.safe_load(site_file.read_text(encoding="utf-8"))
            document["privacy"] = {"dp": {"delta": delta, "target_epsilon": target_epsilon}}
            site_file.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return site_files


def run_federation(
    curriculum_file: Path, registry: Path, site_files: list[Path], run_id: str
) -> None:
    """Run the curriculum's stages with Flower's simulation engine (Ray)."""
    from flwr.simulation import run_simulation

    from client.app import create_client_app
    from server.app import ServerSettings, create_server_app

    settings = ServerSettings(
        curriculum=curriculum_file, registry=registry, run_id=run_id, node_wait_s=0.0
    )
    backend_config: Any = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": max(1, min(len(site_files), os.cpu_count() or 1)),
            "include_dashboard": False,
        },
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=create_server_app(settings),
            client_app=create_client_app(site_files),
            num_supernodes=len(site_files),
            backend_config=backend_config,
        )


def pooled_test_metrics(
    registry: Path, site_files: Sequence[Path], raw: dict[str, Any]
) -> tuple[float | None, float | None, int]:
    """Evaluate the registry's latest model on all sites' ``ct_cls`` test cases at once.

    Returns
    -------
    tuple
        ``(auc, accuracy, cases)``. A metric is None when it is undefined, for example
        AUC when every test case has the same class.
    """
    from client.preprocess import PreprocessConfig, load_task_dataset
    from client.site_config import load_site_config
    from server.curriculum import load_curriculum_mapping
    from server.registry import Registry
    from unicon_model.evaluation import evaluate_task

    registry_view = Registry(registry)
    latest = registry_view.latest()
    if latest is None:
        raise RuntimeError(
            f"{registry}: the federation wrote no version; see bench.log in the output folder"
        )
    model = registry_view.load_model(latest)
    stage = load_curriculum_mapping(raw, "bench-privacy").stage(TASK)
    settings = stage.settings.preprocess
    preprocess = PreprocessConfig(
        spacing=settings.spacing,
        patch_size=settings.patch_size,
        ct_window=settings.ct_window,
        suv_scale=settings.suv_scale,
    )
    loaders = []
    cases = 0
    for site_file in site_files:
        site = load_site_config(site_file)
        data = load_task_dataset(
            site, TASK, preprocess, split="test", train=False, num_classes=2, seed=raw["seed"]
        )
        cases += len(data)
        loaders.append(DataLoader(data, batch_size=8))
    metrics = evaluate_task(model, stage.task, itertools.chain(*loaders))
    return metrics["auc"].value, metrics["accuracy"].value, cases


def summarize_run(
    setting: str,
    target_epsilon: float | None,
    seed: int,
    registry: Path,
    site_files: Sequence[Path],
    raw: dict[str, Any],
    wall_time_s: float,
) -> BenchRow:
    """Read one finished federation back from its registry into a `BenchRow`."""
    from server.admin import stage_privacy
    from server.registry import Registry

    registry_view = Registry(registry)
    version = registry_view.version_for_stage(TASK)
    if version is None:
        raise RuntimeError(
            f"{registry}: no version for stage {TASK}; see bench.log in the output folder"
        )
    metrics = registry_view.read_json(version, "metrics.json")
    privacy = stage_privacy(metrics)
    private = [figures for figures in privacy.values() if figures["dp"]]
    declined = sum(len(figures["rounds_declined"]) for figures in privacy.values())
    auc, accuracy, cases = pooled_test_metrics(registry, site_files, raw)
    return BenchRow(
        setting=setting,
        target_epsilon=target_epsilon,
        seed=seed,
        epsilon_spent_max=max(f["epsilon"] for f in private) if private else None,
        noise_multiplier_mean=(
            sum(f["noise_multiplier"] for f in private) / len(private) if private else None
        ),
        dp_steps_per_site=max(f["steps"] for f in private) if private else None,
        declined_rounds=declined,
        site_auc=metrics["pooled"].get(TASK, {}).get("value"),
        pooled_auc=auc,
        pooled_accuracy=accuracy,
        test_cases=cases,
        wall_time_s=round(wall_time_s, 1),
        batch_size=int(raw["stages"][0].get("batch_size", raw["defaults"]["batch_size"])),
        min_train_cases=min_train_cases(site_files, raw["seed"]),
    )


def min_train_cases(site_files: Sequence[Path], seed: int) -> int:
    """Count the ``ct_cls`` training cases of every site and return the minimum."""
    from client.preprocess import split_counts
    from client.site_config import load_site_config

    counts = [
        split_counts(load_site_config(path), TASK, seed=seed).get("train", 0) for path in site_files
    ]
    return min(counts, default=0)


def write_rows(path: Path, rows: Sequence[BenchRow]) -> None:
    """Write the rows as CSV, empty cells for undefined values, through a temporary file."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(BenchRow.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(row).items()})
    os.replace(temporary, path)


def _cell(value: float | None, digits: int = 3) -> str:
    return "undefined" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _epsilon_cell(row: BenchRow) -> str:
    return "no DP" if row.target_epsilon is None else _cell(row.epsilon_spent_max, 2)


def format_table(rows: Sequence[BenchRow]) -> str:
    """Format the rows as a Markdown table, with a mean row per setting over seeds."""
    lines = [
        "| setting | seed | epsilon spent (max over sites) | noise multiplier (mean) | "
        "DP-SGD steps per site | site-weighted AUC | pooled AUC | pooled accuracy | "
        "test cases | wall time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.setting} | {row.seed} | {_epsilon_cell(row)} | "
            f"{_cell(row.noise_multiplier_mean, 2) if row.target_epsilon else '-'} | "
            f"{row.dp_steps_per_site or '-'} | "
            f"{_cell(row.site_auc)} | {_cell(row.pooled_auc)} | {_cell(row.pooled_accuracy)} | "
            f"{row.test_cases} | {row.wall_time_s:.0f} s |"
        )
    settings = list(dict.fromkeys(row.setting for row in rows))
    if len(rows) > len(settings):
        lines += [
            "",
            "| setting | seeds | mean pooled AUC | mean pooled accuracy |",
            "|---|---|---|---|",
        ]
        for setting in settings:
            chosen = [row for row in rows if row.setting == setting]
            lines.append(
                f"| {setting} | {len(chosen)} | {_cell(_mean([r.pooled_auc for r in chosen]))} | "
                f"{_cell(_mean([r.pooled_accuracy for r in chosen]))} |"
            )
    return "\n".join(lines)


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [value for value in values if value is not None]
    return sum(defined) / len(defined) if defined else None


def _parse_epsilons(text: str) -> list[float]:
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [float(part) for part in parts]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive numbers such as 1,4,8, found {text!r}"
        ) from error
    if any(not math.isfinite(v) or v <= 0.0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive numbers such as 1,4,8, found {text!r}"
        )
    return values


def _parse_seeds(text: str) -> list[int]:
    parts = [part.strip() for part in text.split(",")]
    try:
        values = [int(part) for part in parts]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated seed values >= 0 such as 0,1,2, found {text!r}"
        ) from error
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated seed values >= 0 such as 0,1,2, found {text!r}"
        )
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a positive number, found {text!r}") from error
    if not math.isfinite(value) or value <= 0.0:
        raise argparse.ArgumentTypeError(f"expected a positive number, found {text!r}")
    return value


def _delta(text: str) -> float:
    value = _positive_float(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a delta between 0 and 1 (such as 1e-5), found {text!r}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the benchmark's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m simulation.bench_privacy",
        description="ct_cls task metric against the DP-SGD epsilon of every site, on "
        "generated studies.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/bench-privacy"),
        help="output folder (default: runs/bench-privacy)",
    )
    parser.add_argument(
        "--epsilons",
        type=_parse_epsilons,
        default=list(DEFAULT_EPSILONS),
        help="target epsilons per site and task, comma-separated (default: 1,4,8). "
        "A run without DP is always added",
    )
    parser.add_argument(
        "--delta", type=_delta, default=DEFAULT_DELTA, help="DP delta (default: 1e-5)"
    )
    parser.add_argument(
        "--sites",
        type=int_at_least(2),
        default=None,
        help="number of sites, at least 2 (default: 4, or 3 with --tiny)",
    )
    parser.add_argument(
        "--seeds",
        type=_parse_seeds,
        default=[0],
        help="comma-separated seed values, such as 0,1,2 (default: 0); unlike `unicon bench "
        "--seeds N`, these are the seeds themselves, not a count",
    )
    parser.add_argument(
        "--rounds",
        type=int_at_least(1),
        default=None,
        help="rounds of the stage (default: the demo preset's, or the default curriculum's with "
        "--tiny)",
    )
    parser.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="batch size of the stage, or expected batch size under DP-SGD's Poisson sampling "
        "(default: the demo preset's, or the default curriculum's with --tiny)",
    )
    parser.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=None,
        help="learning rate of the stage (default: the demo preset's, or the default "
        "curriculum's with --tiny)",
    )
    parser.add_argument(
        "--cases-per-site",
        type=int_at_least(5),
        default=None,
        help="cases per generated site, at least 5 (default: the demo's 56-72, or the "
        "generator's with --tiny)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny generated studies, the default curriculum's stage and a random backbone: a "
        "quick check that the pipeline runs",
    )
    return parser


def run_setting(
    args: argparse.Namespace,
    out: Path,
    raw: dict[str, Any],
    seed: int,
    label: str,
    target_epsilon: float | None,
) -> BenchRow:
    """Run one setting and seed on freshly generated sites and an empty registry."""
    name = label.replace(" ", "-") + f"-seed{seed}"
    folder = out / name
    site_files = prepare_sites(
        folder / "sites",
        args.sites,
        seed,
        args.cases_per_site or (None if args.tiny else DEMO_CASES_PER_SITE),
        args.tiny,
        target_epsilon,
        args.delta,
    )
    curriculum_file = folder / "curriculum.yaml"
    curriculum_file.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    registry = folder / "registry"
    if registry.exists():
        shutil.rmtree(registry)

    started = time.monotonic()
    run_federation(curriculum_file, registry, site_files, run_id=name)
    return summarize_run(
        label, target_epsilon, seed, registry, site_files, raw, time.monotonic() - started
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and write the CSV. Return the exit status."""
    args = build_parser().parse_args(argv)
    if args.sites is None:
        args.sites = 3 if args.tiny else 4
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    configure_logging("WARNING", log_file=out / "bench.log")
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    torch.set_num_threads(1)

    settings: list[tuple[str, float | None]] = [
        (f"epsilon {epsilon:g}", epsilon) for epsilon in args.epsilons
    ]
    settings.append(("no DP", None))
    rows: list[BenchRow] = []
    for seed in args.seeds:
        raw = bench_curriculum(args.rounds, seed, args.sites, None if args.tiny else out)
        for key in ("batch_size", "learning_rate"):
            if getattr(args, key) is not None:
                raw["stages"][0][key] = getattr(args, key)
        for label, target_epsilon in settings:
            try:
                row = run_setting(args, out, raw, seed, label, target_epsilon)
            except StageFailed as error:
                # Seen once under heavy load: Ray started no node, so no site took part.
                logger.warning("%s, seed %d failed (%s); retrying once", label, seed, error)
                row = run_setting(args, out, raw, seed, label, target_epsilon)
            rows.append(row)
            write_rows(out / CSV_NAME, rows)
            print(
                f"{label}, seed {seed}: pooled AUC {_cell(row.pooled_auc)}, "
                f"epsilon spent {_epsilon_cell(row)}",
                flush=True,
            )

    print()
    print(format_table(rows))
    print(f"\nCSV: {out / CSV_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
