"""Privacy in real federations: DP-SGD budgets, reported epsilon, and central DP at the server.

Two federations run through Flower's simulation engine on three tiny generated sites.
``hospital-a`` trains with DP-SGD towards a target epsilon, ``hospital-b`` with a fixed
noise multiplier and a budget that fits one round per task, and ``hospital-c`` without
DP. The first run has two stages (``ct_cls``, ``ct_prog``) of two rounds. The second run
uses a new registry on the same site folders, so only the privacy ledgers carry over. It
also turns on central DP at the server. The central DP arithmetic of ``PartialFedAvg`` is
tested on its own first, without Ray.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.simulation import run_simulation
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from client.app import create_client_app
from client.site_config import load_site_config
from client.training import task_counts
from server.admin import format_status, registry_status
from server.app import ServerSettings, create_server_app
from server.curriculum import CentralDPSettings
from server.registry import Registry
from server.strategy import (
    CENTRAL_DP_DELTA,
    PartialFedAvg,
    SiteNode,
    central_dp_epsilon,
    clip_site_update,
)
from simulation.cli import main as unicon_main
from simulation.generate import generate_federation
from simulation.runner import UNICON, SimulationResult
from unicon_model import wire

torch.set_num_threads(1)
pytestmark = [pytest.mark.filterwarnings("ignore:Optimal order is the")]
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

BATCH_SIZE = 2
DELTA = 1.0e-5
TARGET_EPSILON = 8.0
FIXED_NOISE = 1.0
TASKS = ("ct_cls", "ct_prog")


CENTRAL_NOISE = 1.0
CENTRAL_CLIPPING = 0.05


def _curriculum_raw(
    stages: tuple[str, ...], rounds: int, central_dp: dict[str, float] | None = None
) -> dict[str, Any]:
    tasks = {
        "ct_cls": {"kind": "classification", "modality": "ct", "num_classes": 2},
        "ct_prog": {"kind": "prognosis", "modality": "ct", "time_bins": [365, 730, 1460]},
    }
    return {
        "name": "privacy-test",
        "seed": 3,
        "model": {"backbone": "tiny"},
        "defaults": {
            "rounds": rounds,
            "local_epochs": 1,
            "learning_rate": 0.01,
            "batch_size": BATCH_SIZE,
            "min_sites": 1,
            "timeout_s": 300,
            "preprocess": {"spacing": [6.0, 6.0, 6.0], "patch_size": [16, 16, 16]},
            "central_dp": central_dp,
        },
        "stages": [{"name": name, "task": tasks[name]} for name in stages],
    }


def _simulate(raw: dict[str, Any], folder: Path, sites: list[Path], run_id: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    curriculum = folder / "curriculum.yaml"
    curriculum.write_text(yaml.safe_dump(raw), encoding="utf-8")
    registry = folder / "registry"
    settings = ServerSettings(
        curriculum=curriculum, registry=registry, run_id=run_id, node_wait_s=0.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=create_server_app(settings),
            client_app=create_client_app(sites),
            num_supernodes=len(sites),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    return registry


def _epsilon(history: list[tuple[float, float, int]]) -> float:
    """Epsilon at DELTA of (noise multiplier, sample rate, steps) rounds, by Opacus directly."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=DELTA))


def _round_shape(num_train: int) -> tuple[float, int]:
    """Poisson sample rate and steps of one local epoch, as Opacus's DPDataLoader sets them."""
    steps = math.ceil(num_train / BATCH_SIZE)
    return 1.0 / steps, steps


def _set_privacy(site_file: Path, dp: dict[str, Any]) -> None:
    document = yaml.safe_load(site_file.read_text(encoding="utf-8"))
    document["privacy"] = {"dp": dp}
    site_file.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


def _ledger_entries(site_file: Path, task: str) -> list[dict[str, Any]]:
    state_dir = load_site_config(site_file).state_dir
    document = json.loads((state_dir / "privacy_ledger.json").read_text(encoding="utf-8"))
    return list(document["tasks"][task]["entries"])


