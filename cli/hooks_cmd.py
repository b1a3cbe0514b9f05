"""``dithooks hooks``: the hook points of a model - name, dims, meaning."""

from __future__ import annotations

from typing import Optional

import typer

from . import run_options as ro
from .output import fail, print_json, print_table, user_errors
from .run_options import MODEL_HELP


def hooks_(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    layer: Optional[int] = typer.Option(0, "--layer", help="Show the per-block points of this block."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    allow_weight_mismatch: ro.AllowWeightMismatch = False,
):
    """List the hook points of a model: name, dims and meaning."""
    from dithooks.loading import load_model

    loaded = load_model(model, with_vae=False, allow_weight_mismatch=allow_weight_mismatch)
    pts = loaded.adapter.hook_points()
    n = loaded.adapter.num_layers
    if layer is not None and not 0 <= layer < n:
        fail(f"layer {layer} is out of range: this model has blocks 0-{n - 1}")
    rows = []
    for name, p in pts.items():
        if p.layer is not None and p.layer != layer:
            continue
        rows.append({"hook point": name, "template": p.template, "dims": "(" + ", ".join(p.dims) + ")",
                     "writable": "yes" if p.writable else "no", "meaning": p.doc})
    if as_json:
        print_json({"model": loaded.model_id, "num_layers": n, "hook_points": rows})
        return
    typer.echo(f"{loaded.model_id}: {n} blocks; per-block points shown for block {layer} "
               f"(the same exist for blocks 0-{n - 1}); any submodule: modules.<path>.in|out")
    print_table([{k: r[k] for k in ("hook point", "dims", "writable", "meaning")} for r in rows])


def register(app: typer.Typer) -> None:
    """Add ``hooks`` to the ``dithooks`` app."""
    app.command("hooks")(user_errors(hooks_))
