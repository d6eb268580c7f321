"""What leaves a site in a real federation: captured replies against data, spec and audit log.

A two-stage federation runs on three tiny generated sites through Flower's simulation
engine. Stage ``ct_cls`` trains new modules. Stage ``ct_prog`` also fine-tunes the
shared backbone and stem under EWC, so at the end of ``ct_cls`` the sites also reply to
a Fisher query.
``hospital-a`` trains with DP-SGD, and ``hospital-b`` has a budget so small that it
declines every round, which puts a reason into its replies. A Flower client mod records
every reply message as the ClientApp returns it (tensor names, shapes, bytes, SHA-256,
every string in its records) into a folder, because the ClientApp runs in Ray worker
processes. The tests then check these replies against the sites' own files.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest
import torch
import yaml
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from client.app import create_client_app
from client.audit import summarize_audit
from client.site_config import SiteConfig, load_site_config
from server.app import ServerSettings, create_server_app
from server.registry import Registry
from simulation.cli import main as unicon_main
from simulation.generate import generate_federation
from unicon_model import wire

torch.set_num_threads(1)
pytestmark = pytest.mark.slow
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

PATCH_SIZE = (16, 16, 16)
STAGES = {"ct_cls": "new", "ct_prog": "shared"}
# Absolute POSIX or Windows paths, and the file types a site reads or writes.
PATH_PATTERN = re.compile(r"(?:^|[\s'\"(=:,])(?:/[^/\s]+){2,}|[A-Za-z]:\\|\.nii|\.csv|\.ya?ml\b")


def _curriculum(folder: Path) -> Path:
    raw = {
        "name": "audit-test",
        "seed": 11,
        "model": {"backbone": "tiny"},
        "defaults": {
            "rounds": 2,
            "local_epochs": 1,
            "learning_rate": 0.01,
            "batch_size": 2,
            "min_sites": 1,
            "timeout_s": 300,
            "preprocess": {"spacing": [6.0, 6.0, 6.0], "patch_size": list(PATCH_SIZE)},
        },
        "stages": [
            {
                "name": "ct_cls",
                "task": {"kind": "classification", "modality": "ct", "num_classes": 2},
            },
            {
                "name": "ct_prog",
                "task": {"kind": "prognosis", "modality": "ct", "time_bins": [365, 730, 1460]},
                "train": "shared",
                "consolidation": "ewc",
                "rounds": 1,
            },
        ],
    }
    path = folder / "curriculum.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _capturing_app(sites: list[Path], capture_dir: Path) -> ClientApp:
    """The project's ClientApp with a mod that writes a description of every reply to disk."""

    def capture(message: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        import hashlib as _hashlib
        import json as _json
        import uuid as _uuid

        import numpy as _np

        reply = call_next(message, context)
        config: dict[str, Any] = {}
        if message.has_content() and "config" in message.content.config_records:
            config = dict(message.content.config_records["config"])
        described: dict[str, Any] = {
            "partition": int(context.node_config["partition-id"]),
            "message_type": reply.metadata.message_type,
            "stage": str(config.get("stage", "-")),
            "round": int(config.get("server-round", 0)),
            "error": reply.error.reason if reply.has_error() else None,
            "records": [],
            "arrays": [],
            "metrics": {},
            "configs": {},
        }
        if reply.has_content():
            content = reply.content
            described["records"] = sorted(content.keys())
            for record_name, record in content.array_records.items():
                for name, array in record.items():
                    values = _np.ascontiguousarray(array.numpy())
                    described["arrays"].append(
                        {
                            "record": record_name,
                            "name": name,
                            "shape": list(values.shape),
                            "dtype": values.dtype.str,
                            "bytes": int(values.nbytes),
                            "sha256": _hashlib.sha256(values.tobytes()).hexdigest(),
                        }
                    )
            for record_name, metric_record in content.metric_records.items():
                described["metrics"][record_name] = dict(metric_record.items())
            for record_name, config_record in content.config_records.items():
                described["configs"][record_name] = {
                    key: value.hex() if isinstance(value, bytes) else value
                    for key, value in config_record.items()
                }
        folder = capture_dir / str(described["partition"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{_uuid.uuid4().hex}.json").write_text(_json.dumps(described))
        return reply

    return create_client_app(sites, mods=[capture])


def _set_privacy(site_file: Path, dp: dict[str, Any]) -> None:
    document = yaml.safe_load(site_file.read_text(encoding="utf-8"))
    document["privacy"] = {"dp": dp}
    site_file.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("audit")
    sites = generate_federation(root / "sites", num_sites=3, seed=9, tiny=True)
    _set_privacy(sites[0], {"delta": 1.0e-5, "target_epsilon": 8.0})
    _set_privacy(sites[1], {"delta": 1.0e-5, "noise_multiplier": 1.0, "epsilon_budget": 0.5})

    capture_dir = root / "captured"
    registry = root / "registry"
    settings = ServerSettings(
        curriculum=_curriculum(root), registry=registry, run_id="audit", node_wait_s=0.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=create_server_app(settings),
            client_app=_capturing_app(sites, capture_dir),
            num_supernodes=len(sites),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )

    replies: dict[str, list[dict[str, Any]]] = {}
    for partition, site_file in enumerate(sites):
        site = load_site_config(site_file).site
        files = sorted((capture_dir / str(partition)).glob("*.json"))
        replies[site] = [json.loads(path.read_text()) for path in files]
    return {"sites": sites, "registry": registry, "replies": replies}


def _site_files(site: SiteConfig) -> tuple[set[str], set[str], set[tuple[int, ...]]]:
    """Identifiers, path strings and volume shapes of a site, read from its manifests."""
    identifiers: set[str] = set()
    paths: set[str] = {str(site.source), str(site.source.parent), str(site.state_dir)}
    shapes: set[tuple[int, ...]] = set()
    for dataset in site.datasets:
        paths |= {str(dataset.manifest), dataset.manifest.name}
        with dataset.manifest.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                identifiers |= {row["case_id"], row["patient_id"]}
                for column in ("ct", "pet", "label"):
                    if row.get(column):
                        image = (dataset.manifest.parent / row[column]).resolve()
                        paths |= {row[column], str(image), image.name}
                        volume: Any = nib.load(image)
                        shapes.add(tuple(int(size) for size in volume.shape))
    return identifiers, paths, shapes


def _strings(reply: dict[str, Any]) -> list[str]:
    """Every string a reply carries: record names, keys, config values, error reason."""
    found: list[str] = list(reply["records"])
    found += [array["name"] for array in reply["arrays"]]
    for record in reply["metrics"].values():
        found += list(record)
    for record in reply["configs"].values():
        for key, value in record.items():
            found.append(key)
            values = value if isinstance(value, list) else [value]
            found += [item for item in values if isinstance(item, str)]
    if reply["error"]:
        found.append(reply["error"])
    return found


def _stage_names(
    registry: Path, stage: str
) -> tuple[dict[str, tuple[int, ...]], set[str], set[str]]:
    """Spec shapes after a stage, the names it trained and the shared names of its task."""
    reg = Registry(registry)
    version = reg.version_for_stage(stage)
    assert version is not None
    model = reg.load_model(version)
    shapes = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    sets = model.trainable_sets(stage, finetune_shared=True)
    trained = set(sets.new) | (set(sets.shared) if STAGES[stage] == "shared" else set())
    return shapes, trained, set(sets.shared)


def test_replies_carry_only_spec_tensors(federation: dict[str, Any]) -> None:
    stage_names = {stage: _stage_names(federation["registry"], stage) for stage in STAGES}
    message_types: Counter[str] = Counter()
    for site, replies in federation["replies"].items():
        for reply in replies:
            message_types[reply["message_type"]] += 1
            assert reply["error"] is None, f"{site}: {reply['error']}"
            if not reply["arrays"]:
                continue
            shapes, trained, shared = stage_names[reply["stage"]]
            names = {array["name"] for array in reply["arrays"]}
            for array in reply["arrays"]:
                assert tuple(array["shape"]) == shapes[array["name"]], f"{site}: {array}"
                assert array["dtype"] == "<f4"
            if reply["message_type"] == wire.TRAIN_STAGE:
                assert names == trained, site
            else:
                assert reply["message_type"] == wire.QUERY_FISHER
                assert names == shared, site
    # Every kind of reply took place, so the checks above covered each of them.
    assert set(message_types) == {
        wire.QUERY_SITE_INFO,
        wire.TRAIN_STAGE,
        wire.QUERY_FISHER,
        wire.EVALUATE_TASKS,
    }


def test_replies_hold_no_volume_shape(federation: dict[str, Any]) -> None:
    forbidden: set[tuple[int, ...]] = {PATCH_SIZE}
    for site_file in federation["sites"]:
        forbidden |= _site_files(load_site_config(site_file))[2]
    assert len(forbidden) > 1
    forbidden_sorted = {tuple(sorted(shape[:3])) for shape in forbidden}
    for replies in federation["replies"].values():
        for reply in replies:
            for array in reply["arrays"]:
                shape = tuple(array["shape"])
                assert shape not in forbidden, array
                if len(shape) >= 3:
                    assert tuple(sorted(shape[-3:])) not in forbidden_sorted, array


def test_replies_hold_no_identifier_or_path(federation: dict[str, Any]) -> None:
    identifiers: set[str] = set()
    paths: set[str] = {str(federation["registry"])}
    for site_file in federation["sites"]:
        site_ids, site_paths, _ = _site_files(load_site_config(site_file))
        identifiers |= site_ids
        paths |= site_paths
    assert len(identifiers) > 10

    declined_reasons = 0
    for site, replies in federation["replies"].items():
        for reply in replies:
            declined_reasons += int(wire.REASONS in reply["configs"])
            for text in _strings(reply):
                assert not any(value in text for value in identifiers), f"{site}: {text!r}"
                assert not any(value in text for value in paths), f"{site}: {text!r}"
                assert PATH_PATTERN.search(text) is None, f"{site}: {text!r}"
    # hospital-b declined its rounds, so reason strings were among the texts checked.
    assert declined_reasons >= 2


def test_site_info_reply_holds_counts_and_hashes(federation: dict[str, Any]) -> None:
    for site, replies in federation["replies"].items():
        queries = [r for r in replies if r["message_type"] == wire.QUERY_SITE_INFO]
        assert len(queries) == len(STAGES)
        for reply in queries:
            info = reply["configs"][wire.SITE_INFO]
            assert set(info) == {"site", "cached-groups"}
            assert info["site"] == site
            assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in info["cached-groups"])
            for key in reply["metrics"][wire.METRICS]:
                assert re.fullmatch(r"[a-z_]+\.num-(train|eval)", key), key


def _audit_key(message_type: str, stage: str, server_round: int, tensors: list[Any]) -> str:
    described = sorted(
        (t["name"], list(t["shape"]), t["dtype"], t["bytes"], t["sha256"]) for t in tensors
    )
    return json.dumps([message_type, stage, server_round, described])


def test_audit_log_matches_replies(federation: dict[str, Any]) -> None:
    for site_file in federation["sites"]:
        site = load_site_config(site_file)
        lines = (site.state_dir / "audit.jsonl").read_text(encoding="utf-8").splitlines()
        logged: Counter[str] = Counter()
        for line in lines:
            record = json.loads(line)
            assert record["total_bytes"] == sum(t["bytes"] for t in record["tensors"])
            key = _audit_key(
                record["message_type"], record["stage"], record["round"], record["tensors"]
            )
            logged[key + json.dumps(record["metrics"], sort_keys=True)] += 1

        sent: Counter[str] = Counter()
        for reply in federation["replies"][site.site]:
            assert set(reply["metrics"]) == {wire.METRICS}
            metrics = json.dumps(reply["metrics"][wire.METRICS], sort_keys=True)
            key = _audit_key(reply["message_type"], reply["stage"], reply["round"], reply["arrays"])
            sent[key + metrics] += 1

        assert len(lines) == sum(sent.values())
        assert logged == sent


def test_site_audit_command_prints_totals(
    federation: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    site_file = federation["sites"][0]
    site = load_site_config(site_file)
    replies = federation["replies"][site.site]
    total_bytes = sum(array["bytes"] for reply in replies for array in reply["arrays"])

    assert unicon_main(["site", "audit", str(site_file)]) == 0
    text = capsys.readouterr().out
    assert f": {len(replies)} replies, {total_bytes} B (" in text
    assert text == summarize_audit(site.state_dir).to_text() + "\n"
    train = [r for r in replies if r["message_type"] == wire.TRAIN_STAGE and r["stage"] == "ct_cls"]
    train_bytes = sum(array["bytes"] for reply in train for array in reply["arrays"])
    tensor_count = sum(len(reply["arrays"]) for reply in train)
    block = text.split(f"{wire.TRAIN_STAGE}, stage ct_cls:\n", 1)[1]
    assert block.startswith(
        f"  replies {len(train)}, tensors {tensor_count}, bytes {train_bytes} B"
    )


def _audit_records(site_file: Path, message_type: str) -> list[dict[str, Any]]:
    state_dir = load_site_config(site_file).state_dir
    lines = (state_dir / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["message_type"] == message_type]


def test_audit_log_records_dp_and_declines(federation: dict[str, Any]) -> None:
    private = _audit_records(federation["sites"][0], wire.TRAIN_STAGE)
    for stage in STAGES:
        epsilons = [r["metrics"]["dp-epsilon"] for r in private if r["stage"] == stage]
        assert epsilons == sorted(epsilons)
        assert epsilons[0] > 0.0
        assert epsilons[-1] <= 8.0

    declined = _audit_records(federation["sites"][1], wire.TRAIN_STAGE)
    assert len(declined) == 3
    for record in declined:
        assert record["tensors"] == []
        assert record["metrics"] == {wire.DECLINED: 1, wire.NUM_EXAMPLES: 0}
