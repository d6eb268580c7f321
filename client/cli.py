"""The ``unicon site`` command group, run by hospital IT next to the site's data.

Each subcommand is one entry of ``_SUBCOMMANDS``: a name, a help line, a function
that adds its arguments and a handler ``fn(args) -> exit status``. Adding a
subcommand takes one entry and those two functions.

- ``check``: decode and check every file the site YAML names;
- ``start``: check the site, then run its Flower SuperNode (see
  :mod:`client.supernode`) until Ctrl+C or SIGTERM;
- ``audit``: print the totals of the site's audit log (see :mod:`client.audit`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from client.audit import summarize_audit
from client.site_config import SiteConfigError, load_site_config
from client.supernode import (
    SuperNodeError,
    spawn_supernode,
    stop_supernode,
    supernode_command,
    wait_for_supernode,
)
from client.validation import check_site
from unicon_model.log import get_logger

logger = get_logger(__name__)

# Relative to the site's state_dir.
SUPERNODE_LOG = Path("logs") / "supernode.log"
SUPERNODE_LOCK = Path("logs") / "supernode.lock"
# Seconds a signalled SuperNode gets to stop by itself before it is sent SIGTERM.
SIGNAL_GRACE_S = 5.0


@dataclass(frozen=True)
class _Subcommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


def add_site_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``site`` command group and its subcommands to a parser.

    Parameters
    ----------
    subparsers
        The object returned by ``ArgumentParser.add_subparsers()`` of the ``unicon``
        parser. Each subcommand sets ``handler`` (``fn(args) -> int``) as a default.

    Returns
    -------
    argparse.ArgumentParser
        The parser of the ``site`` group.
    """
    site_parser: argparse.ArgumentParser = subparsers.add_parser(
        "site",
        help="commands for hospital IT: check a site's data, run its SuperNode, read its audit log",
        description="Commands run at a hospital site, next to its own studies.",
    )
    site_commands = site_parser.add_subparsers(
        dest="site_command", required=True, metavar="SUBCOMMAND"
    )
    for subcommand in _SUBCOMMANDS:
        parser = site_commands.add_parser(
            subcommand.name, help=subcommand.help, description=subcommand.help
        )
        subcommand.add_arguments(parser)
        parser.set_defaults(handler=subcommand.handler)
    return site_parser


def _add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="SITE.yaml", help="the site YAML file")
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON instead of text"
    )
    parser.add_argument(
        "--num-classes",
        action="append",
        default=[],
        metavar="TASK=K",
        help="number of classes of a task, background included (repeatable; default: "
        "max label_map class + 1, else 2)",
    )


def _parse_num_classes(values: list[str]) -> dict[str, int]:
    """Parse ``TASK=K`` options; raise SiteConfigError with the fix on a bad one."""
    parsed: dict[str, int] = {}
    for value in values:
        task, _, count = value.partition("=")
        if not task or not count.isdigit() or int(count) < 2:
            raise SiteConfigError(
                f"option --num-classes is {value!r}; write TASK=K with K >= 2, "
                "for example --num-classes ct_seg=3"
            )
        parsed[task] = int(count)
    return parsed


def run_site_check(args: argparse.Namespace) -> int:
    """Check a site's data and print the report; return 0 when usable, 1 otherwise."""
    try:
        num_classes = _parse_num_classes(args.num_classes)
        config = load_site_config(args.config)
    except SiteConfigError as error:
        if args.json:
            print(json.dumps({"ok": False, "error": str(error)}, indent=2))
        else:
            print(f"error: {error}", file=sys.stderr)
        return 1

    report = check_site(config, num_classes)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.to_text())
    return 0 if report.ok else 1


