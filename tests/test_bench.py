"""Tests of ``unicon bench``: the timing arithmetic, the aggregation over seeds, the page,
and (slow) ``unicon bench --quick`` end to end."""

from __future__ import annotations

import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from simulation.bench import (
    SECTIONS,
    MethodRun,
    Spread,
    TreeMemorySampler,
    WorkerOutcome,
    _method_targets,
    aggregate_methods,
    complement,
    interval_union,
    read_section_blocks,
    render_page,
    spread_of,
)
from simulation.cli import build_parser
from simulation.report import VariantSummary
from unicon_model.metrics import MetricValue

torch.set_num_threads(1)

REPO_DIR = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("intervals", "lower", "upper", "expected"),
    [
        ([], 0.0, 10.0, 0.0),
        ([(1.0, 3.0)], 0.0, 10.0, 2.0),
        ([(1.0, 3.0), (2.0, 5.0)], 0.0, 10.0, 4.0),
        ([(1.0, 3.0), (4.0, 5.0)], 0.0, 10.0, 3.0),
        ([(4.0, 5.0), (1.0, 3.0), (2.5, 4.5)], 0.0, 10.0, 4.0),
        ([(-2.0, 1.0), (9.0, 12.0)], 0.0, 10.0, 2.0),
        ([(1.0, 1.0), (3.0, 2.0)], 0.0, 10.0, 0.0),
    ],
)
def test_interval_union_table(
    intervals: list[tuple[float, float]], lower: float, upper: float, expected: float
) -> None:
    assert interval_union(intervals, lower, upper) == pytest.approx(expected)


def test_interval_union_matches_grid_reference() -> None:
    intervals = [(0.13, 0.71), (0.5, 0.9), (1.7, 2.2), (2.1, 2.15), (3.0, 3.4)]
    step = 1e-4
    covered = sum(
        1
        for index in range(int(4.0 / step))
        if any(a <= (index + 0.5) * step < b for a, b in intervals)
    )

    assert interval_union(intervals, 0.0, 4.0) == pytest.approx(covered * step, abs=1e-3)


def test_complement_gaps() -> None:
    gaps = complement([(2.0, 3.0), (1.0, 1.5), (2.5, 4.0)], 0.0, 5.0)

    assert gaps == [(0.0, 1.0), (1.5, 2.0), (4.0, 5.0)]
    assert complement([], 0.0, 1.0) == [(0.0, 1.0)]
    assert complement([(-1.0, 2.0)], 0.0, 1.0) == []


def test_spread_mean_and_sample_sd() -> None:
    spread = spread_of([0.5, None, 0.75, 0.25, math.nan])

    assert spread.values == (0.5, 0.75, 0.25)
    assert spread.mean == pytest.approx(statistics.fmean([0.5, 0.75, 0.25]))
    assert spread.sd == pytest.approx(statistics.stdev([0.5, 0.75, 0.25]))
    assert spread.text() == "50.0 ± 25.0"
    assert Spread((0.8,)).text(scale=1.0, digits=3) == "0.800"


def test_spread_undefined_keeps_reason() -> None:
    spread = spread_of([None, None], "no site could compute it")

    assert spread.mean is None
    assert spread.sd is None
    assert spread.text() == "undefined (no site could compute it)"


def _summary(
    name: str, final: dict[str, float | None], bwt: float | None, forgetting: dict[str, float]
) -> VariantSummary:
    values = {t: MetricValue(v, None if v is not None else "one class") for t, v in final.items()}
    defined = [v for v in final.values() if v is not None]
    return VariantSummary(
        name=name,
        label=name,
        final=values,
        average=MetricValue(sum(defined) / len(defined), None),
        backward_transfer=MetricValue(bwt, None if bwt is not None else "isolated"),
        forgetting={t: MetricValue(v, None) for t, v in forgetting.items()},
        bytes_total=1000,
        wall_time_s=10.0,
    )


def test_aggregate_methods_over_seeds() -> None:
    seed0 = [
        _summary("unicon", {"a": 0.8, "b": 0.6}, 0.0, {"a": 0.0}),
        _summary("sequential", {"a": 0.5, "b": 0.7}, -0.2, {"a": 0.3}),
    ]
    seed1 = [
        _summary("unicon", {"a": 0.9, "b": None}, 0.0, {"a": 0.0}),
        _summary("sequential", {"a": 0.6, "b": 0.5}, -0.1, {"a": 0.1}),
    ]

    figures = aggregate_methods([seed0, seed1])

    assert [f.name for f in figures] == ["unicon", "sequential"]
    unicon, sequential = figures
    assert unicon.final["a"].mean == pytest.approx(0.85)
    assert unicon.final["a"].sd == pytest.approx(statistics.stdev([0.8, 0.9]))
    assert unicon.final["b"].values == (0.6,)
    assert sequential.backward_transfer.mean == pytest.approx(-0.15)
    assert sequential.max_forgetting.values == (0.3, 0.1)
    assert sequential.bytes_total.mean == pytest.approx(1000.0)


