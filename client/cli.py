"""The ``unicon site`` command group, run by hospital IT next to the site's data.

Each subcommand is one entry of ``_SUBCOMMANDS``: a name, a help line, a function
that adds its arguments and a handler ``fn(args) -> exit status``. Adding a
subcommand (``start``, ``audit``) takes one entry and those two functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.site_config import SiteConfigError, load_site_config
from client.validation import check_site


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
        help="commands for hospital IT: check a site's data",
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


_SUBCOMMANDS = (
    _Subcommand(
        name="check",
        help="decode and check every file of a site; exit status 0 when the site is usable",
        add_arguments=_add_check_arguments,
        handler=run_site_check,
    ),
)
