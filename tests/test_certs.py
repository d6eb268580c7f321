"""Tests of the pilot PKI: files, certificate chain, SANs, key formats and modes."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from server.certs import (
    PkiError,
    create_pilot_pki,
    create_site_keys,
    load_pilot_pki,
    validate_site_name,
)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki") / "pki"
    create_pilot_pki(out, ["hospital-a", "site2"])
    return out


def _load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_pki_layout_files_exist(pki_dir: Path) -> None:
    expected = [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "sites/hospital-a/auth_key",
        "sites/hospital-a/auth_key.pub",
        "sites/site2/auth_key",
        "sites/site2/auth_key.pub",
    ]
    for name in expected:
        assert (pki_dir / name).is_file(), name
    leftovers = [p.name for p in pki_dir.rglob("*.tmp")]
    assert leftovers == []


def test_pki_server_cert_verifies_for_loopback_ip(pki_dir: Path) -> None:
    ca = _load_cert(pki_dir / "ca.crt")
    server = _load_cert(pki_dir / "server.crt")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca]))
        .build_server_verifier(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    )
    chain = verifier.verify(server, [])
    assert chain[0] == server
    assert chain[-1] == ca


def test_pki_server_cert_sans(pki_dir: Path) -> None:
    server = _load_cert(pki_dir / "server.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]


def test_pki_server_cert_rejects_other_host(pki_dir: Path) -> None:
    ca = _load_cert(pki_dir / "ca.crt")
    server = _load_cert(pki_dir / "server.crt")
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([ca]))
        .build_server_verifier(x509.DNSName("superlink.example.org"))
    )
    with pytest.raises(verification.VerificationError):
        verifier.verify(server, [])


def test_pki_tls_handshake_on_loopback(pki_dir: Path) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki_dir / "server.crt", pki_dir / "server.key")
    client_context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        received: list[bytes] = []

        def serve() -> None:
            conn, _ = listener.accept()
            with server_context.wrap_socket(conn, server_side=True) as tls:
                received.append(tls.recv(16))

        thread = threading.Thread(target=serve)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"hello")
        thread.join(timeout=10)

    assert received == [b"hello"]


def test_pki_custom_hosts_become_sans(tmp_path: Path) -> None:
    pki = create_pilot_pki(tmp_path / "pki", [], server_hosts=["10.1.2.3", "link.example.org"])
    server = _load_cert(pki.server_certificate)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # Loopback is always added, for the admin's flwr CLI on the SuperLink's host.
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    assert sans.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    assert pki.sites == {}


def test_pki_private_keys_mode_0600(pki_dir: Path) -> None:
    for name in ["ca.key", "server.key", "sites/hospital-a/auth_key", "sites/site2/auth_key"]:
        assert _mode(pki_dir / name) == 0o600, name
    for name in ["ca.crt", "server.crt", "sites/hospital-a/auth_key.pub"]:
        assert _mode(pki_dir / name) == 0o644, name
    assert _mode(pki_dir) == 0o700


def test_pki_site_key_p384_openssh(pki_dir: Path) -> None:
    private_path = pki_dir / "sites/hospital-a/auth_key"
    public_path = pki_dir / "sites/hospital-a/auth_key.pub"
    private_bytes = private_path.read_bytes()
    public_text = public_path.read_text()

    assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    assert public_text.startswith("ecdsa-sha2-nistp384 ")
    assert public_text.rstrip("\n").endswith(" hospital-a@unicon-fl")

    private_key = serialization.load_ssh_private_key(private_bytes, password=None)
    assert isinstance(private_key, ec.EllipticCurvePrivateKey)
    assert isinstance(private_key.curve, ec.SECP384R1)

    # Flower's own loader of `flwr supernode register` accepts the public key,
    # and it belongs to the private key.
    registered = try_load_public_key(public_path)
    assert registered == public_key_to_bytes(private_key.public_key())


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen (OpenSSH) not installed")
def test_pki_site_key_read_by_ssh_keygen(pki_dir: Path) -> None:
    derived = subprocess.run(
        ["ssh-keygen", "-y", "-f", str(pki_dir / "sites/site2/auth_key")],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.split()
    written = (pki_dir / "sites/site2/auth_key.pub").read_text().split()
    assert derived[:2] == written[:2]


def test_pki_site_keys_differ(pki_dir: Path) -> None:
    first = (pki_dir / "sites/hospital-a/auth_key.pub").read_text().split()[1]
    second = (pki_dir / "sites/site2/auth_key.pub").read_text().split()[1]
    assert first != second


def test_pki_overwrite_refused(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    create_pilot_pki(out, ["hospital-a"])
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    with pytest.raises(PkiError, match="overwrite"):
        create_pilot_pki(out, ["hospital-a", "hospital-b"])

    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not (out / "sites/hospital-b").exists()


def test_pki_overwrite_allowed_replaces(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    create_pilot_pki(out, ["hospital-a"])
    old_ca = (out / "ca.crt").read_bytes()
    old_key = (out / "sites/hospital-a/auth_key").read_bytes()

    create_pilot_pki(out, ["hospital-a"], overwrite=True)

    assert (out / "ca.crt").read_bytes() != old_ca
    assert (out / "sites/hospital-a/auth_key").read_bytes() != old_key


def test_site_keys_added_later(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    create_pilot_pki(out, ["hospital-a"])
    ca_before = (out / "ca.crt").read_bytes()

    pairs = create_site_keys(out, ["hospital-b"])

    assert pairs["hospital-b"].private_key == out / "sites/hospital-b/auth_key"
    assert _mode(pairs["hospital-b"].private_key) == 0o600
    assert (out / "ca.crt").read_bytes() == ca_before
    with pytest.raises(PkiError, match="overwrite"):
        create_site_keys(out, ["hospital-a"])
    assert sorted(load_pilot_pki(out).sites) == ["hospital-a", "hospital-b"]


@pytest.mark.parametrize(
    "name", ["Hospital-A", "hospital_a", "-a", "a-", "", "a b", "ä", "x" * 64, "../a"]
)
def test_site_name_invalid_rejected(name: str) -> None:
    with pytest.raises(PkiError, match="Invalid site name"):
        validate_site_name(name)


@pytest.mark.parametrize("name", ["a", "hospital-a", "site2", "0x", "x" * 63])
def test_site_name_valid_accepted(name: str) -> None:
    assert validate_site_name(name) == name


def test_pki_input_errors(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="Duplicate"):
        create_pilot_pki(tmp_path / "a", ["x", "x"])
    with pytest.raises(PkiError, match="not one string"):
        create_pilot_pki(tmp_path / "b", "hospital-a")
    with pytest.raises(PkiError, match="Invalid server host"):
        create_pilot_pki(tmp_path / "c", [], server_hosts=["https://link:9092"])
    with pytest.raises(PkiError, match="Empty server_hosts"):
        create_pilot_pki(tmp_path / "d", [], server_hosts=[])
    with pytest.raises(PkiError, match="days=0"):
        create_pilot_pki(tmp_path / "e", [], days=0)
    assert not any((tmp_path / name).exists() for name in "abcde")


def test_load_pilot_pki_missing_files(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match=r"missing ca\.crt, server\.crt, server\.key"):
        load_pilot_pki(tmp_path)
