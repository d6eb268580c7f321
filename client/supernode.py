"""Start a site's Flower 1.42 SuperNode and turn its start-up failures into clear errors.

A site runs one ``flower-supernode`` process. It opens one outbound HTTPS
connection to the SuperLink, proves its identity with the site's
authentication key, and starts a ClientApp process for each message of a run.
The ClientApp finds the site YAML through the node config key
``site-config``.

Two start-up failures are common, and Flower 1.42 reports both only as
``Exit Code: 305`` ("could not establish a connection") in its output before
it exits with status 1:

- the SuperLink rejects the node (Flower: ``[code: 2004] Failed to activate
  SuperNode.``), because the site's public key is not registered, or because a
  SuperNode with the same key is already online;
- the SuperLink's certificate does not verify against the CA file given to
  the SuperNode (Flower: ``SSL/TLS handshake error detected.``).

:func:`wait_for_supernode` recognises both and raises an error that names the
key or the CA file, the SuperLink's certificate and the fix.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from unicon_model.log import get_logger

logger = get_logger(__name__)

SITE_CONFIG_KEY = "site-config"
DEFAULT_CLIENTAPP_PORT = 9094

# Environment for every Flower process started from here:
# - no `uv sync` of app dependencies from the public package index,
# - no usage telemetry and no update check, because both contact flower.ai and
#   nothing but the audited model updates is meant to leave a site.
FLOWER_ENVIRONMENT: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
_START_MARKER = b"---- unicon: starting flower-supernode ----"


class SuperNodeError(RuntimeError):
    """A SuperNode that cannot be configured, started or connected."""


class SuperNodeRejectedError(SuperNodeError):
    """The SuperLink rejected the SuperNode: its key is not registered, or is already online."""


class TlsCertificateError(SuperNodeError):
    """The SuperLink's TLS certificate did not verify against the site's CA file."""


# ---------------------------------------------------------------------------
# Command
# ---------------------------------------------------------------------------


def supernode_command(
    superlink: str,
    root_certificates: Path | None,
    auth_key: Path | None,
    site_yaml: Path,
    clientapp_port: int | None = None,
    insecure: bool = False,
    max_retries: int | None = None,
) -> list[str]:
    """Build the ``flower-supernode`` command line of one site.

    Parameters
    ----------
    superlink : str
        ``HOST:PORT`` of the SuperLink, without scheme.
    root_certificates : Path or None
        CA certificate (PEM) that signed the SuperLink's certificate
        (``ca.crt`` from the admin). None trusts the system's CA store, which
        suits a SuperLink with a publicly trusted certificate.
    auth_key : Path or None
        The site's private authentication key (``auth_key``, OpenSSH PEM,
        NIST P-384). Needed when the SuperLink enforces node authentication,
        which a TLS SuperLink started by ``unicon admin server start`` does.
    site_yaml : Path
        The site YAML; passed as the absolute path in node config
        ``site-config``.
    clientapp_port : int or None
        Port of the SuperNode's local ClientApp API on 127.0.0.1 (Flower's
        ``--port``, default 9094). Two SuperNodes on one host need different
        ports.
    insecure : bool, default False
        Plain HTTP without TLS and without node authentication, for a local
        test against a SuperLink started with ``--insecure``. Logged as a
        WARNING. Rejects ``root_certificates`` and ``auth_key``.
    max_retries : int or None
        Reconnection attempts before the SuperNode gives up; None retries
        without limit.

    Returns
    -------
    list[str]
        The command, ready for :func:`subprocess.Popen`.

    Raises
    ------
    SuperNodeError
        On an invalid address or port, a missing file, an authentication key
        Flower cannot use, or TLS files together with ``insecure``.
    """
    _parse_address(superlink)
    site_path = Path(site_yaml).resolve()
    if not site_path.is_file():
        raise SuperNodeError(
            f"Site YAML {site_path} not found: pass the file that describes this site's "
            "datasets (see sites/ for examples)."
        )

    command = [_flower_executable("flower-supernode"), "--superlink", superlink]
    if insecure:
        if root_certificates is not None or auth_key is not None:
            raise SuperNodeError(
                "Insecure mode was requested together with a CA certificate or an "
                "authentication key: Flower uses neither without TLS. Drop --insecure, or "
                "drop --root-certificates and --auth-key for a plain-HTTP local test."
            )
        logger.warning(
            "Building an insecure SuperNode command for %s: traffic and model updates travel "
            "in clear text and the SuperLink cannot authenticate this site. Use this only "
            "on a closed test machine.",
            superlink,
        )
        command.append("--insecure")
    else:
        if root_certificates is not None:
            ca_path = Path(root_certificates).resolve()
            _load_ca_certificates(ca_path)
            command += ["--root-certificates", str(ca_path)]
        else:
            logger.info(
                "No CA certificate given: the SuperNode verifies the SuperLink at %s against "
                "the system's trusted CAs.",
                superlink,
            )
        if auth_key is not None:
            key_path = Path(auth_key).resolve()
            check_auth_key(key_path)
            command += ["--auth-supernode-private-key", str(key_path)]
        else:
            logger.warning(
                "No authentication key given: a SuperLink with node authentication rejects "
                "this SuperNode at start-up."
            )

    node_config = f"{SITE_CONFIG_KEY}={_quote_config_string(str(site_path))}"
    command += ["--node-config", node_config]

    if clientapp_port is not None:
        if not 1 <= clientapp_port <= 65535:
            raise SuperNodeError(
                f"Invalid ClientApp API port {clientapp_port}: choose a free port "
                "from 1 to 65535."
            )
        command += ["--port", str(clientapp_port)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    return command


def check_auth_key(private_key: Path) -> str:
    """Check that a file contains a usable SuperNode authentication key; return its fingerprint.

    Flower 1.42 accepts an EC private key on a NIST curve in OpenSSH PEM format
    (``ssh-keygen -t ecdsa -b 384``). A key readable by group or others is
    logged as a WARNING.

    Returns
    -------
    str
        The public key's fingerprint as ``ssh-keygen -l`` prints it
        (``SHA256:...``), so site and admin can compare keys.

    Raises
    ------
    SuperNodeError
        When the file is missing or contains another kind of key.
    """
    path = Path(private_key)
    if not path.is_file():
        raise SuperNodeError(
            f"Authentication key {path} not found: pass the site's private key file "
            "(auth_key, not auth_key.pub)."
        )
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, UnsupportedAlgorithm, TypeError) as err:
        raise SuperNodeError(
            f"Authentication key {path} is not an unencrypted OpenSSH private key ({err}). "
            "Pass the private key file (auth_key, not auth_key.pub), or create one with "
            "`ssh-keygen -t ecdsa -b 384 -N '' -f auth_key`."
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SuperNodeError(
            f"Authentication key {path} is a {type(key).__name__}, but Flower needs an EC "
            "key on a NIST curve: create one with `ssh-keygen -t ecdsa -b 384 -N '' -f auth_key`."
        )
    if path.stat().st_mode & 0o077:
        logger.warning(
            "Authentication key %s is readable by other users (mode %o): run `chmod 600 %s`.",
            path,
            path.stat().st_mode & 0o777,
            path,
        )
    return public_key_fingerprint(key.public_key())


def public_key_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """Return the ``SHA256:...`` fingerprint of a public key, as ``ssh-keygen -l`` shows it."""
    line = public_key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    blob = base64.b64decode(line.split()[1])
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


# ---------------------------------------------------------------------------
# Process
# ---------------------------------------------------------------------------


def start_supernode(
    superlink: str,
    root_certificates: Path | None,
    auth_key: Path | None,
    site_yaml: Path,
    output_file: Path,
    clientapp_port: int | None = None,
    insecure: bool = False,
    max_retries: int | None = None,
    flwr_home: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``flower-supernode`` in the background, its output appended to ``output_file``.

    The arguments up to ``site_yaml`` and ``clientapp_port``, ``insecure``,
    ``max_retries`` are those of :func:`supernode_command`. ``flwr_home`` sets
    ``FLWR_HOME``, where the SuperNode installs the app bundles of runs.

    Returns
    -------
    subprocess.Popen
        The process, started but not yet connected: call
        :func:`wait_for_supernode` to know whether the SuperLink accepted it.
        Stop it with :func:`stop_supernode`.
    """
    command = supernode_command(
        superlink,
        root_certificates,
        auth_key,
        site_yaml,
        clientapp_port=clientapp_port,
        insecure=insecure,
        max_retries=max_retries,
    )
    return spawn_supernode(command, output_file, flwr_home=flwr_home)


