"""``unicon admin ...``: commands for the federation's admin."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path
from typing import Any

from unicon_model.log import get_logger

logger = get_logger(__name__)

DEFAULT_FLWR_HOME = Path("runs/admin/flwr-home")
PROJECT_DIR = Path(__file__).resolve().parents[1]


def add_admin_commands(commands: Any) -> None:
    """Register the ``unicon admin`` command group."""
    admin = commands.add_parser("admin", help="commands for the federation's admin")
    sub = admin.add_subparsers(dest="admin_command", required=True, metavar="ADMIN_COMMAND")

    status = sub.add_parser("status", help="stages done, versions, metrics per task and forgetting")
    status.add_argument("--registry", type=Path, required=True, help="the registry folder")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.set_defaults(handler=_status)

    export = sub.add_parser(
        "export", help="write one task's model (spec plus weights) for inference"
    )
    export.add_argument("--registry", type=Path, required=True, help="the registry folder")
    export.add_argument("--task", required=True, help="task name, for example ct_seg")
    export.add_argument("--out", type=Path, required=True, help="output folder")
    export.set_defaults(handler=_export)

    certs = sub.add_parser(
        "certs", help="create a pilot PKI: CA, SuperLink certificate, site key pairs"
    )
    certs.add_argument(
        "--out", type=Path, required=True, help="folder for the PKI (created with mode 0700)"
    )
    certs.add_argument(
        "--site", action="append", default=[], help="site name; repeat for each site"
    )
    certs.add_argument(
        "--host",
        action="append",
        default=None,
        help="SuperLink host name or IP for the certificate; repeat (default: 127.0.0.1 and localhost)",
    )
    certs.add_argument(
        "--days", type=int, default=365, help="certificate validity in days (default: 365)"
    )
    certs.add_argument(
        "--overwrite", action="store_true", help="replace existing keys and certificates"
    )
    certs.set_defaults(handler=_certs)

    server = sub.add_parser("server", help="the SuperLink")
    server_sub = server.add_subparsers(
        dest="server_command", required=True, metavar="SERVER_COMMAND"
    )
    start = server_sub.add_parser(
        "start", help="start flower-superlink with TLS and node authentication"
    )
    start.add_argument(
        "--registry", type=Path, required=True, help="the registry folder stages write into"
    )
    start.add_argument("--certs", type=Path, help="PKI folder from `unicon admin certs`")
    start.add_argument(
        "--address",
        default="127.0.0.1:9092",
        help="HOST:PORT to listen on (default: 127.0.0.1:9092)",
    )
    start.add_argument(
        "--database", type=Path, help="SQLite file for the SuperLink state (default: in memory)"
    )
    start.add_argument(
        "--flwr-home",
        type=Path,
        default=DEFAULT_FLWR_HOME,
        help="FLWR_HOME for the flwr CLI connection",
    )
    start.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS and no node authentication: model updates travel in clear text and any node can join",
    )
    start.set_defaults(handler=_server_start)

    register = sub.add_parser(
        "register-site", help="register a site's public key with the SuperLink"
    )
    register.add_argument("public_key", type=Path, help="the site's auth_key.pub")
    register.add_argument(
        "--flwr-home", type=Path, default=DEFAULT_FLWR_HOME, help="FLWR_HOME of the connection"
    )
    register.set_defaults(handler=_register)

    launch = sub.add_parser(
        "launch", help="start one curriculum stage as a Flower run on the federation"
    )
    launch.add_argument(
        "--stage", required=True, help="stage name from the curriculum, for example ct_seg"
    )
    launch.add_argument(
        "--registry", type=Path, required=True, help="the registry folder (on the server)"
    )
    launch.add_argument(
        "--curriculum", type=Path, help="curriculum YAML (default: the shipped default)"
    )
    launch.add_argument(
        "--flwr-home", type=Path, default=DEFAULT_FLWR_HOME, help="FLWR_HOME of the connection"
    )
    launch.add_argument(
        "--stream", action="store_true", help="stay attached and print the run's log"
    )
    launch.set_defaults(handler=_launch)


def _status(args: argparse.Namespace) -> int:
    from server.admin import format_status, registry_status

    if not args.registry.is_dir():
        logger.error(
            "--registry %s: folder not found; pass the registry folder of a run", args.registry
        )
        return 1
    status = registry_status(args.registry)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _export(args: argparse.Namespace) -> int:
    from server.admin import export_task
    from server.registry import RegistryError

    try:
        out = export_task(args.registry, args.task, args.out)
    except RegistryError as error:
        logger.error("%s", error)
        return 1
    print(f"Exported task {args.task} to {out}")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from server.certs import PkiError, create_pilot_pki

    hosts = args.host or ["127.0.0.1", "localhost"]
    try:
        pki = create_pilot_pki(
            args.out, args.site, server_hosts=hosts, days=args.days, overwrite=args.overwrite
        )
    except PkiError as error:
        logger.error("%s", error)
        return 1
    print(f"Pilot PKI written to {args.out}")
    for site, pair in sorted(pki.sites.items()):
        print(
            f"  {site}: private key {pair.private_key} (keep at the site), public key {pair.public_key}"
        )
    return 0


def _server_start(args: argparse.Namespace) -> int:
    from server.deploy import DeployError, start_superlink, stop_process, write_connection_config

    if args.certs is None and not args.insecure:
        logger.error(
            "--certs is missing: the SuperLink serves TLS with node authentication by default; "
            "create a PKI with `unicon admin certs --out DIR --site NAME` and pass --certs DIR"
        )
        return 2
    try:
        args.registry.mkdir(parents=True, exist_ok=True)
        write_connection_config(
            args.flwr_home,
            args.address,
            None if args.insecure else args.certs / "ca.crt",
            insecure=args.insecure,
        )
        process = start_superlink(
            args.address,
            args.certs,
            insecure=args.insecure,
            database=args.database,
            flwr_home=args.flwr_home,
        )
    except DeployError as error:
        logger.error("%s", error)
        return 1
    print(
        f"SuperLink listening on {args.address} (PID {process.pid}); stop it with Ctrl+C or kill {process.pid}"
    )

    def _stop(signum: int, frame: object) -> None:
        # Stopping inside the handler would deadlock: the interrupted process.wait() below
        # still holds the Popen's wait lock. The exception leaves that wait first.
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        return int(process.wait())
    except KeyboardInterrupt:
        stop_process(process)
        return 0


def _register(args: argparse.Namespace) -> int:
    from server.deploy import DeployError, register_site

    try:
        node_id = register_site(args.public_key, args.flwr_home)
    except DeployError as error:
        logger.error("%s", error)
        return 1
    print(f"Registered {args.public_key} as node {node_id}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    import subprocess

    from server.curriculum import CurriculumError, load_curriculum
    from server.deploy import DeployError, flower_environment, flwr_run_command, launch_run

    try:
        curriculum = load_curriculum(args.curriculum)
        curriculum.stage(args.stage)
    except CurriculumError as error:
        logger.error("%s", error)
        return 1
    run_config = {
        "stages": args.stage,
        "registry": str(args.registry.resolve()),
        "curriculum": str(args.curriculum.resolve()) if args.curriculum else "",
        "run-id": f"launch-{args.stage}",
    }
    try:
        if args.stream:
            command = flwr_run_command(PROJECT_DIR, run_config=run_config, stream=True)
            return subprocess.call(command, env=flower_environment(args.flwr_home))
        run_id = launch_run(PROJECT_DIR, args.flwr_home, run_config=run_config)
    except DeployError as error:
        logger.error("%s", error)
        return 1
    print(f"Stage {args.stage} submitted as Flower run {run_id}")
    return 0
