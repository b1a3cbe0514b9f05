"""``dithooks report STORE... --out report.html``: one self-contained HTML page.

``cli/main.py`` adds it with ``from .report_cmd import register; register(app)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .output import human_bytes, user_errors


def report(
    stores: List[Path] = typer.Argument(..., help="Stores: captures, routing/probe stores, protocol1/protocol2 and any store with a summary."),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write."),
    title: Optional[str] = typer.Option(None, "--title", help="Page title."),
):
    """Write one self-contained HTML page (figures embedded, tables, run metadata) for STORE..."""
    import sys

    from dithooks.report import write_report

    path = write_report(stores, out, title=title, command="dithooks " + " ".join(sys.argv[1:]))
    typer.echo(f"wrote {path}: {len(stores)} store(s), {human_bytes(path.stat().st_size)}")


def register(app: typer.Typer) -> None:
    app.command("report")(user_errors(report))
