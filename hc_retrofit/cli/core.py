"""The ``hc-retrofit`` Typer app, its consoles and one-line error handling, shared by every command.

Each command lives in its own module and registers itself on :data:`app` when imported;
:mod:`hc_retrofit.cli.commands` imports them all and :mod:`hc_retrofit.cli.app` runs the app. Errors the user can fix
(:class:`~hc_retrofit.modeling.errors.HCRetrofitError`) and usage errors are printed as one line,
``error: <message>``, on stderr with exit code 1 (2 for usage errors); Ctrl-C exits with 130.
No traceback is shown for any of them.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperGroup

from hc_retrofit.extras import missing_extra_hint
from hc_retrofit.modeling.errors import HCRetrofitError
from hc_retrofit.private_api import click_exceptions_module

click_exceptions = click_exceptions_module()

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``code``."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


def _show_flags_as_flags(params: list[Any]) -> None:
    """Drop the ``<bool>`` type label typer's help prints beside on/off flags (``--json``, ``--help``).

    A flag takes no value (``--json``, never ``--json true``); a type label suggests it does.
    """
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


def quiet_library_progress() -> None:
    """Silence transformers' own tqdm bars (``Loading weights``, ``Writing model shards``) for a CLI command.

    The command's own status lines and progress bar own the screen; Hub download bars (huggingface_hub)
    stay, since a long download with no sign of life looks like a hang. Called only when a command
    Each command calls it right after importing the modules that import transformers (which it needs
    anyway), so ``--help`` and argument errors stay free of that import, which takes seconds.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()


INTERRUPTED = 130
"""Exit code of Ctrl-C (128 + SIGINT), as shells report it."""

_ENVIRONMENT_ERRNOS = frozenset(
    getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EFBIG") if hasattr(errno, name)
)


class _OneLineErrors(TyperGroup):
    """Runs the commands and turns user errors into one line instead of a traceback or a panel."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        _show_flags_as_flags(params)
        return params

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _show_flags_as_flags(command.get_params(ctx))
        return command

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, *a: Any, **kw: Any) -> Any:
        standalone = kw.pop("standalone_mode", True)
        try:
            result = super().main(args, prog_name, *a, standalone_mode=False, **kw)
        except HCRetrofitError as err:
            fail(str(err), 1)
        except click_exceptions.NoArgsIsHelpError:  # the help has been printed
            sys.exit(2)
        except click_exceptions.UsageError as err:
            hint = f" (see {err.ctx.command_path} --help)" if err.ctx is not None else ""
            fail(err.format_message() + hint, 2)
        except (typer.Abort, KeyboardInterrupt):
            fail("interrupted", INTERRUPTED)
        except ImportError as err:  # an optional extra (train, plot) is not installed
            hint = missing_extra_hint(err)
            if hint is None:
                raise
            fail(hint, 1)
        except click_exceptions.ClickException as err:
            fail(err.format_message(), err.exit_code)
        except OSError as err:  # the machine's, not ours: a full disk, no permission, a read-only filesystem
            if err.errno not in _ENVIRONMENT_ERRNOS:
                raise
            where = f": {err.filename}" if err.filename else ""
            fail(f"{err.strerror or err}{where}; free some space or choose another location (nothing was replaced)", 1)
        code = result if isinstance(result, int) else 0
        if code == INTERRUPTED:  # typer turns Ctrl-C into a bare exit code 130: say what happened
            fail("interrupted", INTERRUPTED)
        if standalone:
            sys.exit(code)
        return result


app = typer.Typer(
    name="hc-retrofit",
    cls=_OneLineErrors,
    help="Retrofit hyper-connections (HC, dynamic HC, mHC) into transformers models, exact at initialisation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