def _add_start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="SITE.yaml", help="the site YAML file")
    parser.add_argument(
        "--superlink",
        required=True,
        metavar="HOST:PORT",
        help="address of the federation's SuperLink, from the admin",
    )
    parser.add_argument(
        "--root-certificates",
        type=Path,
        metavar="CA",
        help="CA certificate (ca.crt from the admin) that signed the SuperLink's TLS "
        "certificate (default: the system's trusted CAs)",
    )
    parser.add_argument(
        "--auth-key",
        type=Path,
        metavar="KEY",
        help="this site's private authentication key (auth_key, OpenSSH EC P-384); "
        "required unless --insecure",
    )
    parser.add_argument(
        "--clientapp-port",
        type=int,
        metavar="N",
        help="port of the SuperNode's ClientApp API on 127.0.0.1 (default: 9094); two "
        "SuperNodes on one host need different ports",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no node authentication, for a rehearsal against a SuperLink "
        "started with --insecure: model updates travel in clear text",
    )
    parser.add_argument(
        "--flwr-home",
        type=Path,
        help="FLWR_HOME of the SuperNode, where it unpacks each run's app (default: the "
        "inherited FLWR_HOME, else ~/.flwr)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for the SuperLink to accept the node before a warning; the "
        "SuperNode keeps retrying after it (default: 60)",
    )
    parser.add_argument(
        "--num-classes",
        action="append",
        default=[],
        metavar="TASK=K",
        help="as for `unicon site check`, used by the check that runs before start-up",
    )


