"""A federation killed after a completed round resumes and ends as an uninterrupted run.

The server runs as a real ``unicon simulate`` process (Flower simulation engine). The
test kills its whole process group with SIGKILL once the registry holds the
checkpoint of round 1, starts the same command again, and compares the resulting
registry with one from a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from server.registry import Registry
from simulation.generate import generate_federation

pytestmark = pytest.mark.slow

ROUNDS = 3


def _write_curriculum(path: Path) -> Path:
    raw = {
        "name": "resume",
        "seed": 11,
        "model": {"backbone": "tiny"},
        "defaults": {
            "rounds": ROUNDS,
            "local_epochs": 1,
            "learning_rate": 0.01,
            "batch_size": 2,
            "min_sites": 1,
            "preprocess": {"spacing": [6.0, 6.0, 6.0], "patch_size": [16, 16, 16]},
        },
        "stages": [
            {
                "name": "ct_cls",
                "task": {"kind": "classification", "modality": "ct", "num_classes": 2},
            }
        ],
    }
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _command(curriculum: Path, sites_dir: Path, out: Path) -> list[str]:
    return [
        sys.executable, "-m", "simulation.cli", "simulate",
        "--preset", "smoke", "--curriculum", str(curriculum),
        "--sites-dir", str(sites_dir), "--out", str(out),
    ]  # fmt: skip


def _environment() -> dict[str, str]:
    return {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def _site_folder(tmp: Path, name: str) -> Path:
    """Generate tiny sites and collect their YAMLs in one folder (a --sites-dir)."""
    generated = generate_federation(tmp / f"{name}-data", num_sites=2, seed=4, tiny=True)
    folder = tmp / f"{name}-sites"
    folder.mkdir()
    for path in generated:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
        raw["state_dir"] = str((path.parent / raw["state_dir"]).resolve())
        for dataset in raw["datasets"]:
            dataset["manifest"] = str((path.parent / dataset["manifest"]).resolve())
        (folder / f"{path.parent.name}.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return folder


def test_killed_run_resumes_to_same_registry(tmp_path: Path) -> None:
    curriculum = _write_curriculum(tmp_path / "curriculum.yaml")

    # Reference: a run that is never interrupted, on its own copy of the sites.
    reference_out = tmp_path / "reference"
    subprocess.run(
        _command(curriculum, _site_folder(tmp_path, "reference"), reference_out),
        check=True, env=_environment(), capture_output=True, timeout=600,
    )  # fmt: skip

    # The same run, killed once round 1 is checkpointed.
    sites = _site_folder(tmp_path, "resumed")
    out = tmp_path / "resumed"
    checkpoint = out / "registry" / "checkpoints" / "ct_cls" / "round.json"
    log = (tmp_path / "killed.log").open("wb")
    process = subprocess.Popen(
        _command(curriculum, sites, out),
        env=_environment(),
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint.is_file() and json.loads(checkpoint.read_text())["round"] >= 1:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        killed_at = json.loads(checkpoint.read_text())["round"]
        assert killed_at < ROUNDS
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()
    assert Registry(out / "registry").versions() == []

    resumed = subprocess.run(
        _command(curriculum, sites, out),
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after completed round {killed_at}" in resumed.stderr

    final = Registry(out / "registry").versions()
    expected = Registry(reference_out / "registry").versions()
    assert [v.stage for v in final] == ["ct_cls"]
    assert final[0].version_id == expected[0].version_id
    rounds = Registry(out / "registry").read_json(final[0], "metrics.json")["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
