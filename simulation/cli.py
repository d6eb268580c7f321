"""The ``unicon`` console command.

Subcommands are grouped by user: ``unicon site ...`` for hospital IT,
``unicon admin ...`` for the federation's admin and ``unicon simulate`` for
researchers. Each group lives next to the code it drives and registers its own
arguments, so this module only dispatches.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from unicon_model.log import configure_logging


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every ``unicon`` subcommand."""
    from client.cli import add_site_commands
    from server.cli import add_admin_commands
    from simulation.commands import add_simulation_commands

    parser = argparse.ArgumentParser(
        prog="unicon",
        description="UNICON-FL: federated continual learning of a medical-imaging model.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="verbosity of the log on stderr (default: INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_site_commands(commands)
    add_admin_commands(commands)
    add_simulation_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``unicon`` subcommand and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(getattr(logging, args.log_level))
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
