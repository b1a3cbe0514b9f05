"""How the CLI shows things: tables for people, JSON/CSV for scripts, one-line errors."""

from __future__ import annotations

import csv
import functools
import io
import json
import sys
from typing import Any, Callable, Sequence

import typer

from dithooks.errors import DithooksError


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"dithooks: error: {message}", err=True)
    raise typer.Exit(code)


def user_errors(fn: Callable) -> Callable:
    """Turn user errors (and Ctrl-C) into one line on stderr and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DithooksError as e:
            fail(str(e))
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except OSError as e:  # disk full, permission denied, ... while writing or reading
            fail(f"{e.strerror or e}{': ' + str(e.filename) if getattr(e, 'filename', None) else ''}")

    return wrapper


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