def spawn_supernode(
    command: list[str], output_file: Path, flwr_home: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a command built by :func:`supernode_command`, its output appended to ``output_file``.

    :func:`start_supernode` builds the command and calls this. Callers that build
    the command first, to reject bad settings before slower checks, call it directly.

    Returns
    -------
    subprocess.Popen
        The process, as :func:`start_supernode` returns it.
    """
    output_path = Path(output_file)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    env = flower_environment(flwr_home)

    # The child keeps its own copy of the descriptor, so ours can close at once.
    with output_path.open("ab") as output:
        # The marker separates this process's output from earlier runs in the same file.
        output.write(_START_MARKER + b"\n")
        output.flush()
        proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    superlink = command[command.index("--superlink") + 1] if "--superlink" in command else "?"
    logger.info(
        "Started SuperNode (PID %d) for SuperLink %s, output in %s",
        proc.pid,
        superlink,
        output_path,
    )
    return proc


def wait_for_supernode(
    proc: subprocess.Popen[Any],
    output_file: Path,
    superlink: str,
    root_certificates: Path | None = None,
    auth_key: Path | None = None,
    timeout: float = 60.0,
) -> int:
    """Wait until a started SuperNode is connected and return its node ID.

    Parameters
    ----------
    proc : subprocess.Popen
        Process from :func:`start_supernode`.
    output_file : Path
        Its output file; Flower logs ``SuperNode ID: N`` once the SuperLink
        accepted the node.
    superlink, root_certificates, auth_key
        As given to :func:`start_supernode`; used only in error messages.
    timeout : float, default 60.0
        Seconds to wait.

    Returns
    -------
    int
        The node ID assigned by the SuperLink.

    Raises
    ------
    SuperNodeRejectedError
        The SuperLink does not know the site's public key, or a SuperNode with
        the same key is already online.
    TlsCertificateError
        The SuperLink's certificate does not verify against ``root_certificates``;
        the message lists the certificate's issuer and subject alternative names.
    SuperNodeError
        The process exited for another reason, or is still not connected after
        ``timeout`` (it is left running: stop it or keep waiting).
    """
    output_path = Path(output_file)
    offset = _last_start_offset(output_path)
    deadline = time.monotonic() + timeout
    while True:
        exited = proc.poll() is not None
        text = _read_from(output_path, offset)
        match = _NODE_ID_LINE.search(text)
        if match:
            node_id = int(match.group(1))
            logger.info("SuperNode (PID %d) connected as node %d", proc.pid, node_id)
            return node_id
        if exited:
            raise _diagnose_exit(proc, text, superlink, root_certificates, auth_key, output_path)
        if time.monotonic() >= deadline:
            raise SuperNodeError(
                f"SuperNode (PID {proc.pid}) is not connected to the SuperLink at {superlink} "
                f"after {timeout:.0f} s and keeps retrying. Check that the SuperLink runs and "
                f"that this host may open outbound TCP connections to {superlink}. "
                f"Output: {output_path}.{_tail(text)}"
            )
        time.sleep(0.2)


def stop_supernode(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """Stop a SuperNode by its PID: SIGTERM, then SIGKILL after ``timeout`` seconds.

    Returns
    -------
    int
        The exit status (negative: ended by that signal number).
    """
    if proc.poll() is not None:
        return int(proc.returncode)
    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.warning(
            "SuperNode %d did not stop within %.0f s of SIGTERM; sending SIGKILL", proc.pid, timeout
        )
        proc.kill()
        status = proc.wait()
    logger.info("Stopped SuperNode %d (exit status %d)", proc.pid, status)
    return int(status)


def flower_environment(
    flwr_home: Path | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Build the environment of a Flower process started at a site.

    Returns ``base`` (default ``os.environ``) plus :data:`FLOWER_ENVIRONMENT`,
    ``FLWR_HOME`` when given, and this interpreter's ``bin`` folder first on
    ``PATH`` (the SuperNode starts ``flower-superexec`` from ``PATH``).
    """
    env = dict(os.environ if base is None else base)
    env.update(FLOWER_ENVIRONMENT)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    return env


# ---------------------------------------------------------------------------
# Diagnosis of start-up failures
# ---------------------------------------------------------------------------


def _diagnose_exit(
    proc: subprocess.Popen[Any],
    text: str,
    superlink: str,
    root_certificates: Path | None,
    auth_key: Path | None,
    output_path: Path,
) -> SuperNodeError:
    status = proc.returncode
    if "Failed to activate SuperNode" in text or "[code: 2004]" in text:
        return SuperNodeRejectedError(_rejection_message(superlink, auth_key))
    if "SSL/TLS handshake error" in text or "CERTIFICATE_VERIFY_FAILED" in text:
        reasons = [line.strip() for line in text.splitlines() if "[SSL" in line]
        reported = f" Flower reported: {reasons[-1]}" if reasons else ""
        return TlsCertificateError(describe_tls_failure(superlink, root_certificates) + reported)
    if "Exit Code: 302" in text:
        return SuperNodeError(
            f"Flower could not use the authentication key {auth_key}: pass the site's "
            f"private key in OpenSSH format (auth_key).{_tail(text)}"
        )
    return SuperNodeError(
        f"SuperNode (PID {proc.pid}) exited with status {status} before connecting to "
        f"{superlink}. Output: {output_path}.{_tail(text)}"
    )


def _rejection_message(superlink: str, auth_key: Path | None) -> str:
    if auth_key is None:
        return (
            f"The SuperLink at {superlink} rejected this SuperNode, which has no "
            "authentication key: pass the site's private key (auth_key) whose public key "
            "the federation admin registered."
        )
    try:
        fingerprint = f" (fingerprint {check_auth_key(Path(auth_key))})"
    except SuperNodeError:
        fingerprint = ""
    # Flower 1.42 returns the same error code 2004 in both cases.
    return (
        f"The SuperLink at {superlink} rejected this SuperNode. Either its authentication "
        f"key {auth_key}{fingerprint} is not registered: send {auth_key}.pub to the "
        "federation admin, who runs `unicon admin register-site PUBLIC_KEY`, then start the "
        "site again. Or a SuperNode with the same key is already online: stop the other "
        "instance. A SuperNode killed without SIGTERM stays online on the SuperLink until "
        "it misses its heartbeats, up to about 60 s in Flower 1.42."
    )


def describe_tls_failure(superlink: str, root_certificates: Path | None) -> str:
    """Explain why the SuperLink's certificate fails against a CA file, and how to fix it.

    Fetches the certificate the SuperLink presents (without verifying it, only
    to read it) and compares it with the CA file: issuer and signature,
    validity dates, and whether the subject alternative names (SANs) contain
    the host the SuperNode connects to.
    """
    host, port = _parse_address(superlink)
    ca_name = str(root_certificates) if root_certificates is not None else "the system CA store"
    prefix = f"TLS handshake with the SuperLink at {superlink} failed"

    try:
        pem = ssl.get_server_certificate((host, port), timeout=10)
        server_cert = x509.load_pem_x509_certificate(pem.encode())
    except (OSError, ValueError) as err:
        return (
            f"{prefix}, and its certificate could not be read for a diagnosis ({err}). "
            f"Check that {superlink} is the SuperLink's address and that {ca_name} is the "
            "CA certificate from the federation admin."
        )

    sans = certificate_sans(server_cert)
    san_text = ", ".join(sans) if sans else "none"
    described = (
        f"its certificate has issuer '{server_cert.issuer.rfc4514_string()}' and "
        f"SANs [{san_text}]"
    )

    now = dt.datetime.now(dt.UTC)
    if server_cert.not_valid_after_utc < now:
        return (
            f"{prefix}: {described}, and it expired on "
            f"{server_cert.not_valid_after_utc.date().isoformat()}. Ask the federation admin "
            "to issue a new server certificate."
        )
    if server_cert.not_valid_before_utc > now:
        return (
            f"{prefix}: {described}, and it is valid only from "
            f"{server_cert.not_valid_before_utc.isoformat()}. Check this host's clock."
        )

    if root_certificates is not None:
        ca_certs = _load_ca_certificates(Path(root_certificates))
        if not any(_issued_by(server_cert, ca) for ca in ca_certs):
            ca_subjects = "; ".join(f"'{ca.subject.rfc4514_string()}'" for ca in ca_certs)
            return (
                f"{prefix}: {described}, but it is not signed by the CA in {ca_name} "
                f"(subject {ca_subjects}). Use the ca.crt created together with the "
                "SuperLink's server certificate (ask the federation admin for it)."
            )

    if not _host_in_sans(host, sans):
        return (
            f"{prefix}: {described}, which do not include '{host}'. Connect with an address "
            "listed there, or ask the federation admin to issue a server certificate that "
            f"lists '{host}'."
        )
    return (
        f"{prefix}: {described}, and it was checked against {ca_name}. Ask the federation "
        "admin to compare this certificate with the CA that issued it."
    )


def certificate_sans(cert: x509.Certificate) -> list[str]:
    """Return a certificate's subject alternative names as ``IP:...`` and ``DNS:...`` strings."""
    try:
        extension = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    names = [f"IP:{ip}" for ip in extension.value.get_values_for_type(x509.IPAddress)]
    names += [f"DNS:{name}" for name in extension.value.get_values_for_type(x509.DNSName)]
    return names


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    if cert.issuer != ca.subject:
        return False
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _host_in_sans(host: str, sans: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for name in sans:
        kind, _, value = name.partition(":")
        if kind == "IP" and address is not None and ipaddress.ip_address(value) == address:
            return True
        if kind == "DNS" and address is None and _dns_matches(host.lower(), value.lower()):
            return True
    return False


def _dns_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        # A wildcard covers exactly one leftmost label.
        return host.count(".") == pattern.count(".") and host.endswith(pattern[1:])
    return host == pattern


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _load_ca_certificates(path: Path) -> list[x509.Certificate]:
    if not path.is_file():
        raise SuperNodeError(
            f"CA certificate {path} not found: pass the ca.crt from the federation admin."
        )
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError as err:
        raise SuperNodeError(
            f"CA certificate {path} is not a PEM certificate ({err}): pass the ca.crt from "
            "the federation admin, not a key or a DER file."
        ) from err
    return certs


def _parse_address(address: str) -> tuple[str, int]:
    if "://" in address:
        raise SuperNodeError(
            f"Invalid SuperLink address {address!r}: give HOST:PORT without a scheme "
            "(for example superlink.example.org:9092)."
        )
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise SuperNodeError(
            f"Invalid SuperLink address {address!r}: give HOST:PORT with a port from 1 to "
            "65535 (for example superlink.example.org:9092)."
        )
    return host, int(port_text)


def _quote_config_string(value: str) -> str:
    # Flower parses node config values as TOML and cannot parse a quoted string that
    # contains its own quote character.
    if '"' not in value:
        return '"' + value.replace("\\", "\\\\") + '"'
    if "'" not in value:
        return f"'{value}'"
    raise SuperNodeError(
        f"Invalid site YAML path {value!r}: it contains both ' and \" characters, which "
        "Flower's node config cannot carry. Move the site YAML to a path without quotes."
    )


def _flower_executable(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return name


def _last_start_offset(path: Path) -> int:
    """Return the offset just past the last start marker in ``path`` (0 without one)."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    index = data.rfind(_START_MARKER)
    return 0 if index < 0 else index + len(_START_MARKER)


def _read_from(path: Path, offset: int) -> str:
    if not path.is_file():
        return ""
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    return _ANSI_ESCAPE.sub("", data.decode("utf-8", errors="replace"))


def _tail(text: str, lines: int = 12) -> str:
    last_lines = [line for line in text.splitlines() if line.strip()][-lines:]
    if not last_lines:
        return ""
    return "\nLast output:\n" + "\n".join(last_lines)
