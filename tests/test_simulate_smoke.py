"""``unicon simulate --preset smoke`` end to end, as CI and users run it."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from server.registry import Registry

pytestmark = pytest.mark.slow

STAGES = ["ct_cls", "ct_prog", "ct_seg", "petct_seg"]
PRIMARY = {"ct_cls": "auc", "ct_prog": "c_index", "ct_seg": "dice", "petct_seg": "dice"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smoke") / "run"
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulation.cli",
            "simulate",
            "--preset",
            "smoke",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Report: {out / 'report.md'}" in result.stdout
    return out


def _is_finite_or_undefined(value: str) -> bool:
    if value.startswith("undefined: ") and len(value) > len("undefined: "):
        return True
    return math.isfinite(float(value))


def test_smoke_writes_outputs(smoke_run: Path) -> None:
    for name in ("report.md", "metrics.csv", "accuracy_matrix.csv", "simulation.log"):
        assert (smoke_run / name).stat().st_size > 0, name
    for name in ("accuracy_matrix.png", "bytes_per_round.png", "tasks_across_stages.png"):
        assert (smoke_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert [v.stage for v in Registry(smoke_run / "registry").versions()] == STAGES


def test_smoke_metrics_cover_every_stage_and_task(smoke_run: Path) -> None:
    with (smoke_run / "metrics.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert rows
    assert set(rows[0]) == {"stage", "round", "site", "task", "metric", "value"}
    for row in rows:
        assert _is_finite_or_undefined(row["value"]), row

    pooled = {(r["stage"], r["task"]): r for r in rows if r["site"] == "pooled"}
    for index, stage in enumerate(STAGES):
        for task in STAGES[: index + 1]:
            row = pooled[(stage, task)]
            assert row["metric"] == PRIMARY[task]
    trained = {(r["stage"], r["task"]) for r in rows if r["metric"] == "train-loss"}
    assert trained == {(stage, stage) for stage in STAGES}


def test_smoke_matrix_csv_is_lower_triangular(smoke_run: Path) -> None:
    with (smoke_run / "accuracy_matrix.csv").open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["stage", *STAGES]
    assert [r[0] for r in rows[1:]] == STAGES
    for index, row in enumerate(rows[1:]):
        for later in row[2 + index :]:
            assert later == "", row


def test_smoke_report_sections(smoke_run: Path) -> None:
    report = (smoke_run / "report.md").read_text(encoding="utf-8")
    for heading in (
        "## Per stage",
        "## Accuracy matrix",
        "## Bytes on the wire",
        "## Methods compared",
    ):
        assert heading in report
    assert "Backward transfer:" in report
    assert "ctfm" in report
    for stage in STAGES:
        assert f"| {stage} |" in report


def test_smoke_starts_from_pretrained_backbone(smoke_run: Path) -> None:
    """The preset pretrains the backbone, names it in the curriculum, and every version keeps it."""
    curriculum = yaml.safe_load((smoke_run / "curriculum-unicon.yaml").read_text())
    weights = Path(curriculum["model"]["pretrained"])
    assert weights.name == "backbone.safetensors"
    assert weights.parent.parent.resolve() == (smoke_run.parent / ".pretrained").resolve()
    assert (weights.parent / "backbone.json").stat().st_size > 0

    saved = load_file(str(weights))
    registry = Registry(smoke_run / "registry")
    for version in registry.versions():
        model = registry.load_model(version)
        assert torch.equal(model.backbone.pooled_shift, saved["unicon.pooled_shift"]), version.name
        assert torch.equal(model.backbone.pooled_scale, saved["unicon.pooled_scale"]), version.name
        assert torch.equal(
            model.get_parameter("backbone.down_layers.3.1.conv2.conv.weight"),
            saved["down_layers.3.1.conv2.conv.weight"],
        ), version.name
