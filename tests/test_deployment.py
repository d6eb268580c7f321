"""Deployment end to end: SuperLink, two hospital SuperNodes and two continual stages.

The slow part runs the commands an admin and hospital IT run, as processes on
127.0.0.1 with free ports and a temporary ``FLWR_HOME``. It creates a pilot PKI,
starts ``unicon admin server start`` (TLS and node authentication) and registers
two site keys. Then ``unicon site start`` connects two generated tiny sites, and
``unicon admin launch`` runs two curriculum stages as two separate Flower runs.
Every process is stopped by its PID at the end, SuperNodes before the SuperLink,
also when a test fails.

The fast part checks the refusals of ``unicon site start`` that happen before any
process starts, ``unicon site audit``, and the contents of the Flower App Bundle
that ``flwr run`` builds from this repository.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.cli.build import build_fab_from_disk

from client.audit import AuditLog, summarize_audit
from client.site_config import load_site_config
from client.supernode import check_auth_key
from server.certs import PilotPki, create_pilot_pki
from server.deploy import (
    DeployError,
    flower_environment,
    list_nodes,
    list_runs,
    register_site,
)
from server.registry import Registry, VersionInfo
from simulation.cli import main as unicon_main
from simulation.generate import generate_federation

REPO_DIR = Path(__file__).resolve().parents[1]
FAB_MAX_BYTES = 10 * 1024 * 1024

# Timeouts in seconds, with room for slow machines: one tiny stage took up to 150 s on
# two cores shared with other jobs.
CONNECT_TIMEOUT_S = 90.0
STAGE_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 40.0

STARTED_LINE = re.compile(r"SuperNode started \(PID (\d+)\)")
CONNECTED_LINE = re.compile(r"as node (\d+);")
LISTENING_LINE = re.compile(r"SuperLink listening on \S+ \(PID (\d+)\)")
SUBMITTED_LINE = re.compile(r"submitted as Flower run (\d+)")


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


@dataclass
class CommandProcess:
    """A ``unicon`` command running in the background, its output in a file.

    ``child_pid`` is the Flower process it started (SuperLink or SuperNode), read
    from its output. The test kills that process itself only when the command
    failed to stop it.
    """

    name: str
    proc: subprocess.Popen[bytes]
    output: Path
    child_name: str
    child_pid: int | None = None

    def text(self) -> str:
        return self.output.read_text(encoding="utf-8", errors="replace")

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Return the first match of ``pattern`` in the output; fail after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            match = pattern.search(self.text())
            if match:
                return match
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"{self.name}: no line matching {pattern.pattern!r} "
                    f"(exit status {self.proc.poll()}). Output:\n{_tail(self.text())}"
                )
            time.sleep(0.3)

    def terminate(self) -> None:
        """Send SIGTERM by PID if the command still runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """Stop by PID with SIGTERM; SIGKILL it and its Flower child if that fails."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.child_pid is not None and _is_running(self.child_pid, self.child_name):
            os.kill(self.child_pid, signal.SIGKILL)
        return self.proc.returncode


def _is_running(pid: int, name: str) -> bool:
    """Whether ``pid`` is a live process whose command line contains ``name``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return name.encode() in cmdline and state != "Z"


def _start_command(
    name: str, args: list[str], output: Path, env: dict[str, str], child_name: str
) -> CommandProcess:
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "simulation.cli", *args],
            cwd=REPO_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    return CommandProcess(name=name, proc=proc, output=output, child_name=child_name)