class _StopRequested(Exception):
    """SIGTERM reached `unicon site start`; the handler turns it into this exception."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Raise :class:`_StopRequested` on SIGTERM inside the block (main thread only)."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise _StopRequested

    try:
        previous = signal.signal(signal.SIGTERM, _raise)
    except ValueError:
        # signal.signal works only in the main thread; elsewhere SIGTERM keeps its handler.
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _SiteBusyError(Exception):
    """Another `unicon site start` holds the lock of the same state folder."""


@contextmanager
def _site_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` so that one site runs one SuperNode at a time.

    The operating system releases the lock when this process ends, also on SIGKILL.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise _SiteBusyError(
                f"another `unicon site start` (PID {holder}) already runs a SuperNode with the "
                f"state folder of this site (lock file {path}). Stop that one first, or give "
                "this site YAML its own state_dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_site_start(args: argparse.Namespace) -> int:
    """Check the site, start its SuperNode and keep it running until Ctrl+C or SIGTERM.

    Returns
    -------
    int
        0 after a requested stop; 1 when the site is unusable, already running, or its
        SuperNode cannot start, is rejected or exits with an error; 2 on a missing
        authentication key or an invalid timeout; 130 after Ctrl+C during the data
        check.
    """
    if args.auth_key is None and not args.insecure:
        print(
            "error: --auth-key is missing. A SuperLink with node authentication accepts "
            "only registered site keys: pass this site's private key (auth_key), or "
            "--insecure for a rehearsal against a SuperLink started with --insecure.",
            file=sys.stderr,
        )
        return 2
    if not args.connect_timeout > 0:
        print(
            f"error: --connect-timeout is {args.connect_timeout}; give a number of seconds "
            "above 0, for example 60.",
            file=sys.stderr,
        )
        return 2

    # Settings and files are checked before the data, which can take minutes to decode.
    try:
        num_classes = _parse_num_classes(args.num_classes)
        config = load_site_config(args.config)
        command = supernode_command(
            args.superlink,
            args.root_certificates,
            args.auth_key,
            config.source,
            clientapp_port=args.clientapp_port,
            insecure=args.insecure,
        )
    except (SiteConfigError, SuperNodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    try:
        with _site_lock(config.state_dir / SUPERNODE_LOCK):
            report = check_site(config, num_classes)
            if not report.ok:
                print(report.to_text())
                print(
                    f"error: site {config.site} is not usable, so its SuperNode was not "
                    f"started: fix the errors above and run `unicon site check {args.config}` "
                    "again.",
                    file=sys.stderr,
                )
                return 1
            return _run_supernode(command, config.site, config.state_dir / SUPERNODE_LOG, args)
    except _SiteBusyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl+C during the data check, before any SuperNode was started.
        print(
            f"error: interrupted; the SuperNode of site {config.site} was not started.",
            file=sys.stderr,
        )
        return 130


def _run_supernode(
    command: list[str], site: str, output_file: Path, args: argparse.Namespace
) -> int:
    """Run the SuperNode until it stops; return the exit status of `unicon site start`."""
    proc: subprocess.Popen[bytes] | None = None
    try:
        with _sigterm_raises():
            proc = spawn_supernode(command, output_file, flwr_home=args.flwr_home)
            print(f"Site {site}: SuperNode started (PID {proc.pid}), output in {output_file}")
            sys.stdout.flush()
            node_id = _wait_until_connected(proc, output_file, args)
            if node_id is None:
                return 1
            print(
                f"Site {site}: connected to the SuperLink at {args.superlink} as node "
                f"{node_id}; stop with Ctrl+C or SIGTERM (kill {os.getpid()})"
            )
            sys.stdout.flush()
            status = proc.wait()
    except (KeyboardInterrupt, _StopRequested):
        logger.info("Stop requested for site %s", site)
        if proc is not None:
            _stop_after_signal(proc)
        return 0
    finally:
        # Never leave the SuperNode behind, whatever ended this function.
        if proc is not None and proc.poll() is None:
            stop_supernode(proc)

    if status == 0:
        # Flower exits with 0 after a signal sent to the SuperNode itself, for example by a
        # service manager that signals every process of the service.
        logger.info("SuperNode of site %s (PID %d) stopped (exit status 0)", site, proc.pid)
        return 0
    logger.error(
        "SuperNode of site %s (PID %d) exited with status %d; its output is in %s",
        site,
        proc.pid,
        status,
        output_file,
    )
    return 1


def _stop_after_signal(proc: subprocess.Popen[bytes]) -> None:
    """Stop the SuperNode after Ctrl+C or SIGTERM reached this process.

    Ctrl+C in a terminal, and a service manager that signals every process of a
    service, also signal the SuperNode directly. Flower 1.42 then shuts it down
    gracefully and restores the default handlers, so a second SIGTERM from here would
    kill it before it marks itself offline. It therefore gets a few seconds first.
    """
    try:
        status = proc.wait(timeout=SIGNAL_GRACE_S)
    except subprocess.TimeoutExpired:
        stop_supernode(proc)
        return
    logger.info("SuperNode (PID %d) stopped by itself (exit status %d)", proc.pid, status)


def _wait_until_connected(
    proc: subprocess.Popen[bytes], output_file: Path, args: argparse.Namespace
) -> int | None:
    """Return the node ID once connected; None after printing why the SuperNode exited."""
    while True:
        try:
            return wait_for_supernode(
                proc,
                output_file,
                args.superlink,
                root_certificates=args.root_certificates,
                auth_key=args.auth_key,
                timeout=args.connect_timeout,
            )
        except SuperNodeError as error:
            if proc.poll() is not None:
                print(f"error: {error}", file=sys.stderr)
                return None
            # Still running: the SuperLink is down or unreachable and Flower keeps retrying.
            logger.warning("%s\nStill waiting; stop with Ctrl+C or SIGTERM.", error)


def _add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="SITE.yaml", help="the site YAML file")
    parser.add_argument(
        "--json", action="store_true", help="print the summary as JSON instead of text"
    )


def run_site_audit(args: argparse.Namespace) -> int:
    """Print the totals of the site's audit log; return 0, or 1 on an invalid site YAML."""
    try:
        config = load_site_config(args.config)
    except SiteConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    summary = summarize_audit(config.state_dir)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(summary.to_text())
    return 0


_SUBCOMMANDS = (
    _Subcommand(
        name="check",
        help="decode and check every file of a site; exit status 0 when the site is usable",
        add_arguments=_add_check_arguments,
        handler=run_site_check,
    ),
    _Subcommand(
        name="start",
        help="check the site, then run its Flower SuperNode connected to the federation's "
        "SuperLink until Ctrl+C or SIGTERM",
        add_arguments=_add_start_arguments,
        handler=run_site_start,
    ),
    _Subcommand(
        name="audit",
        help="print the totals of what this site sent: replies, tensors and bytes per "
        "message type and stage",
        add_arguments=_add_audit_arguments,
        handler=run_site_audit,
    ),
)
