"""End-to-end federations through Flower's simulation engine on generated sites.

Each test runs the project's real ServerApp and ClientApp with
``flwr.simulation.run_simulation`` (Ray actors), so they are marked slow. The
generated sites are tiny, and the stages have one or two rounds.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from client.app import create_client_app
from client.site_config import load_site_config
from server.admin import format_status, registry_status
from server.app import ServerSettings, create_server_app
from server.federation import StageFailed
from server.registry import Registry
from simulation.generate import generate_federation
from unicon_model import wire

pytestmark = pytest.mark.slow
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def _curriculum(tmp: Path, train: str = "new", rounds: int = 2, min_sites: int = 1) -> Path:
    raw = {
        "name": "test",
        "seed": 3,
        "model": {"backbone": "tiny"},
        "defaults": {
            "rounds": rounds,
            "local_epochs": 1,
            "learning_rate": 0.01,
            "batch_size": 2,
            "min_sites": min_sites,
            "timeout_s": 300,
            "train": train,
            "preprocess": {"spacing": [6.0, 6.0, 6.0], "patch_size": [16, 16, 16]},
        },
        "stages": [
            {
                "name": "ct_cls",
                "task": {"kind": "classification", "modality": "ct", "num_classes": 2},
            },
            {
                "name": "ct_prog",
                "task": {"kind": "prognosis", "modality": "ct", "time_bins": [365, 730, 1460]},
                # Another spacing than stage 1: ct_cls must still be evaluated with its own.
                "preprocess": {"spacing": [5.0, 5.0, 5.0]},
            },
        ],
    }
    path = tmp / f"curriculum-{train}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _simulate(
    curriculum: Path, registry: Path, sites: list[Path], client_app: ClientApp | None = None
) -> None:
    settings = ServerSettings(curriculum=curriculum, registry=registry, run_id="test", node_wait_s=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=create_server_app(settings),
            client_app=client_app or create_client_app(sites),
            num_supernodes=len(sites),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},  # type: ignore[typeddict-item]
        )


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate_federation(tmp_path_factory.mktemp("sites"), num_sites=3, seed=5, tiny=True)


@pytest.fixture(scope="module")
def unicon_run(tmp_path_factory: pytest.TempPathFactory, sites: list[Path]) -> Path:
    tmp = tmp_path_factory.mktemp("unicon")
    registry = tmp / "registry"
    _simulate(_curriculum(tmp), registry, sites)
    return registry


def _ct_cls_output(registry: Path, version_index: int) -> torch.Tensor:
    reg = Registry(registry)
    model = reg.load_model(reg.versions()[version_index])
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((2, 1, 16, 16, 16), generator=generator)
    with torch.no_grad():
        return model(images, "ct_cls")


def test_federation_writes_two_versions(unicon_run: Path) -> None:
    versions = Registry(unicon_run).versions()
    assert [v.stage for v in versions] == ["ct_cls", "ct_prog"]
    assert (unicon_run / "LATEST").read_text().strip() == versions[-1].name
    assert not (unicon_run / "checkpoints" / "ct_prog").exists()


def test_federation_excludes_site_without_data(unicon_run: Path) -> None:
    reg = Registry(unicon_run)
    report = reg.read_json(reg.versions()[1], "metrics.json")
    assert report["sites"] == ["hospital-a", "hospital-b"]
    assert "hospital-c" in report["excluded_sites"]
    for round_record in report["rounds"]:
        assert "hospital-c" not in round_record["bytes_sent"]


def test_federation_sends_only_stage_tensors(unicon_run: Path, sites: list[Path]) -> None:
    reg = Registry(unicon_run)
    stage1 = reg.read_json(reg.versions()[0], "metrics.json")
    stage2 = reg.read_json(reg.versions()[1], "metrics.json")
    full = stage2["full_model_bytes"]

    # Round 1 of stage 1 carries the frozen backbone; round 2 only the trainable tensors.
    assert all(b > full // 2 for b in stage1["rounds"][0]["bytes_sent"].values())
    assert set(stage1["rounds"][1]["bytes_sent"].values()) == {
        stage1["rounds"][1]["trainable_bytes"]
    }
    # The end-of-stage evaluation already gave every site the final stage-1 modules, so
    # stage 2 sends nothing frozen: every round carries only the ct_prog tensors.
    for round_record in stage2["rounds"]:
        assert set(round_record["bytes_sent"].values()) == {round_record["trainable_bytes"]}
    assert stage2["rounds"][0]["trainable_bytes"] < full // 20

    # The site's audit log shows what left it in stage 2: ct_prog tensors only.
    site = load_site_config(sites[0])
    lines = [json.loads(x) for x in (site.state_dir / "audit.jsonl").read_text().splitlines()]
    stage2_train = [
        x for x in lines if x["stage"] == "ct_prog" and x["message_type"] == wire.TRAIN_STAGE
    ]
    assert len(stage2_train) == 2
    names = {t["name"] for entry in stage2_train for t in entry["tensors"]}
    assert names
    assert all(n.startswith(("adapters.ct_prog.", "heads.ct_prog.")) for n in names)


def test_federation_keeps_stage1_outputs(unicon_run: Path) -> None:
    before = _ct_cls_output(unicon_run, 0)
    after = _ct_cls_output(unicon_run, 1)
    assert torch.equal(before, after)

    reg = Registry(unicon_run)
    first = reg.read_json(reg.versions()[0], "metrics.json")["evaluation"]
    second = reg.read_json(reg.versions()[1], "metrics.json")["evaluation"]
    for site, evaluation in first.items():
        assert (
            evaluation["metrics"]["ct_cls.accuracy"] == second[site]["metrics"]["ct_cls.accuracy"]
        )


def test_admin_status_prints_matrix(unicon_run: Path) -> None:
    text = format_status(registry_status(unicon_run))
    assert "Accuracy matrix" in text
    assert "ct_cls" in text and "ct_prog" in text
    assert "v002-ct_prog" in text


def _corrupting_app(sites: list[Path], bad_partition: int) -> ClientApp:
    """The project's ClientApp with a Flower mod that puts NaN into one site's reply."""

    def corrupt(message: Message, context: Context, call_next) -> Message:  # type: ignore[no-untyped-def]
        reply = call_next(message, context)
        if (
            int(context.node_config["partition-id"]) == bad_partition
            and wire.TRAINABLE in reply.content.array_records
        ):
            record = reply.content.array_records[wire.TRAINABLE]
            name = sorted(record.keys())[0]
            from flwr.app import Array

            values = record[name].numpy().copy()
            values.flat[0] = float("nan")
            record[name] = Array(values)
        return reply

    return create_client_app(sites, mods=[corrupt])


def test_sequential_finetuning_changes_stage1_and_rejects_nan(
    tmp_path: Path, sites: list[Path]
) -> None:
    registry = tmp_path / "registry"
    _simulate(
        _curriculum(tmp_path, train="shared", rounds=1), registry, sites, _corrupting_app(sites, 0)
    )

    reg = Registry(registry)
    assert [v.stage for v in reg.versions()] == ["ct_cls", "ct_prog"]
    before = _ct_cls_output(registry, 0)
    after = _ct_cls_output(registry, 1)
    assert not torch.equal(before, after)

    report = reg.read_json(reg.versions()[0], "metrics.json")
    assert "hospital-a" in report["rounds"][0]["rejected"]
    assert "non-finite" in report["rounds"][0]["rejected"]["hospital-a"]
    assert report["rounds"][0]["accepted"] == ["hospital-b", "hospital-c"]


def test_too_few_sites_fails_stage(tmp_path: Path, sites: list[Path]) -> None:
    registry = tmp_path / "registry"
    with pytest.raises(StageFailed, match="needs at least 4 sites"):
        _simulate(_curriculum(tmp_path, rounds=1, min_sites=4), registry, sites)
    assert Registry(registry).versions() == []
    events = [json.loads(x) for x in (registry / "runs.jsonl").read_text().splitlines()]
    failures = [e for e in events if e["event"] == "stage-failed"]
    assert failures
    assert "needs at least 4 sites" in failures[0]["error"]
