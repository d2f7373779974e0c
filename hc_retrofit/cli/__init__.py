"""The ``hc-retrofit`` command line: a thin layer over the Python API (see :mod:`hc_retrofit.cli.app`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: :func:`hc_retrofit.cli.app.main`, or a one-line error without the [cli] extra."""
    try:
        from hc_retrofit.cli.app import main as run
    except ImportError as err:
        from hc_retrofit.extras import missing_extra_hint

        hint = missing_extra_hint(err)
        if hint is None:
            raise
        print(f"error: {hint}", file=sys.stderr)
        sys.exit(1)
    run(argv)
