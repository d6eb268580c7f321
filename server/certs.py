"""Certificates and SuperNode authentication keys for a pilot federation.

A pilot needs three kinds of key material, all created here with the
``cryptography`` package:

- a certificate authority (CA) that the sites trust,
- a TLS certificate for the SuperLink, signed by that CA, whose subject
  alternative names (SANs) list every address the sites use to reach it,
- one authentication key pair per site, in the format Flower 1.42 requires for
  SuperNode authentication: a NIST P-384 EC key, the private key in OpenSSH PEM
  format and the public key as one ``ecdsa-sha2-nistp384 ...`` line.

Folder layout written by :func:`create_pilot_pki`::

    OUT_DIR/
        ca.crt                  CA certificate, copied to every site
        ca.key                  CA private key (0600), stays with the admin
        server.crt              SuperLink TLS certificate
        server.key              SuperLink TLS private key (0600)
        sites/<site>/auth_key       site private key (0600), goes to that site only
        sites/<site>/auth_key.pub   site public key, registered on the SuperLink

A production federation usually brings its own CA and server certificate from
the hospital's PKI; only the site key pairs must then follow the format above.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from unicon_model.log import get_logger

logger = get_logger(__name__)

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.crt"
SERVER_KEY_FILE = "server.key"
SITES_DIR = "sites"
SITE_PRIVATE_KEY_FILE = "auth_key"
SITE_PUBLIC_KEY_FILE = "auth_key.pub"

PRIVATE_KEY_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
DEFAULT_SERVER_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")

# Site names end up in folder names, node names and log lines, so they are kept
# to one DNS-label-like token.
_SITE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

# Certificates start a few minutes in the past so that a site whose clock runs
# slightly behind the admin's still accepts a freshly issued certificate.
_CLOCK_SKEW = dt.timedelta(minutes=5)


class PkiError(ValueError):
    """Invalid request for key material, or key files that would be overwritten."""


@dataclass(frozen=True)
class SiteKeyPair:
    """Paths of one site's SuperNode authentication key pair."""

    site: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class PilotPki:
    """Paths of the files written by :func:`create_pilot_pki`."""

    root: Path
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    sites: dict[str, SiteKeyPair]


def validate_site_name(site: str) -> str:
    """Return ``site`` unchanged when it is a valid site name, else raise :class:`PkiError`.

    A site name has 1 to 63 characters: lower-case letters, digits and ``-``,
    starting and ending with a letter or digit (for example ``hospital-a``).
    """
    if not isinstance(site, str) or not _SITE_NAME.fullmatch(site):
        raise PkiError(
            f"Invalid site name {site!r}: use 1 to 63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit (for example 'hospital-a')."
        )
    return site


def site_key_paths(pki_dir: Path, site: str) -> SiteKeyPair:
    """Return where the key pair of ``site`` lives inside a PKI folder (files may not exist)."""
    site_dir = Path(pki_dir) / SITES_DIR / validate_site_name(site)
    return SiteKeyPair(
        site=site,
        private_key=site_dir / SITE_PRIVATE_KEY_FILE,
        public_key=site_dir / SITE_PUBLIC_KEY_FILE,
    )


