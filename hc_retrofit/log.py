"""The package's logger (``logging.getLogger("hc_retrofit")``) and the CLI's one-line handler.

Library code logs through :func:`get_logger` and never configures logging itself, the way
transformers users expect: a notebook or script decides where messages go (without any handler,
Python prints warnings and errors on stderr). The ``hc-retrofit`` command installs
:func:`enable_cli_logging`, which prints ``warning: <message>`` lines like the CLI's ``error:`` lines.
"""

from __future__ import annotations

import logging
import sys

ROOT = "hc_retrofit"


def get_logger(name: str = ROOT) -> logging.Logger:
    """The logger of a module of this package (``get_logger(__name__)``): a child of ``hc_retrofit``."""
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".") else f"{ROOT}.{name}")


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = " ".join(record.getMessage().split())
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class _StderrHandler(logging.StreamHandler):
    """Writes to the current ``sys.stderr`` (not the one at creation), so redirections are followed."""

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line errors."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def enable_cli_logging(level: int = logging.WARNING) -> logging.Handler:
    """Print the package's messages at ``level`` and above as ``warning: ...`` lines on stderr (idempotent)."""
    logger = logging.getLogger(ROOT)
    for handler in logger.handlers:
        if getattr(handler, "_hc_cli", False):
            return handler
    handler = _StderrHandler()
    handler.setFormatter(_OneLine())
    handler._hc_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def one_line(err: BaseException) -> str:
    """``Type: message`` with the message's whitespace collapsed and cut to 200 characters (what failed, in a list)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"