def test_adrenal_miss_lists_every_seed(tmp_path: Path) -> None:
    per_seed = [
        [
            _summary("unicon", {"ct_cls": auc}, None, {}),
            _summary("joint", {"ct_cls": 0.84}, None, {}),
        ]
        for auc in (0.857, 0.799, 0.83)
    ]
    outcome = WorkerOutcome(0, 1.0, 0, 1, False, tmp_path / "worker.log")
    runs = [MethodRun("AdrenalMNIST3D", seed, outcome) for seed in (0, 1, 2)]

    lines = _method_targets("AdrenalMNIST3D", runs, aggregate_methods(per_seed))

    assert len(lines) == 1
    assert "**missed**" in lines[0]
    assert "0.829 ± 0.029" in lines[0]
    assert (
        "Per seed: seeds 0, 1, 2: unicon 0.857, 0.799, 0.830; joint 0.840, 0.840, 0.840."
        in lines[0]
    )


def test_page_keeps_sections_between_runs(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    blocks = {key: f"## {key}\n\nfigure of {key}: 1.0" for key in SECTIONS}
    machine = {"command": "unicon bench", "date_utc": "2026-01-01 00:00:00"}

    page.write_text(render_page(machine, blocks, 60.0, quick=False), encoding="utf-8")
    read_back = read_section_blocks(page)

    assert read_back == blocks
    assert "Do not edit this page by hand" in page.read_text(encoding="utf-8")


def test_bench_rejects_unknown_section(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as error:
        build_parser().parse_args(["bench", "--sections", "scale,speed"])

    assert error.value.code == 2
    assert "unknown section" in capsys.readouterr().err


def test_tree_memory_sampler_counts_children() -> None:
    # A shell whose child keeps 200 MiB of touched memory for two seconds.
    code = (
        "import time; b = bytearray(200 * 2**20); b[::4096] = b'1' * len(b[::4096]); time.sleep(2)"
    )
    proc = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "{code}"; true'])
    with TreeMemorySampler(proc.pid, interval_s=0.05) as sampler:
        proc.wait(timeout=60)

    assert sampler.samples > 5
    assert sampler.peak_processes >= 2
    assert sampler.peak_rss_bytes >= 200 * 2**20


# ---------------------------------------------------------------------------
# Slow: the whole --quick benchmark
# ---------------------------------------------------------------------------


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def _numbers(rows: list[dict[str, str]]) -> list[float]:
    values = []
    for row in rows:
        for cell in row.values():
            try:
                values.append(float(cell))
            except (TypeError, ValueError):
                continue
    return values


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "quick"
    docs_page = REPO_DIR / "docs" / "benchmarks.md"
    before = docs_page.stat().st_mtime_ns if docs_page.exists() else None
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "simulation.cli", "bench", "--quick", "--out", str(out)],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=2400,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Benchmarks: {out / 'benchmarks.md'}" in result.stdout
    after = docs_page.stat().st_mtime_ns if docs_page.exists() else None
    assert after == before, "--quick must not write docs/benchmarks.md"
    return out


@pytest.mark.slow
def test_bench_quick_writes_every_section(quick_run: Path) -> None:
    page = (quick_run / "benchmarks.md").read_text(encoding="utf-8")
    blocks = read_section_blocks(quick_run / "benchmarks.md")

    assert "Do not edit this page by hand" in page
    assert set(blocks) == set(SECTIONS)
    for key in SECTIONS:
        rows = _rows(quick_run / "benchmarks" / f"{key}.csv")
        assert rows, key
        if list(rows[0]) == ["status", "reason"]:
            assert rows[0]["status"] == "not measured"
            assert f"not measured: {rows[0]['reason']}" in blocks[key]
            continue
        numbers = _numbers(rows)
        assert numbers, key
        assert all(math.isfinite(v) for v in numbers), key
        assert "not measured" not in blocks[key].split("\n", 3)[-1].split("Targets")[0], key


@pytest.mark.slow
def test_bench_quick_measures_all_but_methods(quick_run: Path) -> None:
    measured = {"communication", "scale", "privacy", "deployment"}
    for key in measured:
        rows = _rows(quick_run / "benchmarks" / f"{key}.csv")
        assert list(rows[0]) != ["status", "reason"], (key, rows[0])
        assert (quick_run / "benchmarks" / f"{key}.png").read_bytes()[:8] == PNG_MAGIC, key
    methods = _rows(quick_run / "benchmarks" / "methods.csv")
    assert methods[0]["status"] == "not measured"


@pytest.mark.slow
def test_bench_quick_scale_split_adds_up(quick_run: Path) -> None:
    (row,) = _rows(quick_run / "benchmarks" / "scale.csv")
    parts = sum(float(row[k]) for k in ("startup_s", "client_s", "server_s", "engine_other_s"))

    assert int(row["hospitals"]) == 3
    assert int(row["stages_written"]) == 4
    assert int(row["exit_status"]) == 0
    assert float(row["wall_s"]) > 0
    assert parts == pytest.approx(float(row["wall_s"]), abs=0.05)
    assert 0.05 < float(row["peak_rss_gib"]) < 24


@pytest.mark.slow
def test_bench_quick_bytes_match_model(quick_run: Path) -> None:
    from server.curriculum import load_curriculum_mapping
    from simulation.bench import _default_curriculum
    from unicon_model.model import UniconModel
    from unicon_model.spec import BackboneConfig

    rows = {
        (r["size"], r["stage"]): r for r in _rows(quick_run / "benchmarks" / "communication.csv")
    }
    curriculum = load_curriculum_mapping(_default_curriculum(), "test")
    model = UniconModel(BackboneConfig.preset("tiny"))
    model.grow(curriculum.stages[0].task)
    state = model.state_dict()
    total = sum(v.numel() * v.element_size() for v in state.values())
    trainable = set(model.trainable_sets("ct_cls").new)
    frozen = sum(v.numel() * v.element_size() for k, v in state.items() if k not in trainable)

    tiny = rows[("tiny", "ct_cls")]
    assert int(tiny["full_model_fedavg_bytes_per_round"]) == total
    # Flower's array framing adds a few hundred bytes per tensor on top of the raw values.
    assert frozen <= int(tiny["frozen_bytes_once_per_site"]) <= frozen + 64 * 1024
    for stage in ("ct_prog", "ct_seg", "petct_seg"):
        assert float(rows[("ctfm", stage)]["ratio_full_to_sent"]) >= 50
        assert int(rows[("tiny", stage)]["frozen_bytes_once_per_site"]) == 0


def _write_versions(registry: Path, stages: list[tuple[str, dict[str, object]]]) -> None:
    from server.registry import Registry
    from unicon_model.model import UniconModel
    from unicon_model.spec import BackboneConfig, TaskSpec

    model = UniconModel(BackboneConfig.preset("tiny"))
    for index, (stage, task) in enumerate(stages):
        model.grow(TaskSpec(name=stage, **task))  # type: ignore[arg-type]
        Registry(registry).write_version(
            index=index,
            stage=stage,
            model=model,
            curriculum={},
            metrics={},
            accuracy_matrix={"metric": "task metric", "rows": []},
        )


def test_finished_registries_skip_partial_methods(tmp_path: Path) -> None:
    import yaml

    from simulation.bench import _default_curriculum, finished_registries

    raw = _default_curriculum()
    raw["stages"] = raw["stages"][:2]
    for name, stages in (
        ("unicon", raw["stages"]),
        ("sequential", raw["stages"]),
        ("isolated-0", raw["stages"][:1]),
        ("isolated-1", raw["stages"][1:]),
        ("joint", raw["stages"]),
    ):
        text = yaml.safe_dump({**raw, "stages": stages})
        (tmp_path / f"curriculum-{name}.yaml").write_text(text, encoding="utf-8")
    tasks = [(s["name"], dict(s["task"])) for s in raw["stages"]]
    _write_versions(tmp_path / "registry", tasks)
    _write_versions(tmp_path / "baselines" / "sequential" / "registry", tasks[:1])
    _write_versions(tmp_path / "baselines" / "isolated-0" / "registry", tasks[:1])

    found = finished_registries(tmp_path)

    # sequential stopped after one of two stages, and isolated-1 never ran.
    assert found == {"unicon": tmp_path / "registry"}


def _finished_seed_folder(folder: Path, rounds: int | None) -> None:
    import json

    from simulation.bench import SEED_RECORD, _seed_record

    folder.mkdir(parents=True)
    record = _seed_record(folder, "demo", 1, rounds, None)
    finished = {**record, "finished": "2026-12-05 03:00:00 UTC", "wall_s": 1234.5}
    finished |= {"peak_rss_bytes": 7, "peak_processes": 3}
    (folder / SEED_RECORD).write_text(json.dumps(finished), encoding="utf-8")
    (folder / "result.json").write_text('{"registries": {}, "wall_time_s": {}}', encoding="utf-8")


def test_resume_reuses_matching_seed(tmp_path: Path) -> None:
    from simulation.bench import reuse_seed

    folder = tmp_path / "demo-seed1"
    _finished_seed_folder(folder, rounds=None)

    run = reuse_seed(folder, "demo", 1, None, None)

    assert run is not None
    assert (run.cohort, run.seed, run.reused) == ("demo", 1, "2026-12-05 03:00:00 UTC")
    assert run.outcome.ok and run.outcome.wall_s == 1234.5
    # Other settings, or no record at all, mean the seed runs again.
    assert reuse_seed(folder, "demo", 1, 3, None) is None
    assert reuse_seed(tmp_path / "demo-seed2", "demo", 2, None, None) is None


def test_resume_rejects_other_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import simulation.bench as bench

    folder = tmp_path / "demo-seed1"
    _finished_seed_folder(folder, rounds=None)
    monkeypatch.setattr(bench, "code_fingerprint", lambda: "0123456789abcdef")

    assert bench.reuse_seed(folder, "demo", 1, None, None) is None


def test_code_fingerprint_skips_bench_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import simulation.bench as bench

    for relative in ("client/app.py", "simulation/joint.py", "simulation/bench.py"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("x = 1\n", encoding="utf-8")
    monkeypatch.setattr(bench, "REPO_DIR", tmp_path)
    first = bench.code_fingerprint()

    (tmp_path / "simulation/bench.py").write_text("x = 2\n", encoding="utf-8")
    assert bench.code_fingerprint() == first
    (tmp_path / "simulation/joint.py").write_text("x = 2\n", encoding="utf-8")
    assert bench.code_fingerprint() != first


def _privacy_rows(auc_plain: str, auc_eps8: str) -> list[dict[str, str]]:
    common = {"seed": "0", "declined_rounds": "0", "site_auc": "", "pooled_accuracy": ""}
    common |= {"test_cases": "50", "wall_time_s": "10", "batch_size": "4"}
    common |= {"min_train_cases": "36", "dp_steps_per_site": "240"}
    plain = {"setting": "no DP", "target_epsilon": "", "epsilon_spent_max": ""}
    plain |= {"noise_multiplier_mean": "", "pooled_auc": auc_plain}
    private = {"setting": "epsilon 8", "target_epsilon": "8.0", "epsilon_spent_max": "7.99"}
    private |= {"noise_multiplier_mean": "1.28", "pooled_auc": auc_eps8}
    return [common | private, common | plain]


@pytest.mark.parametrize(
    ("auc_plain", "auc_eps8", "verdict", "lost"),
    [("0.776", "0.518", "**missed**", "25.8 points"), ("0.776", "0.760", "**met**", "1.6 points")],
)
def test_privacy_target_verdict(
    tmp_path: Path, auc_plain: str, auc_eps8: str, verdict: str, lost: str
) -> None:
    from simulation.bench import WorkerOutcome, render_privacy

    outcome = WorkerOutcome(0, 60.0, 0, 0, False, tmp_path / "log")
    command = ["python", "-m", "simulation.bench_privacy", "--epsilons", "8"]
    section = render_privacy(_privacy_rows(auc_plain, auc_eps8), command, outcome, tmp_path)
    text = "\n".join(section.body)

    target = next(line for line in section.body if line.startswith("- at most 3 AUC points"))
    assert verdict in target
    assert lost in target
    # The reason, with the noise per step (1.28 / 4 = 0.32 clipping norms), only when missed.
    assert ("0.32 clipping norms" in text) == (verdict == "**missed**")
    assert (tmp_path / "privacy.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--epsilons", "1,,4"], "--epsilons"),
        (["--delta", "2"], "--delta"),
        (["--sites", "1"], "--sites"),
        (["--rounds", "0"], "--rounds"),
        (["--batch-size", "0"], "--batch-size"),
        (["--learning-rate", "nan"], "--learning-rate"),
        (["--cases-per-site", "0"], "--cases-per-site"),
        (["--seeds", "-1"], "--seeds"),
    ],
)
def test_bench_privacy_rejects_bad_values(
    argv: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulation.bench_privacy import build_parser as privacy_parser

    with pytest.raises(SystemExit) as exit_info:
        privacy_parser().parse_args(argv)

    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert f"argument {option}:" in message
    assert repr(argv[1]) in message
