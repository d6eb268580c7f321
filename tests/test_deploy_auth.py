"""Tests of the SuperLink and SuperNode launchers.

The first part checks the command lines against Flower 1.42's own argument
parsers. The part marked ``slow`` starts a real SuperLink with TLS and node
authentication on 127.0.0.1, registers one site key, and starts SuperNodes
with a registered key, an unregistered key and the wrong CA.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.cli.flower_config import read_superlink_connection
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from client.supernode import (
    SuperNodeError,
    SuperNodeRejectedError,
    TlsCertificateError,
    check_auth_key,
    start_supernode,
    stop_supernode,
    supernode_command,
    wait_for_supernode,
)
from server.certs import PilotPki, create_pilot_pki
from server.deploy import (
    DeployError,
    flower_environment,
    flwr_run_command,
    format_run_config,
    list_nodes,
    register_site,
    start_superlink,
    stop_process,
    superlink_command,
    write_connection_config,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PilotPki:
    return create_pilot_pki(
        tmp_path_factory.mktemp("pki") / "pki", ["hospital-a", "hospital-b"]
    )


@pytest.fixture
def site_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text("site: hospital-a\nstate_dir: state\ndatasets: []\n")
    return path


# ---------------------------------------------------------------------------
# Command lines, checked with Flower's parsers
# ---------------------------------------------------------------------------


def test_superlink_command_tls_flags(pki: PilotPki) -> None:
    command = superlink_command("127.0.0.1:39092", pki.root, database=Path("state/link.db"))
    args = _parse_args_run_superlink().parse_args(command[1:])

    assert Path(command[0]).name == "flower-superlink"
    assert args.ssl_ca_certfile == str(pki.ca_certificate.resolve())
    assert args.ssl_certfile == str(pki.server_certificate.resolve())
    assert args.ssl_keyfile == str(pki.server_key.resolve())
    assert args.enable_supernode_auth is True
    assert args.insecure is False
    assert args.runtime_dependency_install is False
    assert (args.host, args.port) == ("127.0.0.1", 39092)
    assert args.database == str(Path("state/link.db").resolve())


def test_superlink_command_insecure_needs_opt_in(
    pki: PilotPki, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(DeployError, match="No certificate folder"):
        superlink_command("127.0.0.1:39092", None)
    with pytest.raises(DeployError, match="Both a certificate folder"):
        superlink_command("127.0.0.1:39092", pki.root, insecure=True)

    with caplog.at_level(logging.WARNING, logger="unicon"):
        command = superlink_command("127.0.0.1:39092", None, insecure=True)
    args = _parse_args_run_superlink().parse_args(command[1:])

    assert args.insecure is True
    assert args.enable_supernode_auth is False
    assert args.runtime_dependency_install is False
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "clear text" in warnings[0]
    assert "any SuperNode can join" in warnings[0]


@pytest.mark.parametrize("address", ["127.0.0.1", "https://127.0.0.1:9092", "host:0", "h:70000"])
def test_superlink_command_bad_address(pki: PilotPki, address: str) -> None:
    with pytest.raises(DeployError, match="Invalid address"):
        superlink_command(address, pki.root)


def test_supernode_command_flags(pki: PilotPki, tmp_path: Path) -> None:
    # A space and a double quote in the path must survive Flower's node-config parser.
    site_dir = tmp_path / 'my "site" dir'
    site_dir.mkdir()
    site = site_dir / "site.yaml"
    site.write_text("site: a\n")
    key = pki.sites["hospital-a"].private_key

    command = supernode_command(
        "127.0.0.1:39092", pki.ca_certificate, key, site, clientapp_port=39111
    )
    args = _parse_args_run_supernode().parse_args(command[1:])

    assert Path(command[0]).name == "flower-supernode"
    assert args.superlink == "127.0.0.1:39092"
    assert args.root_certificates == str(pki.ca_certificate.resolve())
    assert args.auth_supernode_private_key == str(key.resolve())
    assert args.port == 39111
    assert args.insecure is False
    assert parse_config_args([args.node_config]) == {"site-config": str(site.resolve())}


def test_supernode_command_insecure_policy(
    pki: PilotPki, site_yaml: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(SuperNodeError, match="Insecure mode"):
        supernode_command("127.0.0.1:1", pki.ca_certificate, None, site_yaml, insecure=True)
    with pytest.raises(SuperNodeError, match="Insecure mode"):
        supernode_command(
            "127.0.0.1:1", None, pki.sites["hospital-a"].private_key, site_yaml, insecure=True
        )

    with caplog.at_level(logging.WARNING, logger="unicon"):
        command = supernode_command("127.0.0.1:1", None, None, site_yaml, insecure=True)

    assert "--insecure" in command
    assert "--root-certificates" not in command
    assert any("clear text" in r.getMessage() for r in caplog.records)


def test_supernode_command_file_errors(pki: PilotPki, site_yaml: Path, tmp_path: Path) -> None:
    with pytest.raises(SuperNodeError, match=r"Site YAML .* not found"):
        supernode_command("127.0.0.1:1", pki.ca_certificate, None, tmp_path / "none.yaml")
    with pytest.raises(SuperNodeError, match=r"CA certificate .* not found"):
        supernode_command("127.0.0.1:1", tmp_path / "ca.crt", None, site_yaml)
    with pytest.raises(SuperNodeError, match="not an unencrypted OpenSSH private key"):
        supernode_command(
            "127.0.0.1:1", pki.ca_certificate, pki.sites["hospital-a"].public_key, site_yaml
        )
    with pytest.raises(SuperNodeError, match="Invalid SuperLink address"):
        supernode_command("127.0.0.1", pki.ca_certificate, None, site_yaml)


def test_auth_key_fingerprint_matches_ssh_format(pki: PilotPki) -> None:
    blob = base64.b64decode(pki.sites["hospital-a"].public_key.read_text().split()[1])
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert check_auth_key(pki.sites["hospital-a"].private_key) == expected


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (OpenSSH) not installed")
def test_auth_key_fingerprint_matches_ssh_keygen(pki: PilotPki) -> None:
    listed = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(pki.sites["hospital-b"].public_key)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    assert listed[0] == "384"
    assert check_auth_key(pki.sites["hospital-b"].private_key) == listed[1]


def test_run_config_parsed_back_by_flower() -> None:
    config = {
        "stages": "ct_seg petct_seg",
        "note": 'say "hi"',
        "path": "C:\\data\\x",
        "rounds": 3,
        "lr": 0.001,
        "dp": False,
    }
    assert parse_config_args([format_run_config(config)]) == config

    with pytest.raises(DeployError, match="both"):
        format_run_config({"x": "it's \"both\""})
    with pytest.raises(DeployError, match="finite"):
        format_run_config({"x": float("nan")})
    with pytest.raises(DeployError, match="key"):
        format_run_config({"a b": 1})


def test_flwr_run_command_syntax(tmp_path: Path) -> None:
    command = flwr_run_command(tmp_path, "unicon", {"stages": "ct_cls"}, stream=True)
    assert Path(command[0]).name == "flwr"
    assert command[1:] == [
        "run",
        str(tmp_path.resolve()),
        "unicon",
        "--run-config",
        'stages="ct_cls"',
        "--stream",
    ]


def test_connection_config_read_by_flower(
    pki: PilotPki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "flwr-home"
    write_connection_config(home, "127.0.0.1:39092", pki.ca_certificate, connection="other")
    write_connection_config(home, "127.0.0.1:39093", pki.ca_certificate)
    monkeypatch.setenv("FLWR_HOME", str(home))

    default = read_superlink_connection(None)
    other = read_superlink_connection("other")

    assert default.name == "unicon"
    assert default.address == "127.0.0.1:39093"
    assert default.root_certificates == str(pki.ca_certificate.resolve())
    assert default.insecure is False
    assert other.address == "127.0.0.1:39092"


def test_connection_config_wildcard_uses_loopback(pki: PilotPki, tmp_path: Path) -> None:
    path = write_connection_config(tmp_path, "0.0.0.0:39092", pki.ca_certificate)
    assert 'address = "127.0.0.1:39092"' in path.read_text()
    with pytest.raises(DeployError, match="No CA certificate"):
        write_connection_config(tmp_path, "127.0.0.1:39092", None)


def test_flower_environment_disables_network_extras(tmp_path: Path) -> None:
    env = flower_environment(tmp_path, base={"PATH": "/usr/bin"})
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path.resolve())
    assert env["PATH"].endswith(os.pathsep + "/usr/bin")


# ---------------------------------------------------------------------------
# Real processes on 127.0.0.1
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def federation(
    pki: PilotPki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A TLS SuperLink with node authentication, hospital-a registered."""
    work = tmp_path_factory.mktemp("federation")
    home = work / "flwr-home"
    address = f"127.0.0.1:{_free_port()}"
    proc = start_superlink(
        address, pki.root, output_file=work / "superlink.log", flwr_home=home
    )
    try:
        write_connection_config(home, address, pki.ca_certificate)
        node_id = register_site(pki.sites["hospital-a"].public_key, home, name="hospital-a")
        yield {"address": address, "home": home, "node_id": node_id, "work": work}
    finally:
        stop_process(proc)