def _metrics(registry: Path, stage: str) -> dict[str, Any]:
    reg = Registry(registry)
    version = reg.version_for_stage(stage)
    assert version is not None
    return reg.read_json(version, "metrics.json")


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    files = generate_federation(tmp_path_factory.mktemp("sites"), num_sites=3, seed=5, tiny=True)

    # A budget between the epsilon of one and of two rounds of hospital-b lets it train
    # round 1 of each task and decline round 2.
    counts = task_counts(load_site_config(files[1]), list(TASKS))
    one_round, two_rounds = [], []
    for task in TASKS:
        sample_rate, steps = _round_shape(counts[f"{task}.num-train"])
        one_round.append(_epsilon([(FIXED_NOISE, sample_rate, steps)]))
        two_rounds.append(_epsilon([(FIXED_NOISE, sample_rate, steps)] * 2))
    assert max(one_round) < min(two_rounds)
    budget = (max(one_round) + min(two_rounds)) / 2.0

    _set_privacy(files[0], {"delta": DELTA, "target_epsilon": TARGET_EPSILON})
    _set_privacy(
        files[1], {"delta": DELTA, "noise_multiplier": FIXED_NOISE, "epsilon_budget": budget}
    )
    return files


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory, sites: list[Path]) -> Path:
    folder = tmp_path_factory.mktemp("first")
    return _simulate(_curriculum_raw(TASKS, rounds=2), folder, sites, run_id="first")


@pytest.fixture(scope="module")
def second_run(
    tmp_path_factory: pytest.TempPathFactory, sites: list[Path], first_run: Path
) -> Path:
    folder = tmp_path_factory.mktemp("second")
    central_dp = {"noise_multiplier": CENTRAL_NOISE, "clipping_norm": CENTRAL_CLIPPING}
    raw = _curriculum_raw(("ct_cls",), rounds=2, central_dp=central_dp)
    return _simulate(raw, folder, sites, run_id="second")


# ---------------------------------------------------------------------------------------
# Central DP arithmetic, without Ray
# ---------------------------------------------------------------------------------------


@pytest.fixture
def task_identity() -> Any:
    """Set the identity Flower gives a ServerApp process, so Messages can be built."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = None  # type: ignore[assignment]


def _central_round(
    central_dp: CentralDPSettings,
    start: dict[str, np.ndarray],
    trained: dict[str, dict[str, np.ndarray]],
    num_examples: dict[str, int],
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Run one round of PartialFedAvg with real Flower messages and return its outcome."""
    shapes = {name: value.shape for name, value in start.items()}
    strategy = PartialFedAvg(shapes, min_sites=1, central_dp=central_dp)
    nodes = [SiteNode(node_id=10 + i, site=site, num_train=1) for i, site in enumerate(trained)]
    start_record = ArrayRecord({name: Array(value) for name, value in start.items()})
    messages = strategy.configure_train(3, start_record, ConfigRecord({}), nodes, {})
    replies = []
    for node, message in zip(nodes, messages, strict=True):
        content = RecordDict(
            {
                wire.TRAINABLE: ArrayRecord(
                    {name: Array(value) for name, value in trained[node.site].items()}
                ),
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: num_examples[node.site]}),
            }
        )
        replies.append(Message(content=content, reply_to=message))
    outcome = strategy.aggregate_train(3, replies, {node.node_id: node.site for node in nodes})
    assert outcome.arrays is not None and outcome.central_dp is not None
    return outcome.arrays, outcome.central_dp


