"""``unicon simulate``: a whole federation on one machine."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from simulation.bench import add_bench_command
from simulation.presets import PRESETS, PresetError, PresetOptions
from unicon_model.log import get_logger

logger = get_logger(__name__)


def add_simulation_commands(commands: Any) -> None:
    """Register ``unicon simulate`` on the top-level subparsers."""
    parser = commands.add_parser(
        "simulate",
        help="run a multi-hospital continual federation on this machine (Flower simulation engine)",
        description="Build virtual hospitals, run the curriculum through Flower's simulation engine "
        "and write a report, CSV metrics, plots and the model registry into --out.",
    )
    parser.add_argument(
        "--preset",
        default="demo",
        choices=sorted(PRESETS),
        help="sites and curriculum to run (default: demo). "
        + "; ".join(f"{p.name}: {p.description}" for p in PRESETS.values()),
    )
    parser.add_argument(
        "--data", type=Path, help="folder of the real studies (real-sample and adrenal presets)"
    )
    parser.add_argument(
        "--sites-dir",
        type=Path,
        help="folder of site YAML files to use instead of the preset's sites",
    )
    parser.add_argument(
        "--curriculum",
        type=Path,
        help="curriculum YAML to run instead of the preset's (the sites still come from the preset)",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: runs/<preset>-<date>-<time>)"
    )
    parser.add_argument("--sites", type=int, dest="num_sites", help="number of virtual hospitals")
    parser.add_argument("--rounds", type=int, help="federated rounds of every stage")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the generated studies and of training (default: 0)",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run sequential fine-tuning and isolated per-task training on the same sites",
    )
    parser.set_defaults(handler=run_simulate)
    add_bench_command(commands)


def run_simulate(args: argparse.Namespace) -> int:
    """Handle ``unicon simulate``."""
    from simulation.runner import SimulationError, run_preset

    out = args.out or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    options = PresetOptions(
        out_dir=out,
        num_sites=args.num_sites,
        rounds=args.rounds,
        seed=args.seed,
        data_dir=args.data,
        sites_dir=args.sites_dir,
        curriculum=args.curriculum,
    )
    for name, value in (("--sites", args.num_sites), ("--rounds", args.rounds)):
        if value is not None and value < 1:
            logger.error("%s must be at least 1, found %d", name, value)
            return 2
    try:
        result = run_preset(args.preset, options, compare=args.compare)
    except (PresetError, SimulationError) as error:
        logger.error("%s", error)
        return 1
    print(f"Report: {result.out_dir / 'report.md'}")
    return 0