def create_pilot_pki(
    out_dir: Path,
    sites: Sequence[str],
    server_hosts: Sequence[str] = DEFAULT_SERVER_HOSTS,
    days: int = 365,
    overwrite: bool = False,
) -> PilotPki:
    """Create a CA, a SuperLink TLS certificate and one authentication key pair per site.

    Parameters
    ----------
    out_dir : Path
        Folder to write into (created with mode 0700 if missing). The layout is
        described in the module docstring.
    sites : Sequence[str]
        Site names (lower-case letters, digits, ``-``). May be empty: site keys
        can be added later with :func:`create_site_keys`.
    server_hosts : Sequence[str], default ("127.0.0.1", "localhost")
        Every address the SuperNodes use to reach the SuperLink. IP addresses
        become IP SANs, names become DNS SANs. A SuperNode that connects through
        an address missing here fails the TLS handshake. ``127.0.0.1`` and
        ``localhost`` are always added, so that the admin's ``flwr`` CLI on the
        SuperLink's host can connect through loopback.
    days : int, default 365
        Validity of the CA and server certificates, in days.
    overwrite : bool, default False
        Replace existing files. Without it, any existing target file raises
        :class:`PkiError` before anything is written.

    Returns
    -------
    PilotPki
        Paths of the files written.

    Raises
    ------
    PkiError
        On an invalid site name or host, duplicate sites, ``days < 1``, or
        existing files when ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    site_names = _validate_sites(sites)
    hosts = _validate_hosts(server_hosts)
    if days < 1:
        raise PkiError(f"Invalid certificate validity days={days}: use 1 or more days.")

    pki = PilotPki(
        root=out_dir,
        ca_certificate=out_dir / CA_CERT_FILE,
        ca_key=out_dir / CA_KEY_FILE,
        server_certificate=out_dir / SERVER_CERT_FILE,
        server_key=out_dir / SERVER_KEY_FILE,
        sites={site: site_key_paths(out_dir, site) for site in site_names},
    )
    targets = [pki.ca_certificate, pki.ca_key, pki.server_certificate, pki.server_key]
    for pair in pki.sites.values():
        targets += [pair.private_key, pair.public_key]
    _check_not_overwriting(targets, overwrite)

    _make_private_dir(out_dir)
    now = dt.datetime.now(dt.UTC)
    not_after = now + dt.timedelta(days=days)

    # Certificate authority.
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _build_ca_certificate(ca_key, now, not_after)
    _write_private_key(pki.ca_key, _pem_private_key(ca_key))
    _write_atomic(pki.ca_certificate, ca_cert.public_bytes(serialization.Encoding.PEM))

    # SuperLink TLS certificate.
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _build_server_certificate(server_key, ca_key, ca_cert, hosts, now, not_after)
    _write_private_key(pki.server_key, _pem_private_key(server_key))
    _write_atomic(pki.server_certificate, server_cert.public_bytes(serialization.Encoding.PEM))

    # Site authentication keys.
    for site in site_names:
        _write_site_key_pair(pki.sites[site])

    logger.info(
        "Created pilot PKI in %s: server hosts %s, %d site key pair(s), valid until %s",
        out_dir,
        ", ".join(hosts),
        len(site_names),
        not_after.date().isoformat(),
    )
    return pki


def create_site_keys(
    pki_dir: Path, sites: Sequence[str], overwrite: bool = False
) -> dict[str, SiteKeyPair]:
    """Create authentication key pairs for sites, under ``pki_dir/sites/<site>/``.

    Use it to add a site to an existing pilot, or to rotate a site's key with
    ``overwrite=True`` (the old public key must then be unregistered on the
    SuperLink and the new one registered). The CA is not needed: site keys
    authenticate the SuperNode to the SuperLink, independently of TLS.

    Raises
    ------
    PkiError
        On an invalid or duplicate site name, or existing key files when
        ``overwrite`` is False.
    """
    pki_dir = Path(pki_dir)
    site_names = _validate_sites(sites)
    pairs = {site: site_key_paths(pki_dir, site) for site in site_names}
    targets = [path for pair in pairs.values() for path in (pair.private_key, pair.public_key)]
    _check_not_overwriting(targets, overwrite)

    _make_private_dir(pki_dir)
    for pair in pairs.values():
        _write_site_key_pair(pair)
    logger.info("Created %d site key pair(s) in %s", len(pairs), pki_dir / SITES_DIR)
    return pairs


def load_pilot_pki(pki_dir: Path) -> PilotPki:
    """Locate the files of a PKI folder written by :func:`create_pilot_pki`.

    ``ca.key`` is optional (the admin may keep it offline). Sites are the
    folders under ``sites/`` that contain a public key.

    Raises
    ------
    PkiError
        When ``ca.crt``, ``server.crt`` or ``server.key`` is missing.
    """
    pki_dir = Path(pki_dir)
    required = {
        CA_CERT_FILE: pki_dir / CA_CERT_FILE,
        SERVER_CERT_FILE: pki_dir / SERVER_CERT_FILE,
        SERVER_KEY_FILE: pki_dir / SERVER_KEY_FILE,
    }
    missing = [name for name, path in required.items() if not path.is_file()]
    if missing:
        raise PkiError(
            f"Incomplete certificate folder {pki_dir}: missing {', '.join(missing)}. "
            "Create one with `unicon admin certs --out DIR --site NAME`, or place your own "
            f"{CA_CERT_FILE}, {SERVER_CERT_FILE} and {SERVER_KEY_FILE} (PEM) there."
        )

    sites: dict[str, SiteKeyPair] = {}
    sites_root = pki_dir / SITES_DIR
    if sites_root.is_dir():
        for site_dir in sorted(sites_root.iterdir()):
            if (site_dir / SITE_PUBLIC_KEY_FILE).is_file() and _SITE_NAME.fullmatch(site_dir.name):
                sites[site_dir.name] = site_key_paths(pki_dir, site_dir.name)

    return PilotPki(
        root=pki_dir,
        ca_certificate=required[CA_CERT_FILE],
        ca_key=pki_dir / CA_KEY_FILE,
        server_certificate=required[SERVER_CERT_FILE],
        server_key=required[SERVER_KEY_FILE],
        sites=sites,
    )


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _validate_sites(sites: Sequence[str]) -> list[str]:
    if isinstance(sites, str):
        # A bare string would be split into one-letter "sites".
        raise PkiError(f"Invalid sites={sites!r}: pass a list of site names, not one string.")
    names = [validate_site_name(site) for site in sites]
    duplicates = sorted({site for site in names if names.count(site) > 1})
    if duplicates:
        raise PkiError(f"Duplicate site name(s) {duplicates}: list each site once.")
    return names


def _validate_hosts(server_hosts: Sequence[str]) -> list[str]:
    if isinstance(server_hosts, str):
        raise PkiError(
            f"Invalid server_hosts={server_hosts!r}: pass a list of hosts, not one string."
        )
    hosts = list(server_hosts)
    if not hosts:
        raise PkiError(
            "Empty server_hosts: list every IP address or DNS name the sites use to reach "
            "the SuperLink (for example ['127.0.0.1', 'localhost'])."
        )
    duplicates = sorted({host for host in hosts if hosts.count(host) > 1})
    if duplicates:
        raise PkiError(f"Duplicate server host(s) {duplicates}: list each host once.")
    for host in hosts:
        if _is_ip_address(host):
            continue
        labels = host.split(".")
        if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise PkiError(
                f"Invalid server host {host!r}: use an IP address (for example 10.0.0.5) "
                "or a DNS name (for example superlink.example.org), without port or scheme."
            )
    return hosts + [host for host in DEFAULT_SERVER_HOSTS if host not in hosts]


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _check_not_overwriting(targets: list[Path], overwrite: bool) -> None:
    existing = [str(path) for path in targets if path.exists()]
    if existing and not overwrite:
        raise PkiError(
            f"Key files already exist: {', '.join(existing)}. "
            "Choose another folder, delete these files, or pass overwrite=True "
            "(sites then need the new CA certificate and keys)."
        )


# ---------------------------------------------------------------------------
# Certificates and keys
# ---------------------------------------------------------------------------


def _build_ca_certificate(
    key: ec.EllipticCurvePrivateKey, now: dt.datetime, not_after: dt.datetime
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "UNICON-FL pilot"),
            x509.NameAttribute(NameOID.COMMON_NAME, "UNICON-FL pilot CA"),
        ]
    )
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        # path_length=0: this CA signs server certificates, never other CAs.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA384())
    )


def _build_server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    now: dt.datetime,
    not_after: dt.datetime,
) -> x509.Certificate:
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        if _is_ip_address(host):
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        else:
            alt_names.append(x509.DNSName(host))

    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "UNICON-FL pilot"),
                    x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted because the SuperLink reads the key at start-up without a prompt.
    # File mode 0600 is the protection.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_site_key_pair(pair: SiteKeyPair) -> None:
    # Flower 1.42 loads the private key with `load_ssh_private_key` and the public key
    # with `load_ssh_public_key`, and accepts NIST curves only.
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    # The trailing comment names the site, so an admin can tell key files apart.
    public_bytes = public_line + f" {pair.site}@unicon-fl\n".encode()

    _make_private_dir(pair.private_key.parent)
    _write_private_key(pair.private_key, private_bytes)
    _write_atomic(pair.public_key, public_bytes)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _make_private_dir(path: Path) -> None:
    # Only newly created folders get 0700; an existing folder keeps the mode its owner chose.
    for parent in reversed([path, *path.parents]):
        if not parent.exists():
            parent.mkdir(mode=0o700)


def _write_private_key(path: Path, data: bytes) -> None:
    _write_atomic(path, data, mode=PRIVATE_KEY_MODE)


def _write_atomic(path: Path, data: bytes, mode: int = PUBLIC_FILE_MODE) -> None:
    """Write ``data`` to a temporary file next to ``path``, then rename it into place.

    The temporary file is created with mode 0600 (``mkstemp``) and only then
    set to ``mode``, so a private key is never readable by others, not even
    briefly.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