@pytest.fixture
def supernodes() -> Iterator[Callable[..., tuple[subprocess.Popen[bytes], Path]]]:
    """Start SuperNodes; every one is stopped by its PID at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(
        address: str, ca: Path, key: Path, site: Path, output: Path
    ) -> tuple[subprocess.Popen[bytes], Path]:
        proc = start_supernode(
            address, ca, key, site, output, clientapp_port=_free_port(), flwr_home=output.parent
        )
        started.append(proc)
        return proc, output

    yield start
    for proc in started:
        stop_supernode(proc)


@pytest.fixture(scope="module")
def connected_site(
    pki: PilotPki, federation: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """The registered site hospital-a, connected through its own SuperNode."""
    work = tmp_path_factory.mktemp("hospital-a")
    site = work / "site.yaml"
    site.write_text("site: hospital-a\nstate_dir: state\ndatasets: []\n")
    output = work / "supernode.log"
    proc = start_supernode(
        federation["address"],
        pki.ca_certificate,
        pki.sites["hospital-a"].private_key,
        site,
        output,
        clientapp_port=_free_port(),
        flwr_home=work / "flwr-home",
    )
    try:
        node_id = wait_for_supernode(proc, output, federation["address"], timeout=45)
        yield {"proc": proc, "node_id": node_id, "site_yaml": site}
    finally:
        stop_supernode(proc)


@pytest.mark.slow
def test_registered_supernode_connects(
    federation: dict[str, Any], connected_site: dict[str, Any]
) -> None:
    node_id = connected_site["node_id"]

    assert node_id == federation["node_id"]
    assert connected_site["proc"].poll() is None
    nodes = {int(n["node-id"]): n for n in list_nodes(federation["home"])}
    assert nodes[node_id]["status"] == "online"


@pytest.mark.slow
def test_second_supernode_same_key_rejected(
    pki: PilotPki,
    federation: dict[str, Any],
    connected_site: dict[str, Any],
    supernodes: Callable[..., tuple[subprocess.Popen[bytes], Path]],
    tmp_path: Path,
) -> None:
    key = pki.sites["hospital-a"].private_key
    address = federation["address"]
    second, output = supernodes(
        address, pki.ca_certificate, key, connected_site["site_yaml"], tmp_path / "2.log"
    )

    with pytest.raises(SuperNodeRejectedError, match="already online"):
        wait_for_supernode(second, output, address, auth_key=key, timeout=45)

    assert second.returncode not in (None, 0)
    assert connected_site["proc"].poll() is None


@pytest.mark.slow
def test_unregistered_supernode_rejected(
    pki: PilotPki,
    federation: dict[str, Any],
    supernodes: Callable[..., tuple[subprocess.Popen[bytes], Path]],
    site_yaml: Path,
    tmp_path: Path,
) -> None:
    key = pki.sites["hospital-b"].private_key
    proc, output = supernodes(
        federation["address"], pki.ca_certificate, key, site_yaml, tmp_path / "b.log"
    )

    with pytest.raises(SuperNodeRejectedError) as caught:
        wait_for_supernode(proc, output, federation["address"], auth_key=key, timeout=45)

    assert proc.returncode not in (None, 0)
    message = str(caught.value)
    assert str(key) in message
    assert check_auth_key(key) in message
    assert "not registered" in message
    assert "unicon admin register-site" in message


@pytest.mark.slow
def test_wrong_ca_supernode_explained(
    pki: PilotPki,
    federation: dict[str, Any],
    supernodes: Callable[..., tuple[subprocess.Popen[bytes], Path]],
    site_yaml: Path,
    tmp_path: Path,
) -> None:
    other = create_pilot_pki(tmp_path / "other-pki", [])
    proc, output = supernodes(
        federation["address"],
        other.ca_certificate,
        pki.sites["hospital-a"].private_key,
        site_yaml,
        tmp_path / "c.log",
    )

    started = time.monotonic()
    with pytest.raises(TlsCertificateError) as caught:
        wait_for_supernode(
            proc,
            output,
            federation["address"],
            root_certificates=other.ca_certificate,
            timeout=45,
        )

    assert proc.returncode not in (None, 0)
    message = str(caught.value)
    assert str(other.ca_certificate) in message
    assert "IP:127.0.0.1" in message
    assert "DNS:localhost" in message
    assert "not signed by the CA" in message
    # The failed node never reached the SuperLink, whose node list is unchanged.
    assert time.monotonic() - started < 45
    ids = [int(n["node-id"]) for n in list_nodes(federation["home"])]
    assert ids == [federation["node_id"]]
