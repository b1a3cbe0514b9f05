"""``dithooks protocol2``: Protocol II (paper §3.2, THEORY §4) - mode energies across depth per g.

``cli/main.py`` adds it with ``from .protocol2_cmd import register; register(app)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from . import run_options as ro
from .output import print_json, print_table, user_errors


def protocol2(
    out: ro.Out = Path("protocol2.zarr"),
    g: Optional[str] = typer.Option(None, "--g", help="Coupling strengths, constant for the whole trajectory: 0,0.3 (default)."),
    pairs: Optional[int] = typer.Option(None, "--pairs", help="Replica pairs M (default 32): at most M modes per block."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the first pair (pair m uses seed + m; default 0)."),
    classes: Optional[str] = typer.Option(None, "--class", "--classes", "-c", help="One class for every pair (default 0), or one per pair."),
    steps: Optional[int] = typer.Option(None, "--steps", help="DDIM steps (default 100, as the paper)."),
    eta: Optional[float] = typer.Option(None, "--eta", help="DDIM eta (default 0: deterministic, as the paper)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale (default 1 = off)."),
    kappa: Optional[float] = typer.Option(None, "--kappa", help="Replica separation at the start [67] (default 0.7071: independent)."),
    layers: Optional[str] = typer.Option(None, "--layers", "-l", help="Blocks to analyse (default all)."),
    hook: Optional[str] = typer.Option(None, "--hook", help="Per-block hook point whose pair differences give the modes (default resid_post)."),
    lead: Optional[str] = typer.Option(None, "--lead", help="Leading band: fraction 0.25 (default), count 4 or indices 0,1."),
    trail: Optional[str] = typer.Option(None, "--trail", help="Trailing band: fraction 0.25 (default), count or indices."),
    at_step: Optional[str] = typer.Option(None, "--at-step", help="Read the energies at this step (one for all g, or one per g: 40,30); with --from-protocol1: for the g it has no t_spec for (g = 0)."),
    from_protocol1: Optional[Path] = typer.Option(None, "--from-protocol1", help="Read them at t_spec(g) of this Protocol I store (nearest timestep)."),
    bootstrap: Optional[int] = typer.Option(None, "--bootstrap", help="Bootstrap resamples of the pairs for R's 95%% interval (default 1000)."),
    bootstrap_seed: ro.BootstrapSeed = None,
    low_freq_radius: Optional[float] = typer.Option(None, "--low-freq-radius", help="DCT radius of the low-frequency band on the token grid (default side/4)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the figures (PNG and SVG under OUT/figures/)."),
    model: ro.Model = None,
    device: ro.Device = "cpu",
    resume: ro.Resume = False,
    overwrite: ro.Overwrite = False,
    quiet: ro.Quiet = False,
    as_json: ro.Json = False,
):
    """Protocol II: replica pairs coupled at constant g; difference-mode energies E_lead, E_trail and
    R = E_trail/E_lead in every block at t_spec(g), with spread over pairs and mode coherence."""
    import sys

    from tqdm.auto import tqdm

    from dithooks.errors import DithooksError
    from dithooks.protocols.protocol2 import Protocol2, Protocol2Request

    from .running import sigterm_as_interrupt as _sigterm_as_interrupt

    if resume and overwrite:
        raise DithooksError("--resume and --overwrite exclude each other")
    given = {"model": model, "g": g, "pairs": pairs, "first_seed": seed,
             "labels": tuple(ro.parse_int_list(classes, "classes")) if classes else None, "steps": steps, "eta": eta,
             "guidance": guidance, "kappa": kappa, "layers": layers, "hook": hook, "lead": lead, "trail": trail,
             "at_step": tuple(ro.parse_int_list(at_step, "steps")) if at_step else None,
             "from_protocol1": str(from_protocol1) if from_protocol1 else None, "bootstrap": bootstrap,
             "bootstrap_seed": bootstrap_seed, "low_freq_radius": low_freq_radius}
    log = (lambda m: None) if quiet or as_json else (lambda m: tqdm.write(m, file=sys.stderr))
    if resume:
        job = Protocol2(None, out, mode="resume", given=given, device=device, log=log, figures=figures)
    else:
        request = Protocol2Request(**{k: v for k, v in given.items() if v is not None})
        job = Protocol2(request, out, mode="overwrite" if overwrite else "create", device=device, log=log,
                        figures=figures)
    job.store.update_meta(command="dithooks protocol2 " + " ".join(_argv_tail()))
    _sigterm_as_interrupt()
    todo = int((~job.done()).sum())
    with tqdm(total=todo * job.request.steps, desc="protocol2", unit="step", disable=quiet or as_json or not todo) as bar:
        job.sample(bar=bar)
    summary = job.summarise()
    if as_json:
        print_json(_jsonable(summary) | {"store": str(out)})
        return
    at = ", ".join(f"g={g:g}: step {s} (t={t})" for g, s, t in zip(summary["g"], summary["at_step"], summary["at_timestep"]))
    print_table(_wide_rows(summary), title=f"Protocol II ({out}): mode energies per block at {at}; "
                                           "E: mean ± sd over pairs, R [bootstrap 95%]", floatfmt=".3g")
    coherence = [{k: (f"[{v[0]:.3g}, {v[1]:.3g}]" if isinstance(v, list) else v) for k, v in row.items()}
                 for row in summary["coherence"]]
    print_table(coherence, title="spatial coherence of the leading modes vs Gaussian random vectors", floatfmt=".3g")
    for note in summary["notes"]:
        typer.echo("- " + note)
    if figures:
        typer.echo(f"figures: {out}/figures/ (p2_mode_energies, p2_gap_ratio, p2_coherence, p2_gap_ratio_steps; "
                   ".svg, .png)")


def _argv_tail() -> list[str]:
    import sys

    args = sys.argv[1:]
    return args[1:] if args and args[0] == "protocol2" else args


def _wide_rows(summary: dict) -> list[dict]:
    pl = summary["per_layer"]
    rows = []
    for li, layer in enumerate(summary["layers"]):
        row = {"block": layer}
        for gi, g in enumerate(summary["g"]):
            tag = f"g={g:g}"
            row[f"E_lead {tag}"] = f"{pl['E_lead'][gi, li]:.3g} ± {pl['E_lead_std'][gi, li]:.2g}"
            row[f"E_trail {tag}"] = f"{pl['E_trail'][gi, li]:.3g} ± {pl['E_trail_std'][gi, li]:.2g}"
            lo, hi = pl["R_ci_low"][gi, li], pl["R_ci_high"][gi, li]
            ci = f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) else ""
            row[f"R {tag}"] = f"{pl['R'][gi, li]:.3g}{ci}"
        rows.append(row)
    return rows


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def register(app: typer.Typer) -> None:
    app.command("protocol2")(user_errors(protocol2))