def _flat(tensors: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([tensors[name].astype(np.float64).ravel() for name in sorted(tensors)])


def test_clip_site_update_scales_to_norm() -> None:
    rng = np.random.default_rng(0)
    start = {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": np.zeros(5, np.float32)}
    update = {"a": np.full((4, 3), 3.0, np.float32), "b": np.full(5, -4.0, np.float32)}
    trained = {name: start[name] + update[name] for name in start}

    clipped, norm = clip_site_update(trained, start, clipping_norm=2.0)

    assert norm == pytest.approx(np.sqrt(12 * 9.0 + 5 * 16.0))
    change = _flat(clipped) - _flat(start)
    assert np.linalg.norm(change) == pytest.approx(2.0, rel=1e-5)
    np.testing.assert_allclose(change, _flat(update) * (2.0 / norm), rtol=1e-5, atol=1e-6)
    unclipped, _ = clip_site_update(trained, start, clipping_norm=100.0)
    assert all(np.array_equal(unclipped[name], trained[name]) for name in trained)


def test_central_dp_clipping_bounds_aggregate_update(task_identity: Any) -> None:
    start = {"w": np.zeros((3, 4), np.float32)}
    trained = {
        "site-1": {"w": np.full((3, 4), 5.0, np.float32)},
        "site-2": {"w": np.full((3, 4), -0.01, np.float32)},
    }
    counts = {"site-1": 3, "site-2": 1}

    aggregate, central = _central_round(CentralDPSettings(0.0, 1.0), start, trained, counts)

    # site-1's update (norm 5 * sqrt(12)) is scaled to norm 1; site-2's is kept.
    expected = 0.75 * np.full(12, 1.0 / np.sqrt(12)) + 0.25 * np.full(12, -0.01)
    np.testing.assert_allclose(aggregate["w"].ravel(), expected, rtol=1e-5)
    assert np.linalg.norm(aggregate["w"]) <= 1.0
    assert central["update_norms"]["site-1"] == pytest.approx(5.0 * np.sqrt(12))
    assert central["update_norms"]["site-2"] == pytest.approx(0.01 * np.sqrt(12))
    assert central["clipped_sites"] == ["site-1"]
    assert central["noise_std"] == 0.0


def test_central_dp_noise_changes_aggregate(task_identity: Any) -> None:
    start = {"w": np.ones((200, 500), np.float32)}
    trained = {"site-1": {"w": start["w"].copy()}, "site-2": {"w": start["w"].copy()}}
    counts = {"site-1": 3, "site-2": 1}

    aggregate, central = _central_round(CentralDPSettings(2.0, 0.5), start, trained, counts)

    # Noise std is the multiplier times the largest change one site can make: 2 * 0.5 * 3/4.
    assert central["noise_std"] == pytest.approx(0.75)
    noise = aggregate["w"].astype(np.float64) - 1.0
    assert abs(noise.std() - 0.75) < 0.75 * 0.02
    assert abs(noise.mean()) < 0.01
    assert not np.array_equal(aggregate["w"], start["w"])


def test_central_dp_epsilon_matches_rdp_accountant() -> None:
    accountant = RDPAccountant()
    accountant.history = [(1.3, 1.0, 4)]
    assert central_dp_epsilon(1.3, 4, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    assert central_dp_epsilon(1.3, 0, 1e-5) == 0.0
    assert central_dp_epsilon(0.0, 4, 1e-5) is None


# ---------------------------------------------------------------------------------------
# Federations
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dp_metrics_only_from_dp_sites(first_run: Path) -> None:
    for stage in TASKS:
        for round_record in _metrics(first_run, stage)["rounds"]:
            site_metrics = round_record["site_metrics"]
            assert "dp-epsilon" in site_metrics["hospital-a"]
            if "hospital-c" in site_metrics:
                assert not any(key.startswith("dp-") for key in site_metrics["hospital-c"])
    assert "dp-epsilon" in _metrics(first_run, "ct_cls")["rounds"][0]["site_metrics"]["hospital-b"]


@pytest.mark.slow
def test_reported_epsilon_matches_rdp_accountant(first_run: Path, sites: list[Path]) -> None:
    for site_file, site in zip(sites[:2], ("hospital-a", "hospital-b"), strict=True):
        counts = task_counts(load_site_config(site_file), list(TASKS))
        for task in TASKS:
            sample_rate, steps = _round_shape(counts[f"{task}.num-train"])
            entries = [e for e in _ledger_entries(site_file, task) if e["run_id"] == "first"]
            trained = [r for r in _metrics(first_run, task)["rounds"] if site in r["site_metrics"]]
            assert len(entries) == len(trained) >= 1

            history: list[tuple[float, float, int]] = []
            for entry, round_record in zip(entries, trained, strict=True):
                reported = round_record["site_metrics"][site]
                assert entry["server_round"] == round_record["round"]
                assert entry["steps"] == steps
                assert entry["sample_rate"] == pytest.approx(sample_rate)
                history.append((entry["noise_multiplier"], entry["sample_rate"], entry["steps"]))
                assert reported["dp-epsilon"] == pytest.approx(_epsilon(history), rel=1e-9)
                assert reported["dp-steps"] == steps
                assert reported["dp-noise-multiplier"] == entry["noise_multiplier"]
                assert reported["dp-delta"] == DELTA


@pytest.mark.slow
def test_target_epsilon_site_ends_at_target(first_run: Path) -> None:
    for task in TASKS:
        last = _metrics(first_run, task)["rounds"][-1]["site_metrics"]["hospital-a"]
        assert TARGET_EPSILON - 0.01 < last["dp-epsilon"] <= TARGET_EPSILON


@pytest.mark.slow
def test_budget_site_declines_second_round(first_run: Path, sites: list[Path]) -> None:
    for task in TASKS:
        first_round, second_round = _metrics(first_run, task)["rounds"]
        assert "hospital-b" in first_round["accepted"]
        assert "hospital-b" not in second_round["accepted"]
        assert "above its budget" in second_round["declined"]["hospital-b"]
        assert len(_ledger_entries(sites[1], task)) == 1


@pytest.mark.slow
def test_spent_sites_decline_later_run_from_round_one(second_run: Path, sites: list[Path]) -> None:
    rounds = _metrics(second_run, "ct_cls")["rounds"]
    assert len(rounds) == 2
    for round_record in rounds:
        assert round_record["accepted"] == ["hospital-c"]
        assert sorted(round_record["declined"]) == ["hospital-a", "hospital-b"]
        assert "above its budget" in round_record["declined"]["hospital-b"]
        assert "no privacy budget left" in round_record["declined"]["hospital-a"]

    # Declined rounds spend nothing: the ledgers hold only the first run's rounds.
    assert len(_ledger_entries(sites[0], "ct_cls")) == 2
    assert len(_ledger_entries(sites[1], "ct_cls")) == 1


def _privacy_rows(report: str) -> dict[tuple[str, str], list[str]]:
    section = report.split("## Privacy", 1)[1].split("\n## ", 1)[0]
    rows: dict[tuple[str, str], list[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] in TASKS:
            rows[(cells[0], cells[2])] = cells
    return rows


@pytest.mark.slow
def test_report_lists_epsilon_per_site_and_task(
    first_run: Path, sites: list[Path], tmp_path: Path
) -> None:
    from simulation.report import write_report

    result = SimulationResult(
        out_dir=first_run.parent,
        registries={"unicon": first_run},
        wall_time_s={"unicon": 0.0},
        site_files=sites,
    )
    raw = _curriculum_raw(TASKS, rounds=2)
    report = write_report(result, "privacy-test", raw, [UNICON]).read_text(encoding="utf-8")
    rows = _privacy_rows(report)

    assert set(rows) == {
        ("ct_cls", "hospital-a"),
        ("ct_cls", "hospital-b"),
        ("ct_cls", "hospital-c"),
        ("ct_prog", "hospital-a"),
        ("ct_prog", "hospital-b"),
    }
    for task in TASKS:
        for site_file, site in zip(sites[:2], ("hospital-a", "hospital-b"), strict=True):
            entries = _ledger_entries(site_file, task)
            history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
            cells = rows[(task, site)]
            assert cells[3] == f"{_epsilon(history):.3f}"
            assert cells[4] == "1e-05"
            assert cells[5] == f"{entries[-1]['noise_multiplier']:.3f}"
            assert int(cells[6]) == sum(e["steps"] for e in entries if e["run_id"] == "first")
        assert rows[(task, "hospital-b")][7] == "1"
        assert rows[(task, "hospital-b")][8].startswith("2: ")
    assert rows[("ct_cls", "hospital-c")][3:7] == ["no DP", "-", "-", "-"]


@pytest.mark.slow
def test_admin_status_json_shows_epsilon(
    first_run: Path, sites: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert unicon_main(["admin", "status", "--registry", str(first_run), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)

    for version in status["versions"]:
        task = version["stage"]
        privacy = version["privacy"]
        entries = _ledger_entries(sites[0], task)
        history = [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries]
        assert privacy["hospital-a"]["dp"] is True
        assert privacy["hospital-a"]["epsilon"] == pytest.approx(_epsilon(history), rel=1e-9)
        assert privacy["hospital-a"]["delta"] == DELTA
        assert privacy["hospital-b"]["rounds_trained"] == [1]
        assert list(privacy["hospital-b"]["rounds_declined"]) == ["2"]
    assert status["versions"][0]["privacy"]["hospital-c"] == {
        "dp": False,
        "rounds_trained": [1, 2],
        "rounds_declined": {},
    }
    text = format_status(registry_status(first_run))
    assert "hospital-c no DP" in text


@pytest.mark.slow
def test_central_dp_recorded_in_registry(second_run: Path) -> None:
    metrics = _metrics(second_run, "ct_cls")
    accountant = RDPAccountant()
    accountant.history = [(CENTRAL_NOISE, 1.0, 2)]
    expected = accountant.get_epsilon(delta=CENTRAL_DP_DELTA)

    assert metrics["central_dp"]["releases"] == 2
    assert metrics["central_dp"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    for round_record in metrics["rounds"]:
        central = round_record["central_dp"]
        # hospital-c is the only site averaged, so one site moves the mean fully.
        assert central["noise_std"] == pytest.approx(CENTRAL_NOISE * CENTRAL_CLIPPING)
        assert set(central["update_norms"]) == {"hospital-c"}
        assert central["update_norms"]["hospital-c"] > 0.0

    from simulation.report import privacy_lines, stage_reports

    lines = privacy_lines(stage_reports(second_run))
    assert f"| ct_cls | 1.000 | 0.05 | 2 | 1e-05 | {expected:.3f} |" in lines

    status = registry_status(second_run)
    assert status["versions"][0]["central_dp"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert f"central DP epsilon {expected:.2f}" in format_status(status)
