"""The ``hc-retrofit`` entry point: the app of :mod:`hc_retrofit.cli.core` with every command registered."""

from __future__ import annotations

from collections.abc import Sequence

from hc_retrofit.cli import commands  # noqa: F401  (each command module registers itself on `app`)
from hc_retrofit.cli.core import app

__all__ = ["app", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``hc-retrofit``, ``python -m hc_retrofit``)."""
    from hc_retrofit.log import enable_cli_logging

    enable_cli_logging()

    app(args=argv, prog_name="hc-retrofit")
