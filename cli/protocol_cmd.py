"""``dithooks protocol1``: the paper's Protocol I (commitment times, coarse/fine output gap).

``cli/main.py`` adds it with ``from .protocol_cmd import register; register(app)``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import typer

from . import run_options as ro
from .output import fail, print_table, user_errors


def protocol1(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Store to write (a Zarr directory; figures go in its figures/)."),
    from_store: Optional[Path] = typer.Option(None, "--from", help="Print the table of this complete protocol1 store; sample nothing."),
    model: ro.Model = None,
    g: Optional[str] = typer.Option(None, "--g", help="Coupling strengths, comma-separated (default the paper's 0.1,0.3,0.5,0.7,0.9,1.0)."),
    s_star: Optional[str] = typer.Option(None, "--s-star", help="Intervention steps s*: a list 0,5,10,20,40,100, a range start:stop:step such as 0:50:5, or a count 11 (evenly spaced over 0..steps) (default 11). 0 is always added."),
    pairs: Optional[int] = typer.Option(None, "--pairs", help="Seed pairs M (default 8)."),
    first_seed: Optional[int] = typer.Option(None, "--first-seed", help="Pair m uses seed FIRST_SEED + m (default 0)."),
    classes: Optional[str] = typer.Option(None, "--class", "--classes", "-c", help="Class label: one for all pairs, or one per pair (default 0, as the paper)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps (default 100, as the paper)."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta (default 1, as the paper: ~DDPM)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default 1 = off)."),
    kappa: Optional[float] = typer.Option(None, "--kappa", help="Replica separation at the start, eq [67] (default 0.7071, independent starts)."),
    control: Optional[bool] = typer.Option(None, "--control/--no-control", help="Also run the g = 0 shared-noise control (default on)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Features for semantic agreement: auto, digits, resnet50, pixels, or package.module:factory (default auto)."),
    encoder_weights: Optional[Path] = typer.Option(None, "--encoder-weights", help="Local weights file for --encoder resnet50 (never downloaded)."),
    coarse_size: Optional[int] = typer.Option(None, "--coarse-size", help="Side of the pooled image for D_coarse (default max(2, image side / 8): 2 for 8x8 digits)."),
    images: Optional[bool] = typer.Option(None, "--images/--no-images", help="Store the decoded final images (default on)."),
    bootstrap: Optional[int] = typer.Option(None, "--bootstrap", help="Bootstrap resamples for the 95% CIs (default 1000)."),
    bootstrap_seed: ro.BootstrapSeed = None,
    device: ro.Device = "cpu",
    resume: ro.Resume = False,
    overwrite: ro.Overwrite = False,
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw the figures (PNG and SVG in STORE/figures)."),
    plot_dir: Optional[Path] = typer.Option(None, "--plot-dir", help="Also copy the figures here."),
    quiet: ro.Quiet = False,
    as_json: ro.Json = False,
):
    """Protocol I: couple replica pairs for s* steps, then let them run free; when do they commit?

    Prints the paper's Table 1 for the model: t_spec (sigmoid midpoint of semantic agreement vs s*)
    with a 95% bootstrap CI, s_coarse, s_fine and the output gap s_fine - s_coarse, per g.
    """
    from dithooks.protocols.protocol1 import (KIND, Protocol1, Protocol1Interrupted, Protocol1Request,
                                              load_summary, merge_resume_request)
    from dithooks.protocols.store import ResultsStore

    from .running import sigterm_as_interrupt as _sigterm_as_interrupt
    from .run_options import parse_int_list

    if from_store is not None:
        _show(load_summary(from_store), from_store, None, as_json, plot_dir)
        return
    if out is None:
        fail("give --out STORE (or --from STORE to print a finished one)")
    if resume and overwrite:
        fail("--resume and --overwrite exclude each other")
    given = dict(model=model, g=g, s_star=s_star, pairs=pairs, first_seed=first_seed,
                 labels=tuple(parse_int_list(classes, "classes")) if classes else None, steps=steps, eta=eta,
                 guidance=guidance, kappa=kappa, control=control, encoder=encoder,
                 encoder_weights=str(encoder_weights) if encoder_weights else None, coarse_size=coarse_size,
                 images=images, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed)
    if resume:
        request = merge_resume_request(ResultsStore.open(out, KIND).meta["request"], given)
    else:
        opts = {k: v for k, v in given.items() if v is not None}
        opts["model"] = model or "digits"
        request = Protocol1Request(**opts)
    log = (lambda m: None) if (quiet or as_json) else (lambda m: typer.echo(m, err=True))
    t0 = time.perf_counter()
    run = Protocol1(request, out, mode="resume" if resume else "overwrite" if overwrite else "create",
                    device=device, log=log)
    _sigterm_as_interrupt()
    import shlex
    import sys

    run.store.update_meta(command="dithooks " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    from tqdm.auto import tqdm

    def bar(total):
        return tqdm(total=total, desc="protocol1", unit="step", disable=quiet or as_json)

    try:
        summary = run.run(bar=bar, plots=plots)
    except Protocol1Interrupted as e:
        typer.echo(f"dithooks: {e}", err=True)
        raise typer.Exit(130)
    seconds = time.perf_counter() - t0
    summary.update(model_id=run.loaded.model_id, status="complete")
    _show(summary, out, seconds, as_json, plot_dir)


def _show(summary: dict, store: Path, seconds: float | None, as_json: bool, plot_dir: Path | None) -> None:
    from dithooks.protocols.protocol1 import TABLE_TITLE, display_rows, table_rows
    from dithooks.protocols.store import json_clean

    if plot_dir is not None:
        import shutil

        plot_dir.mkdir(parents=True, exist_ok=True)
        for p in (Path(store) / "figures").glob("*"):
            shutil.copy2(p, plot_dir / p.name)
    figures = [str(Path(store) / f) for f in summary.get("figures", [])]
    if as_json:
        typer.echo(json.dumps(json_clean({
            "store": str(store), "model": summary.get("model_id"), "request": summary["request"],
            "seconds": None if seconds is None else round(seconds, 1), "table": table_rows(summary),
            "figures": figures, "notes": summary.get("notes", [])}), indent=2))
        return
    rows = display_rows(summary)
    notes = [(r["g"], r.pop("note")) for r in rows]
    print_table(rows, title=f"{TABLE_TITLE}\n{summary.get('model_id') or ''}  ({store})")
    for gname, note in notes:
        if note:
            typer.echo(f"  g = {gname}: {note}" if gname != "control" else f"  control: {note}")
    for n in summary.get("notes", []):
        typer.echo(f"  - {n}")
    if figures:
        typer.echo("figures: " + ", ".join(figures) + " (and .png)")
    if seconds is not None and math.isfinite(seconds):
        typer.echo(f"wrote {store} in {seconds:.1f} s")


def register(app: typer.Typer) -> None:
    """Add ``protocol1`` to the ``dithooks`` app."""
    app.command("protocol1")(user_errors(protocol1))
