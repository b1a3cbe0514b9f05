"""``dithooks query``: parse the selection, stream the reduction, print rows (see docs/store-format.md).

Kept out of cli/main.py so that the query path imports only numpy and the reader: no torch,
diffusers or zarr-python (``python -X importtime -m dithooks.cli.main query ...`` shows it).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from .output import print_table, user_errors


def run_query(store: Path, hook: str, *, step=None, layer=None, sample=None, cfg=None, replica=None,
              reduce: str = "norm", over=None, as_json: bool = False, as_csv: bool = False, limit: int = 200,
              allow_incomplete: bool = False) -> None:
    from dithooks.query import reduce_store
    from dithooks.store.reader import IncompleteDataWarning, SelectionError, open_store, parse_index

    if as_json and as_csv:
        raise SelectionError("--json and --csv exclude each other: choose one")
    if limit < 0:
        raise SelectionError(f"--limit {limit}: give a number of rows, 0 or more")
    sel = {"step": parse_index(step, "--step"), "layer": parse_index(layer, "--layer"),
           "sample": parse_index(sample, "--sample"), "cfg": parse_index(cfg, "--cfg", names=True),
           "replica": parse_index(replica, "--replica", names=True)}
    dims_over = [d.strip() for d in over.split(",") if d.strip()] if over is not None else None
    if over is not None and not dims_over:
        raise SelectionError("empty --over: name dims to reduce, e.g. token,channel")
    s = open_store(store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IncompleteDataWarning)
        red = reduce_store(s, hook, reduce, dims_over, allow_incomplete=allow_incomplete,
                           max_values=None if (as_json or as_csv) else 100_000, **sel)
    for w in caught:
        if issubclass(w.category, IncompleteDataWarning):
            typer.echo(f"dithooks: warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    # `dithooks query ... | head`: a reader that has seen enough ends it quietly (output.user_errors)
    print_rows(store, red, reduce, limit, as_json, as_csv, s.coord("timestep"))


def print_rows(store, red, reduce: str, limit: int, as_json: bool, as_csv: bool, timesteps: np.ndarray) -> None:
    """Rows of a reduced selection as JSON / CSV (streamed in batches) or a table of ``limit`` rows."""
    from dithooks.query import iter_rows

    value = reduce if reduce != "none" else "value"
    extra = {"timestep": ("step", timesteps)} if "step" in red.dims and len(timesteps) else {}
    total = int(red.values.size)
    out = sys.stdout
    if as_json:
        import json

        head = {"store": str(store), "array": red.name, "reduce": reduce, "dims": list(red.dims),
                "incomplete_steps": red.incomplete_steps, "nan_chunks": red.missing}
        out.write(json.dumps(head)[:-1] + ', "records": [')
        sep = "\n  "
        for rows in iter_rows(red, value, extra, nan_as_none=True):
            out.write(sep + ",\n  ".join(json.dumps(r) for r in rows))
            sep = ",\n  "
        out.write("\n]}\n")
    elif as_csv:
        import csv
        import io

        first = True
        for rows in iter_rows(red, value, extra):
            buf = io.StringIO()
            w = csv.writer(buf, lineterminator="\n")
            if first:
                w.writerow(list(rows[0]))
                first = False
            w.writerows([list(r.values()) for r in rows])
            out.write(buf.getvalue())
    else:
        records = [r for rows in iter_rows(red, value, extra, limit=limit) for r in rows]
        title = f"{red.name}  {reduce} over {', '.join(red.reduced) or 'nothing'}"
        if records:
            print_table(records, title=title)
        elif total == 0:
            typer.echo("(no rows)")
        if total > limit:
            typer.echo(f"... {total - limit} more rows (--limit, --json or --csv for all)")
    out.flush()


def query(
    store: Path = typer.Argument(..., help="A capture store."),
    hook: str = typer.Argument(..., help="Hook point (blocks.3.resid_post), or array (blocks.resid_post) for all layers."),
    step: Optional[str] = typer.Option(None, "--step", help="Step positions: 5, -1 (last), 0:10, ::2, 0,5,9, 3-7, 40- (to the end)."),
    layer: Optional[str] = typer.Option(None, "--layer", help="Block indices: 3, -1 (last captured), 0-27, 20- (20 to the last captured), 0,5."),
    sample: Optional[str] = typer.Option(None, "--sample", help="Samples: 0, 0:4, 0-3."),
    cfg: Optional[str] = typer.Option(None, "--cfg", help="cond or uncond (guided stores)."),
    replica: Optional[str] = typer.Option(None, "--replica", help="a or b (replica-pair stores)."),
    reduce: str = typer.Option("norm", "--reduce", "-r", help="norm, mean, std, rms, absmax or none."),
    over: Optional[str] = typer.Option(None, "--over", help="Dims to reduce (default: all value dims, e.g. token,channel)."),
    as_json: bool = typer.Option(False, "--json", help="Print records as JSON (NaN as null)."),
    as_csv: bool = typer.Option(False, "--csv", help="Print records as CSV."),
    limit: int = typer.Option(200, "--limit", help="Most rows to print as a table (JSON/CSV print all)."),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete", help="Read steps not marked complete and missing or damaged chunks as NaN (with a warning) instead of refusing."),
):
    """Slice one hook point by step/layer/sample and reduce it to a table (streamed chunk by chunk)."""
    from dithooks.store.storage import as_path

    run_query(as_path(store), hook, step=step, layer=layer, sample=sample, cfg=cfg, replica=replica, reduce=reduce,
              over=over, as_json=as_json, as_csv=as_csv, limit=limit, allow_incomplete=allow_incomplete)


def register(app: typer.Typer) -> None:
    """Add ``query`` to the ``dithooks`` app."""
    app.command("query")(user_errors(query))