def _run_command(
    args: list[str], env: dict[str, str], timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulation.cli", *args],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------
# Federation fixtures
# ---------------------------------------------------------------------------


def _write_curriculum(folder: Path) -> Path:
    raw = {
        "name": "deployment-test",
        "seed": 3,
        "model": {"backbone": "tiny"},
        "defaults": {
            "rounds": 1,
            "local_epochs": 1,
            "learning_rate": 0.01,
            "batch_size": 2,
            "min_sites": 2,
            "timeout_s": 300,
            "train": "new",
            "preprocess": {"spacing": [6.0, 6.0, 6.0], "patch_size": [16, 16, 16]},
        },
        "stages": [
            {
                "name": "ct_cls",
                "task": {"kind": "classification", "modality": "ct", "num_classes": 2},
            },
            {
                "name": "ct_seg",
                "task": {"kind": "segmentation", "modality": "ct", "num_classes": 2},
            },
        ],
    }
    path = folder / "curriculum.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@dataclass
class Deployment:
    """A running federation: SuperLink, two connected sites, the admin's FLWR_HOME."""

    work: Path
    env: dict[str, str]
    flwr_home: Path
    address: str
    pki: PilotPki
    sites: list[Path]
    curriculum: Path
    registry: Path
    server: CommandProcess
    site_processes: dict[str, CommandProcess]
    registered_ids: dict[str, int]
    node_ids: dict[str, int]


def _site_start_args(
    site_yaml: Path, address: str, pki: PilotPki, key_site: str, flwr_home: Path
) -> list[str]:
    return [
        "site",
        "start",
        str(site_yaml),
        "--superlink",
        address,
        "--root-certificates",
        str(pki.ca_certificate),
        "--auth-key",
        str(pki.sites[key_site].private_key),
        "--clientapp-port",
        str(_free_port()),
        "--flwr-home",
        str(flwr_home),
    ]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("deployment")
    flwr_home = work / "admin-flwr-home"
    env = flower_environment(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"

    # hospital-c gets a key pair but is never registered.
    pki = create_pilot_pki(work / "pki", ["hospital-a", "hospital-b", "hospital-c"])
    sites = generate_federation(
        work / "sites", num_sites=2, seed=11, tiny=True, tasks=["ct_cls", "ct_seg"]
    )
    address = f"127.0.0.1:{_free_port()}"
    registry = work / "registry"

    server = _start_command(
        "unicon admin server start",
        [
            "admin",
            "server",
            "start",
            "--registry",
            str(registry),
            "--certs",
            str(pki.root),
            "--address",
            address,
            "--flwr-home",
            str(flwr_home),
        ],
        work / "server.out",
        env,
        child_name="flower-superlink",
    )
    site_processes: dict[str, CommandProcess] = {}
    try:
        server.child_pid = int(server.wait_for(LISTENING_LINE, CONNECT_TIMEOUT_S).group(1))
        registered_ids = {
            name: register_site(pki.sites[name].public_key, flwr_home, name=name)
            for name in ("hospital-a", "hospital-b")
        }

        # Both sites check their data and connect at the same time.
        for name, site_yaml in zip(("hospital-a", "hospital-b"), sites, strict=True):
            site_processes[name] = _start_command(
                f"unicon site start ({name})",
                _site_start_args(site_yaml, address, pki, name, work / f"{name}-flwr-home"),
                work / f"{name}.out",
                env,
                child_name="flower-supernode",
            )
        node_ids = {}
        for name, process in site_processes.items():
            process.child_pid = int(process.wait_for(STARTED_LINE, CONNECT_TIMEOUT_S).group(1))
            node_ids[name] = int(process.wait_for(CONNECTED_LINE, CONNECT_TIMEOUT_S).group(1))

        yield Deployment(
            work=work,
            env=env,
            flwr_home=flwr_home,
            address=address,
            pki=pki,
            sites=sites,
            curriculum=_write_curriculum(work),
            registry=registry,
            server=server,
            site_processes=site_processes,
            registered_ids=registered_ids,
            node_ids=node_ids,
        )
    finally:
        # Sites stop in parallel, each waiting a few seconds for its SuperNode.
        for process in site_processes.values():
            process.terminate()
        for process in site_processes.values():
            process.stop()
        server.stop()


def _diagnostics(deployment: Deployment) -> str:
    parts = [f"--- {deployment.server.name}:\n{_tail(deployment.server.text())}"]
    for process in deployment.site_processes.values():
        parts.append(f"--- {process.name}:\n{_tail(process.text(), 10)}")
    for site_yaml in deployment.sites:
        log = load_site_config(site_yaml).state_dir / "logs" / "supernode.log"
        if log.is_file():
            text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
            parts.append(f"--- {log}:\n{_tail(text, 15)}")
    events = deployment.registry / "runs.jsonl"
    if events.is_file():
        parts.append(f"--- {events}:\n{_tail(events.read_text())}")
    return "\n".join(parts)


def _launch(deployment: Deployment, stage: str) -> int:
    result = _run_command(
        [
            "admin",
            "launch",
            "--stage",
            stage,
            "--registry",
            str(deployment.registry),
            "--curriculum",
            str(deployment.curriculum),
            "--flwr-home",
            str(deployment.flwr_home),
        ],
        deployment.env,
    )
    match = SUBMITTED_LINE.search(result.stdout)
    if result.returncode != 0 or match is None:
        pytest.fail(
            f"unicon admin launch --stage {stage} failed ({result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}"
        )
    return int(match.group(1))


def _wait_for_version(deployment: Deployment, run_id: int, stage: str) -> VersionInfo:
    """Wait until the run wrote the stage's version; fail early when the run ended without it."""
    registry = Registry(deployment.registry)
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    next_status_check = time.monotonic() + 10.0
    status = "unknown"
    while time.monotonic() < deadline:
        version = registry.version_for_stage(stage)
        if version is not None:
            return version
        if time.monotonic() >= next_status_check:
            # The registry is read every second; the slower `flwr list` only catches a
            # run that ended without writing its version. The ServerApp writes the
            # version before the run ends, so the registry is read again after it.
            status = _run_status(deployment, run_id)
            next_status_check = time.monotonic() + 10.0
            if status.startswith("finished") and registry.version_for_stage(stage) is None:
                pytest.fail(
                    f"run {run_id} of stage {stage} ended as {status} without a registry "
                    f"version.\n{_diagnostics(deployment)}"
                )
        time.sleep(1.0)
    pytest.fail(
        f"run {run_id} of stage {stage} wrote no version within {STAGE_TIMEOUT_S:.0f} s "
        f"(status {status}).\n{_diagnostics(deployment)}"
    )


def _wait_for_run_end(deployment: Deployment, run_id: int) -> str:
    """Return the run's final Flower status, ``finished:...``."""
    deadline = time.monotonic() + STAGE_TIMEOUT_S
    status = _run_status(deployment, run_id)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(2.0)
        status = _run_status(deployment, run_id)
    return status


def _run_status(deployment: Deployment, run_id: int) -> str:
    try:
        runs = list_runs(deployment.flwr_home, run_id=run_id)
    except DeployError as error:
        return f"unknown ({error})"
    return str(runs[0]["status"]) if runs else "unknown (not listed)"


def _file_digests(folder: Path) -> dict[str, tuple[str, int]]:
    """SHA-256 and mtime (ns) of every file under ``folder``, by relative path."""
    return {
        str(path.relative_to(folder)): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@dataclass
class StageRuns:
    """The two stages, each launched as its own Flower run."""

    run_ids: tuple[int, int]
    final_status: tuple[str, str]
    v1_before_run2: dict[str, tuple[str, int]]
    v1_id_before_run2: str
    versions: list[VersionInfo]


@pytest.fixture(scope="module")
def stage_runs(deployment: Deployment) -> StageRuns:
    first_run = _launch(deployment, "ct_cls")
    v1 = _wait_for_version(deployment, first_run, "ct_cls")
    # The version folder appears complete (one rename), so it can be read at once.
    v1_files = _file_digests(v1.path)

    second_run = _launch(deployment, "ct_seg")
    _wait_for_version(deployment, second_run, "ct_seg")
    return StageRuns(
        run_ids=(first_run, second_run),
        final_status=(
            _wait_for_run_end(deployment, first_run),
            _wait_for_run_end(deployment, second_run),
        ),
        v1_before_run2=v1_files,
        v1_id_before_run2=v1.version_id,
        versions=Registry(deployment.registry).versions(),
    )


# ---------------------------------------------------------------------------
# Slow: the federation
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_deployment_sites_connect_as_registered(deployment: Deployment) -> None:
    assert deployment.node_ids == deployment.registered_ids
    nodes = {int(n["node-id"]): n["status"] for n in list_nodes(deployment.flwr_home)}
    assert {nodes[node_id] for node_id in deployment.node_ids.values()} == {"online"}


@pytest.mark.slow
def test_deployment_registry_holds_both_versions(
    deployment: Deployment, stage_runs: StageRuns
) -> None:
    versions = stage_runs.versions

    assert [v.stage for v in versions] == ["ct_cls", "ct_seg"]
    assert [v.index for v in versions] == [0, 1]
    assert stage_runs.run_ids[0] != stage_runs.run_ids[1]
    assert stage_runs.final_status == ("finished:completed", "finished:completed")
    assert (deployment.registry / "LATEST").read_text().strip() == versions[1].name
    parent = json.loads((versions[1].path / "version.json").read_text())["parent"]
    assert parent == versions[0].name
    for version in versions:
        metrics = Registry(deployment.registry).read_json(version, "metrics.json")
        assert metrics["sites"] == ["hospital-a", "hospital-b"]


@pytest.mark.slow
def test_deployment_second_run_keeps_stage1(deployment: Deployment, stage_runs: StageRuns) -> None:
    v1 = stage_runs.versions[0]

    # The version-1 folder is untouched: same files, bytes and modification times.
    assert v1.version_id == stage_runs.v1_id_before_run2
    assert _file_digests(v1.path) == stage_runs.v1_before_run2

    # Run 2 trained only its own stage.
    events = [
        json.loads(line) for line in (deployment.registry / "runs.jsonl").read_text().splitlines()
    ]
    run2_starts = [
        e for e in events if e["event"] == "run-start" and e["run_id"] == "launch-ct_seg"
    ]
    assert [e["stages"] for e in run2_starts] == [["ct_seg"]]
    stage_starts = [e["stage"] for e in events if e["event"] == "stage-start"]
    assert stage_starts == ["ct_cls", "ct_seg"]


@pytest.mark.slow
def test_deployment_stage1_tensors_identical_in_v2(stage_runs: StageRuns) -> None:
    v1, v2 = stage_runs.versions
    registry = Registry(v1.path.parents[1])
    model1 = registry.load_model(v1)
    model2 = registry.load_model(v2)
    state1 = model1.state_dict()
    state2 = model2.state_dict()

    # Every tensor of version 1 (frozen backbone, CT stem, ct_cls adapters and head)
    # is bit-identical in version 2, which only adds the ct_seg modules.
    assert set(state1) < set(state2)
    added = set(state2) - set(state1)
    assert added
    assert all(name.startswith(("adapters.ct_seg.", "heads.ct_seg.")) for name in added)
    changed = [name for name in state1 if not torch.equal(state1[name], state2[name])]
    assert changed == []

    images = torch.rand((2, 1, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    model1.eval()
    model2.eval()
    with torch.no_grad():
        assert torch.equal(model1(images, "ct_cls"), model2(images, "ct_cls"))


@pytest.mark.slow
def test_deployment_site_audit_lists_both_runs(
    deployment: Deployment, stage_runs: StageRuns, capsys: pytest.CaptureFixture[str]
) -> None:
    for site_yaml in deployment.sites:
        assert unicon_main(["site", "audit", str(site_yaml), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        groups = {(g["message_type"], g["stage"]): g for g in summary["groups"]}

        assert groups[("train.stage", "ct_cls")]["run_ids"] == ["launch-ct_cls"]
        assert groups[("train.stage", "ct_seg")]["run_ids"] == ["launch-ct_seg"]
        assert groups[("train.stage", "ct_cls")]["replies"] == 1
        assert groups[("train.stage", "ct_seg")]["replies"] == 1
        assert summary["unreadable_lines"] == []

        # In run 2 the site sent no ct_cls tensor.
        state_dir = load_site_config(site_yaml).state_dir
        records = [json.loads(x) for x in (state_dir / "audit.jsonl").read_text().splitlines()]
        run2_names = {
            t["name"] for r in records if r["run_id"] == "launch-ct_seg" for t in r["tensors"]
        }
        assert run2_names
        assert not any(".ct_cls." in name for name in run2_names)


@pytest.mark.slow
def test_deployment_unregistered_site_rejected(deployment: Deployment) -> None:
    # A third site with its own state folder, reading hospital-a's ct_cls data.
    source = yaml.safe_load(deployment.sites[0].read_text())
    source["site"] = "hospital-c"
    source["state_dir"] = "state-hospital-c"
    source["datasets"] = [d for d in source["datasets"] if d["task"] == "ct_cls"]
    site_yaml = deployment.sites[0].parent / "hospital-c.yaml"
    site_yaml.write_text(yaml.safe_dump(source), encoding="utf-8")
    key = deployment.pki.sites["hospital-c"].private_key

    result = _run_command(
        _site_start_args(
            site_yaml, deployment.address, deployment.pki, "hospital-c", deployment.work / "c-home"
        ),
        deployment.env,
        timeout=120.0,
    )

    assert result.returncode == 1
    assert "rejected this SuperNode" in result.stderr
    assert "is not registered" in result.stderr
    assert str(key) in result.stderr
    assert check_auth_key(key) in result.stderr
    started = STARTED_LINE.search(result.stdout)
    assert started is not None
    assert not _is_running(int(started.group(1)), "flower-supernode")
    # The registered sites stay connected.
    assert all(p.proc.poll() is None for p in deployment.site_processes.values())


@pytest.mark.slow
def test_deployment_site_stops_on_sigterm(deployment: Deployment) -> None:
    process = deployment.site_processes["hospital-b"]
    supernode_pid = process.child_pid
    assert supernode_pid is not None

    status = process.stop()

    assert status == 0
    assert not _is_running(supernode_pid, "flower-supernode")
    nodes = {int(n["node-id"]): n for n in list_nodes(deployment.flwr_home)}
    assert nodes[deployment.node_ids["hospital-b"]]["status"] != "online"
    assert nodes[deployment.node_ids["hospital-a"]]["status"] == "online"


# ---------------------------------------------------------------------------
# Fast: refusals before start-up, the audit command, the app bundle
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_pki(tmp_path_factory: pytest.TempPathFactory) -> PilotPki:
    return create_pilot_pki(tmp_path_factory.mktemp("small-pki") / "pki", ["hospital-a"])


def _write_broken_site(folder: Path) -> Path:
    manifest = folder / "ct_cls.csv"
    manifest.write_text(
        "case_id,patient_id,ct,class\ncase-1,p1,missing-1.nii.gz,0\ncase-2,p2,missing-2.nii.gz,1\n"
    )
    site_yaml = folder / "site.yaml"
    site_yaml.write_text(
        yaml.safe_dump(
            {
                "site": "hospital-a",
                "state_dir": "state",
                "datasets": [
                    {
                        "task": "ct_cls",
                        "kind": "classification",
                        "modality": "ct",
                        "format": "csv",
                        "manifest": "ct_cls.csv",
                    }
                ],
            }
        )
    )
    return site_yaml


def test_site_start_without_key_refused(
    small_pki: PilotPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_yaml = _write_broken_site(tmp_path)

    status = unicon_main(
        [
            "site",
            "start",
            str(site_yaml),
            "--superlink",
            "127.0.0.1:9",
            "--root-certificates",
            str(small_pki.ca_certificate),
        ]
    )

    assert status == 2
    assert "--auth-key is missing" in capsys.readouterr().err
    assert not (tmp_path / "state" / "logs" / "supernode.log").exists()


def test_site_start_insecure_with_tls_files_refused(
    small_pki: PilotPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_yaml = _write_broken_site(tmp_path)

    status = unicon_main(
        [
            "site",
            "start",
            str(site_yaml),
            "--superlink",
            "127.0.0.1:9",
            "--insecure",
            "--auth-key",
            str(small_pki.sites["hospital-a"].private_key),
        ]
    )

    assert status == 1
    assert "Insecure mode was requested together with" in capsys.readouterr().err
    assert not (tmp_path / "state" / "logs" / "supernode.log").exists()


def test_site_start_unusable_site_refused(
    small_pki: PilotPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site_yaml = _write_broken_site(tmp_path)

    status = unicon_main(
        [
            "site",
            "start",
            str(site_yaml),
            "--superlink",
            "127.0.0.1:9",
            "--root-certificates",
            str(small_pki.ca_certificate),
            "--auth-key",
            str(small_pki.sites["hospital-a"].private_key),
        ]
    )

    captured = capsys.readouterr()
    assert status == 1
    assert "missing-1.nii.gz" in captured.out
    assert "not usable, so its SuperNode was not started" in captured.err
    assert not (tmp_path / "state" / "logs" / "supernode.log").exists()


def test_site_audit_json_totals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site_yaml = _write_broken_site(tmp_path)
    log = AuditLog(tmp_path / "state")
    weights = np.zeros((4, 3), dtype=np.float32)
    bias = np.ones(3, dtype=np.float64)
    log.append("run-1", "ct_cls", 1, "train.stage", {"w": weights, "b": bias}, {"num-examples": 6})
    log.append("run-1", "ct_cls", 0, "evaluate.tasks", {}, {"ct_cls.auc": 0.5})

    assert unicon_main(["site", "audit", str(site_yaml), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)

    assert summary["replies"] == 2
    assert summary["total_bytes"] == 4 * 3 * 4 + 3 * 8
    groups = {(g["message_type"], g["stage"]): g for g in summary["groups"]}
    assert groups[("train.stage", "ct_cls")]["tensors"] == 2
    assert groups[("evaluate.tasks", "ct_cls")]["metric_names"] == ["ct_cls.auc"]
    assert summary == summarize_audit(tmp_path / "state").to_dict()


@pytest.mark.slow
def test_fab_excludes_runs_and_environment() -> None:
    fab = build_fab_from_disk(REPO_DIR)
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()

    assert len(fab) < FAB_MAX_BYTES, f"FAB is {len(fab)} bytes"
    assert "server/app.py" in names
    assert "client/app.py" in names
    assert "server/curricula/default.yaml" in names
    leaked = [
        name
        for name in names
        if name.startswith(("runs/", ".venv/", ".git/", ".mypy_cache/", ".pytest_cache/"))
        or "__pycache__" in name
        or name.endswith(".jsonl")
        or re.search(r"(^|/)test_[^/]*\.py$", name)
    ]
    assert leaked == []
