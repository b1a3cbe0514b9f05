"""How the CLI shows things: tables for people, JSON/CSV for scripts, one-line errors."""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import sys
from typing import Any, Callable, Sequence

import typer
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - typer on top of click
    from click.exceptions import ClickException, NoArgsIsHelpError

from dithooks.errors import DithooksError


def fail(message: str, code: int = 2) -> None:
    """Print ``dithooks: error: MESSAGE`` as one line on stderr and exit with ``code``."""
    one_line = " ".join(str(message).split())  # whatever a library put in it, it stays one line
    typer.echo(f"dithooks: error: {one_line}", err=True)
    raise typer.Exit(code)


#: Set to 1 to see the traceback of an unexpected error instead of its one-line summary.
DEBUG_ENV = "DITHOOKS_DEBUG"


def user_errors(fn: Callable) -> Callable:
    """Turn user errors (and Ctrl-C) into one line on stderr and a non-zero exit.

    Anything else is a dithooks bug: it too becomes one line (``internal error``, exit 70, asking
    for a report) unless ``DITHOOKS_DEBUG=1`` is set, which lets the traceback through.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except DithooksError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:  # `dithooks query ... | head`: the reader has gone; stop quietly, as other tools do
            _silence_stdout()
            raise typer.Exit(0)
        except MemoryError:
            fail("out of memory: use fewer seeds, layers or hook points, or a smaller --dtype", 1)
        except OSError as e:  # disk full, permission denied, ... while writing or reading
            fail(f"{e.strerror or e}{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}")
        except Exception as e:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            fail(f"internal error: {type(e).__name__}: {e} (a dithooks bug: please report it; "
                 f"{DEBUG_ENV}=1 shows the traceback)", 70)

    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. a test runner)
        pass


class OneLineErrors(TyperGroup):
    """The ``dithooks`` command group: usage errors (unknown option, bad int, missing argument)
    are one line on stderr, like every other error, instead of a boxed usage message."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                                standalone_mode=False, **extra)
        try:
            rv = super().main(args=args, prog_name=prog_name, complete_var=complete_var,
                              standalone_mode=False, **extra)
        except NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except ClickException as e:
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"dithooks: error: {' '.join(e.format_message().split())}{hint}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("dithooks: error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)


def _flags_without_bool_metavar() -> None:
    """typer 0.2x shows ``--resume <bool>`` for on/off flags, which take no value: show ``--resume``."""
    try:
        from typer.core import TyperOption
    except ImportError:  # pragma: no cover - another typer layout
        return
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None or getattr(original, "_dithooks", False):
        return

    def display_type_rich(self, ctx):
        if getattr(self, "is_flag", False) and getattr(self, "is_bool_flag", True):
            return None
        return original(self, ctx)

    display_type_rich._dithooks = True
    TyperOption.display_type_rich = display_type_rich


_flags_without_bool_metavar()


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def print_csv(rows: Sequence[dict[str, Any]]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    typer.echo(buf.getvalue().rstrip("\n"))


def print_table(rows: Sequence[dict[str, Any]], title: str | None = None, floatfmt: str = ".6g") -> None:
    from rich.console import Console
    from rich.table import Table

    if not rows:
        typer.echo("(no rows)")
        return
    table = Table(title=title, show_edge=False, header_style="bold")
    cols = list(rows[0])
    for c in cols:
        table.add_column(str(c), justify="right" if isinstance(rows[0][c], (int, float)) else "left")
    for r in rows:
        table.add_row(*[format(r[c], floatfmt) if isinstance(r[c], float) else str(r[c]) for c in cols])
    Console(file=sys.stdout, width=max(100, min(200, 20 * len(cols)))).print(table)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
