"""Launch and drive a Flower 1.42 SuperLink for a hospital federation.

The functions here build the command lines of ``flower-superlink`` and of the
``flwr`` CLI, start and stop the SuperLink process, write the ``flwr`` CLI's
connection to the SuperLink, and register site keys. The ``unicon admin``
commands call them; they print nothing themselves.

Facts about Flower 1.42 that this module relies on (read from its sources and
checked on loopback):

- ``flower-superlink`` serves the Fleet, Control and Runtime APIs over HTTPS on
  one address, set with ``--host`` and ``--port`` (default 127.0.0.1:8000).
- ``--enable-supernode-auth`` requires TLS, and then only SuperNodes whose
  public key was registered with ``flwr supernode register`` may connect.
- The ``flwr`` CLI reaches a SuperLink through a named connection in
  ``$FLWR_HOME/config.toml``; see :func:`write_connection_config`.
- The SuperLink starts a ``flower-superexec`` child found on ``PATH``, so the
  environment built by :func:`flower_environment` puts this interpreter's
  ``bin`` folder first.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from server.certs import load_pilot_pki
from unicon_model.log import get_logger

logger = get_logger(__name__)

DEFAULT_CONNECTION = "unicon"
FLWR_CONFIG_FILE = "config.toml"

# Environment for every Flower process started from here:
# - no `uv sync` of the app's dependencies from the public package index at run start,
# - no usage telemetry and no update check, because both contact flower.ai and a
#   hospital deployment promises that nothing but model updates leaves a site.
FLOWER_ENVIRONMENT: dict[str, str] = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

# A server listening on every interface is reached from its own host through loopback.
_WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
_RUN_CONFIG_KEY_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


class DeployError(RuntimeError):
    """A SuperLink or ``flwr`` CLI command that cannot be built, started or completed."""


# ---------------------------------------------------------------------------
# Environment and addresses
# ---------------------------------------------------------------------------


def flower_executable(name: str) -> str:
    """Return the path of a Flower console script (``flower-superlink``, ``flwr``, ...).

    The script installed next to the running interpreter wins, so that a
    virtual environment's Flower is used even when it is not on ``PATH``.
    """
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return name


def flower_environment(
    flwr_home: Path | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Build the environment for a Flower process.

    Parameters
    ----------
    flwr_home : Path or None
        Value of ``FLWR_HOME`` (the ``flwr`` CLI's configuration folder). None
        keeps the inherited value (Flower's default is ``~/.flwr``).
    base : Mapping or None
        Environment to start from; None copies ``os.environ``.

    Returns
    -------
    dict[str, str]
        ``base`` plus :data:`FLOWER_ENVIRONMENT`, ``FLWR_HOME`` when given, and
        the running interpreter's ``bin`` folder first on ``PATH``.
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


def parse_address(address: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[::1]:PORT``) into host and port.

    Raises
    ------
    DeployError
        When the address has a scheme, no port, or a port outside 1-65535.
    """
    if "://" in address:
        raise DeployError(
            f"Invalid address {address!r}: give HOST:PORT without a scheme "
            "(for example 127.0.0.1:9092)."
        )
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise DeployError(
            f"Invalid address {address!r}: give HOST:PORT with a port from 1 to 65535 "
            "(for example 127.0.0.1:9092)."
        )
    return host, int(port_text)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_accepts_connections(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise DeployError(
                f"Cannot listen on {_format_address(host, port)}: {err.strerror}. "
                "Stop the process that uses this port or choose another --address."
            ) from err


# ---------------------------------------------------------------------------
# SuperLink
# ---------------------------------------------------------------------------


def superlink_command(
    address: str,
    certs_dir: Path | None,
    insecure: bool = False,
    database: Path | None = None,
    log_file: Path | None = None,
) -> list[str]:
    """Build the ``flower-superlink`` command line.

    Parameters
    ----------
    address : str
        ``HOST:PORT`` the SuperLink listens on; the SuperNodes, the ``flwr``
        CLI and the ServerApp all connect to it. ``0.0.0.0:PORT`` listens on
        every interface.
    certs_dir : Path or None
        PKI folder with ``ca.crt``, ``server.crt`` and ``server.key`` (see
        :mod:`server.certs`). Required unless ``insecure``.
    insecure : bool, default False
        Serve plain HTTP without node authentication. Only for a local test:
        traffic and model updates travel in clear text and any SuperNode can
        join. Logged as a WARNING.
    database : Path or None
        SQLite file for the SuperLink's state (registered nodes, runs). None
        keeps the state in memory, so every site must be registered again
        after a restart.
    log_file : Path or None
        Flower's own rotating log file (``--log-file``), in addition to the
        console output.

    Returns
    -------
    list[str]
        The command, ready for :func:`subprocess.Popen`. It always carries
        ``--disable-runtime-dependency-installation``, and with TLS also
        ``--enable-supernode-auth``.

    Raises
    ------
    DeployError
        On an invalid address, missing certificates without ``insecure``, or
        certificates together with ``insecure``.
    """
    host, port = parse_address(address)
    command = [flower_executable("flower-superlink")]

    if insecure:
        if certs_dir is not None:
            raise DeployError(
                f"Both a certificate folder ({certs_dir}) and insecure mode were requested: "
                "drop --insecure to serve TLS, or drop --certs for a plain-HTTP local test."
            )
        logger.warning(
            "Building an insecure SuperLink command on %s: traffic and model updates travel "
            "in clear text and any SuperNode can join (no TLS, no node authentication). "
            "Use this only on a closed test machine.",
            address,
        )
        command.append("--insecure")
    else:
        if certs_dir is None:
            raise DeployError(
                "No certificate folder given for the SuperLink: pass --certs DIR with ca.crt, "
                "server.crt and server.key (create them with `unicon admin certs`), or "
                "--insecure for a plain-HTTP local test."
            )
        pki = load_pilot_pki(certs_dir)
        command += [
            "--ssl-ca-certfile",
            str(pki.ca_certificate.resolve()),
            "--ssl-certfile",
            str(pki.server_certificate.resolve()),
            "--ssl-keyfile",
            str(pki.server_key.resolve()),
            "--enable-supernode-auth",
        ]

    command += ["--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if database is not None:
        command += ["--database", str(Path(database).resolve())]
    else:
        logger.info(
            "SuperLink state is kept in memory: registered sites and runs are lost when it "
            "stops. Pass a database file to keep them."
        )
    if log_file is not None:
        command += ["--log-file", str(Path(log_file).resolve())]
    return command


def start_superlink(
    address: str,
    certs_dir: Path | None,
    insecure: bool = False,
    database: Path | None = None,
    output_file: Path | None = None,
    flwr_home: Path | None = None,
    ready_timeout: float = 60.0,
) -> subprocess.Popen[bytes]:
    """Start ``flower-superlink`` and wait until it accepts connections.

    Parameters
    ----------
    address, certs_dir, insecure, database
        As in :func:`superlink_command`.
    output_file : Path or None
        File that receives the process's stdout and stderr (appended). None
        sends them to this process's stdout and stderr.
    flwr_home : Path or None
        ``FLWR_HOME`` of the process; see :func:`flower_environment`.
    ready_timeout : float, default 60.0
        Seconds to wait for the port to accept TCP connections.

    Returns
    -------
    subprocess.Popen
        The running SuperLink. Stop it with :func:`stop_process`.

    Raises
    ------
    DeployError
        When the port is already in use, or the process exits or does not
        listen within ``ready_timeout``; the message quotes its last output.
    """
    command = superlink_command(address, certs_dir, insecure=insecure, database=database)
    host, port = parse_address(address)
    _check_port_free(host, port)
    if database is not None:
        Path(database).resolve().parent.mkdir(parents=True, exist_ok=True)

    proc = _spawn(command, output_file, flower_environment(flwr_home))
    logger.info("Started SuperLink (PID %d) on %s", proc.pid, address)

    probe_host = _WILDCARD_TO_LOOPBACK.get(host, host)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DeployError(
                f"SuperLink on {address} exited with status {proc.returncode} during "
                f"start-up.{_output_tail(output_file)}"
            )
        if _port_accepts_connections(probe_host, port):
            logger.info("SuperLink (PID %d) accepts connections on %s", proc.pid, address)
            return proc
        time.sleep(0.2)

    stop_process(proc)
    raise DeployError(
        f"SuperLink on {address} did not accept connections within {ready_timeout:.0f} s "
        f"and was stopped.{_output_tail(output_file)}"
    )


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """Stop a process by its PID: SIGTERM, then SIGKILL after ``timeout`` seconds.

    Flower's SuperLink and SuperNode stop their own ``flower-superexec`` child
    on SIGTERM. Stop SuperNodes before the SuperLink. Do not call it from a
    signal handler that interrupted ``proc.wait()``: that wait still holds the
    ``Popen`` object's lock, so this call would time out and then block for ever.

    Returns
    -------
    int
        The exit status (negative: killed by that signal number).
    """
    if proc.poll() is not None:
        return int(proc.returncode)

    proc.send_signal(signal.SIGTERM)
    try:
        status = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        logger.warning(
            "Process %d did not stop within %.0f s of SIGTERM; sending SIGKILL", proc.pid, timeout
        )
        proc.kill()
        status = proc.wait()
    logger.info("Stopped process %d (exit status %d)", proc.pid, status)
    return int(status)


def _spawn(
    command: list[str], output_file: Path | None, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    if output_file is None:
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    output_file = Path(output_file)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    # The child keeps its own copy of the descriptor, so ours can close at once.
    with output_file.open("ab") as output:
        return subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )


def _output_tail(output_file: Path | None, lines: int = 15) -> str:
    if output_file is None or not Path(output_file).is_file():
        return ""
    text = Path(output_file).read_text(encoding="utf-8", errors="replace")
    tail = "\n".join(text.splitlines()[-lines:])
    return f" Last output ({output_file}):\n{tail}"


# ---------------------------------------------------------------------------
# flwr CLI connection and site registration
# ---------------------------------------------------------------------------


def write_connection_config(
    flwr_home: Path,
    address: str,
    root_certificates: Path | None,
    connection: str = DEFAULT_CONNECTION,
    insecure: bool = False,
) -> Path:
    """Write the ``flwr`` CLI's connection to a SuperLink into ``FLWR_HOME/config.toml``.

    The file gets (other connections already in it are kept)::

        [superlink]
        default = "<connection>"

        [superlink.<connection>]
        address = "<address>"
        root-certificates = "<absolute path of the CA certificate>"

    Parameters
    ----------
    flwr_home : Path
        Folder the ``flwr`` CLI reads through ``FLWR_HOME``; created if missing.
    address : str
        ``HOST:PORT`` of the SuperLink; Flower 1.42 serves its Control API on
        the same address as the Fleet API. A wildcard host (``0.0.0.0``,
        ``::``) is replaced by loopback (``127.0.0.1``, ``::1``), so the SuperLink's
        certificate must then list that loopback address.
    root_certificates : Path or None
        CA certificate that signed the SuperLink's certificate. Required
        unless ``insecure``.
    connection : str, default "unicon"
        Name of the connection, passed later to ``flwr`` commands.
    insecure : bool, default False
        Plain HTTP, for a SuperLink started with ``insecure=True``.

    Returns
    -------
    Path
        The configuration file written.
    """
    host, port = parse_address(address)
    if host in _WILDCARD_TO_LOOPBACK:
        # A SuperLink listening on every interface is reached through loopback here,
        # which the pilot certificate always lists.
        address = _format_address(_WILDCARD_TO_LOOPBACK[host], port)
        logger.info("The flwr connection uses %s for a SuperLink listening on %s", address, host)
    if not connection or not set(connection) <= _RUN_CONFIG_KEY_CHARS - {"."}:
        raise DeployError(
            f"Invalid connection name {connection!r}: use letters, digits, '_' and '-'."
        )
    entry: dict[str, Any] = {"address": address}
    if insecure:
        if root_certificates is not None:
            raise DeployError(
                "Both a CA certificate and insecure mode were given for the flwr connection: "
                "choose one."
            )
        entry["insecure"] = True
    else:
        if root_certificates is None:
            raise DeployError(
                "No CA certificate given for the flwr connection to the SuperLink: pass the "
                "ca.crt that signed the SuperLink's certificate, or insecure=True for a "
                "plain-HTTP SuperLink."
            )
        ca_path = Path(root_certificates).resolve()
        if not ca_path.is_file():
            raise DeployError(f"CA certificate {ca_path} not found: pass the PKI's ca.crt.")
        entry["root-certificates"] = str(ca_path)

    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    config_path = flwr_home / FLWR_CONFIG_FILE
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = tomllib.loads(config_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise DeployError(
                f"Cannot update {config_path}: it is not valid TOML ({err}). "
                "Fix or delete the file."
            ) from err
    superlink = config.setdefault("superlink", {})
    superlink["default"] = connection
    superlink[connection] = entry

    _write_text_atomic(config_path, tomli_w.dumps(config))
    logger.info("Wrote flwr connection %r to %s (SuperLink %s)", connection, config_path, address)
    return config_path


def register_site(
    public_key: Path,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    name: str | None = None,
    timeout: float = 60.0,
) -> int:
    """Register a site's public key on the SuperLink (``flwr supernode register``).

    Parameters
    ----------
    public_key : Path
        The site's ``auth_key.pub`` (``ecdsa-sha2-nistp384 ...``).
    flwr_home : Path
        ``FLWR_HOME`` that contains the connection written by
        :func:`write_connection_config`.
    connection : str, default "unicon"
        Connection name in ``FLWR_HOME/config.toml``.
    name : str or None
        Human-readable SuperNode name stored by the SuperLink.
    timeout : float, default 60.0
        Seconds before the ``flwr`` command is abandoned.

    Returns
    -------
    int
        The node ID the SuperLink assigned; the SuperNode gets this ID when it
        connects with the matching private key.

    Raises
    ------
    DeployError
        When the key file is missing, or the SuperLink rejects or cannot be
        reached; the message quotes Flower's error.
    """
    key_path = Path(public_key).resolve()
    if not key_path.is_file():
        raise DeployError(
            f"Public key {key_path} not found: pass the site's auth_key.pub "
            "(created by `unicon admin certs` or `ssh-keygen -t ecdsa -b 384`)."
        )
    command = [flower_executable("flwr"), "supernode", "register", str(key_path), connection]
    if name is not None:
        command += ["--name", name]
    reply = _run_flwr_json([*command, "--format", "json"], flwr_home, timeout)
    node_id = int(reply["node-id"])
    logger.info("Registered site key %s as SuperNode %d", key_path, node_id)
    return node_id


def unregister_site(
    node_id: int,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    timeout: float = 60.0,
) -> None:
    """Remove a registered SuperNode (``flwr supernode unregister``), for example to rotate its key.

    Raises
    ------
    DeployError
        When the SuperLink rejects the request or cannot be reached.
    """
    command = [flower_executable("flwr"), "supernode", "unregister", str(node_id), connection]
    _run_flwr_json([*command, "--format", "json"], flwr_home, timeout)
    logger.info("Unregistered SuperNode %d", node_id)


def list_nodes(
    flwr_home: Path, connection: str = DEFAULT_CONNECTION, timeout: float = 60.0
) -> list[dict[str, Any]]:
    """List the SuperNodes known to the SuperLink (``flwr supernode list``).

    Returns
    -------
    list[dict]
        One entry per node as Flower 1.42 reports it, with keys such as
        ``node-id`` (a string), ``status`` (``registered``, ``online``,
        ``offline``, ...), ``online-at`` and ``created-at``.
    """
    command = [flower_executable("flwr"), "supernode", "list", connection, "--format", "json"]
    reply = _run_flwr_json(command, flwr_home, timeout)
    nodes: list[dict[str, Any]] = reply.get("nodes", [])
    return nodes


def _run_flwr_json(command: list[str], flwr_home: Path, timeout: float) -> dict[str, Any]:
    """Run a ``flwr ... --format json`` command and return its JSON reply."""
    try:
        result = subprocess.run(
            command,
            env=flower_environment(flwr_home),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise DeployError(
            f"`{' '.join(command[1:])}` timed out after {timeout:.0f} s: check that the "
            "SuperLink is running and reachable at the address in "
            f"{Path(flwr_home) / FLWR_CONFIG_FILE}."
        ) from err

    reply: dict[str, Any] | None = None
    try:
        parsed = json.loads(result.stdout)
        if isinstance(parsed, dict):
            reply = parsed
    except json.JSONDecodeError:
        reply = None

    if result.returncode != 0 or reply is None or not reply.get("success", False):
        detail = str((reply or {}).get("error-message") or (result.stderr + result.stdout))
        # Flower prefixes its error with a "Using SuperLink: NAME (ADDRESS)" line.
        lines = [line for line in detail.splitlines() if line.strip()]
        detail = " ".join(line for line in lines if not line.startswith("Using SuperLink:"))
        raise DeployError(
            f"`{' '.join(command[1:])}` failed (exit status {result.returncode}): {detail}"
        )
    return reply


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def format_run_config(run_config: Mapping[str, Any]) -> str:
    """Format a run configuration as Flower's ``key=value`` override string.

    Values may be bool, int, finite float or str; strings are quoted as TOML
    strings. Flower splits the string at spaces outside quotes and cannot
    parse a string that contains both quote characters, or a line break.

    Raises
    ------
    DeployError
        On a key outside ``[A-Za-z0-9_.-]``, or a value Flower cannot carry.
    """
    items = []
    for key, value in run_config.items():
        if not key or not set(key) <= _RUN_CONFIG_KEY_CHARS:
            raise DeployError(
                f"Invalid run-config key {key!r}: use letters, digits, '_', '-' and '.'."
            )
        items.append(f"{key}={_format_toml_value(key, value)}")
    return " ".join(items)


def _format_toml_value(key: str, value: Any) -> str:
    # bool before int, because bool is a subclass of int.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DeployError(f"Invalid run-config value {key}={value!r}: use a finite number.")
        return repr(value)
    if isinstance(value, str):
        if "\n" in value or "\r" in value:
            raise DeployError(f"Invalid run-config value {key}={value!r}: remove the line break.")
        if '"' not in value:
            escaped = value.replace("\\", "\\\\")
            return f'"{escaped}"'
        if "'" not in value:
            # TOML literal string: no escapes, so the double quotes pass unchanged.
            return f"'{value}'"
        raise DeployError(
            f"Invalid run-config value {key}={value!r}: Flower cannot parse a string that "
            "contains both ' and \" characters."
        )
    raise DeployError(
        f"Invalid run-config value {key}={value!r} ({type(value).__name__}): use bool, int, "
        "float or str."
    )


def flwr_run_command(
    app_dir: Path,
    connection: str = DEFAULT_CONNECTION,
    run_config: Mapping[str, Any] | None = None,
    stream: bool = False,
) -> list[str]:
    """Build the ``flwr run`` command that submits the app as a new run to the SuperLink.

    Flower 1.42 syntax: ``flwr run APP_DIR CONNECTION --run-config 'k1=v1 k2="v2"'``.
    Every key must exist under ``[tool.flwr.app.config]`` of the app's
    ``pyproject.toml``. Run it with :func:`flower_environment` (the same
    ``FLWR_HOME`` as :func:`write_connection_config`).

    Parameters
    ----------
    app_dir : Path
        Folder with the app's ``pyproject.toml``; Flower packs it into a Flower
        App Bundle (``*.py``, ``*.toml``, ``*.md``, ``*.yaml``, ``*.json``,
        at most 10 MB).
    connection : str, default "unicon"
        Connection name in ``FLWR_HOME/config.toml``.
    run_config : Mapping or None
        Run configuration overrides; see :func:`format_run_config`.
    stream : bool, default False
        Keep the command attached and print the run's log until it ends.
        Without it, ``flwr run`` returns once the run is submitted.
    """
    command = [flower_executable("flwr"), "run", str(Path(app_dir).resolve()), connection]
    if run_config:
        command += ["--run-config", format_run_config(run_config)]
    if stream:
        command.append("--stream")
    return command


def launch_run(
    app_dir: Path,
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    run_config: Mapping[str, Any] | None = None,
    timeout: float = 300.0,
) -> int:
    """Submit the app as a new run to the SuperLink and return the run ID.

    The command returns once the SuperLink accepted the run; follow it with
    ``flwr log RUN_ID CONNECTION`` or ``flwr list``.

    Raises
    ------
    DeployError
        When Flower rejects the app or the run configuration, or the SuperLink
        cannot be reached; the message quotes Flower's error.
    """
    command = [*flwr_run_command(app_dir, connection, run_config), "--format", "json"]
    reply = _run_flwr_json(command, flwr_home, timeout)
    run_id = int(reply["run-id"])
    logger.info("Submitted run %d from %s through connection %r", run_id, app_dir, connection)
    return run_id


def list_runs(
    flwr_home: Path,
    connection: str = DEFAULT_CONNECTION,
    run_id: int | None = None,
    timeout: float = 60.0,
) -> list[dict[str, Any]]:
    """List the runs the SuperLink knows (``flwr list``), or only ``run_id``.

    Returns
    -------
    list[dict]
        One entry per run as Flower 1.42 reports it, with keys such as ``run-id``
        (a string), ``status`` (``pending``, ``starting``, ``running``, or
        ``finished:completed``, ``finished:failed``, ``finished:stopped``),
        ``elapsed`` (seconds) and ``network-traffic``.

    Raises
    ------
    DeployError
        When the run is unknown or the SuperLink cannot be reached.
    """
    command = [flower_executable("flwr"), "list", connection, "--format", "json"]
    if run_id is not None:
        command += ["--run-id", str(run_id)]
    reply = _run_flwr_json(command, flwr_home, timeout)
    runs: list[dict[str, Any]] = reply.get("runs", [])
    return runs


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
