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
    """List the hook points of a model: name, dims and meaning (per block kind: Flux double/single blocks)."""
    from dithooks.layers import format_layers
    from dithooks.loading import load_model

    loaded = load_model(model, with_vae=False, allow_weight_mismatch=allow_weight_mismatch)
    adapter = loaded.adapter
    pts = adapter.hook_points()
    n = adapter.num_layers
    if layer is not None and not 0 <= layer < n:
        fail(f"layer {layer} is out of range: this model has blocks 0-{n - 1}")
    rows = []
    for name, p in pts.items():
        if p.layer is not None and p.layer != layer:
            continue
        rows.append({"hook point": name, "template": p.template, "dims": "(" + ", ".join(p.dims) + ")",
                     "writable": "yes" if p.writable else "no", "meaning": p.doc})
    kinds = block_kinds(adapter, pts)
    family = {"family": getattr(adapter, "family", None), "conditioning": getattr(adapter, "conditioning", "class"),
              "default_sampler": getattr(adapter, "default_sampler", "ddim")}
    if as_json:
        print_json({"model": loaded.model_id, "num_layers": n, **family,
                    "block_kinds": [{"blocks": format_layers(k["blocks"]), "class": k["class"],
                                     "points": k["points"]} for k in kinds],
                    "hook_points": rows})
        return
    typer.echo(f"{loaded.model_id}: {family['family'] or type(loaded.transformer).__name__} family, "
               f"{family['conditioning']}-conditioned (sampler {family['default_sampler']}), {n} blocks; "
               "any submodule: modules.<path>.in|out")
    for k in kinds:
        shown = layer in k["blocks"]
        typer.echo(f"  blocks {format_layers(k['blocks'])} ({k['class']}): {k['points']} points each"
                   + (f"; shown for block {layer}" if shown else f"; see --layer {k['blocks'][0]}"))
    print_table([{k: r[k] for k in ("hook point", "dims", "writable", "meaning")} for r in rows])


def block_kinds(adapter, pts) -> list[dict]:
    """Blocks grouped by the set of hook points they have (and their class), in block order."""
    groups: dict[tuple, list[int]] = {}
    for i in range(adapter.num_layers):
        local = frozenset(p.template for p in pts.values() if p.layer == i)
        groups.setdefault((type(adapter.blocks()[i]).__name__, local), []).append(i)
    return [{"blocks": blocks, "class": cls, "points": len(local)} for (cls, local), blocks in groups.items()]


def register(app: typer.Typer) -> None:
    """Add ``hooks`` to the ``dithooks`` app."""
    app.command("hooks")(user_errors(hooks_))
