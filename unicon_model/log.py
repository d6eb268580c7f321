"""One logger hierarchy for the whole distribution.

Every module logs through ``get_logger(__name__)``, which places it under the
``unicon`` root logger, so that one handler (console or file) sees the server,
client, model and simulation packages alike.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

ROOT_LOGGER_NAME = "unicon"
_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(module_name: str) -> logging.Logger:
    """Return the logger of a module, placed under the ``unicon`` root logger."""
    return logging.getLogger(f"{ROOT_LOGGER_NAME}.{module_name}")


def ensure_logging(level: int | str = logging.INFO) -> None:
    """Configure console logging unless the ``unicon`` root logger already has handlers.

    Flower starts the ServerApp and ClientApps in processes of its own (SuperLink,
    SuperNode, Ray actors), where nothing has configured logging yet. A process that
    already did (``unicon simulate`` with its log file) keeps its handlers.
    """
    if not logging.getLogger(ROOT_LOGGER_NAME).handlers:
        configure_logging(level)


def configure_logging(level: int | str = logging.INFO, log_file: Path | None = None) -> None:
    """Send ``unicon`` log records to stderr and, optionally, to a file.

    Calling it again replaces the handlers it installed before, so a long-running
    process can move its log file (for example into a new run folder).
    """
    root = logging.getLogger(ROOT_LOGGER_NAME)
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_unicon", False):
            root.removeHandler(handler)
            handler.close()

    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(_FORMAT))
    console._unicon = True  # type: ignore[attr-defined]
    root.addHandler(console)

    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT))
        file_handler._unicon = True  # type: ignore[attr-defined]
        root.addHandler(file_handler)

    # Records stop at the ``unicon`` root so that Flower's own handlers do not print them twice.
    root.propagate = False
