"""``dithooks locality gaps | forward-backward | windowed | show``: seed 004's measurements.

Each command writes a resumable store (``--resume`` continues it, ``--overwrite`` replaces it,
an existing store is refused otherwise), shows a progress bar over cells, prints tables (or
``--json``) and writes figures under ``STORE/figures/``. See docs/locality.md.

``cli/main.py`` adds them with ``from .locality_cmd import register; register(app)``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from . import run_options as ro
from .output import print_json, print_table, user_errors

locality_app = typer.Typer(name="locality", no_args_is_help=True, add_completion=False,
                           help="Seed 004: local denoisers, conditioning/locality gaps, forward-backward, windowed probes.")

def _setup(model: Optional[str], device: str, batch: int):
    from dithooks.loading import load_model
    from dithooks.locality.local_denoiser import Denoiser

    loaded = load_model(model, device=device, with_vae=False)
    return loaded, Denoiser(loaded, device=device, batch=batch)


def _labels(classes: str, n: int) -> tuple[int, ...]:
    cls = ro.parse_int_list(classes, "classes")
    return tuple(cls[i % len(cls)] for i in range(n))


def _seeds(seeds: Optional[str], n: int) -> tuple[int, ...]:
    if seeds is None:
        return tuple(range(n))
    out = tuple(ro.parse_int_list(seeds, "seeds", lo=0, hi=ro.MAX_SEED))  # as capture's --seeds
    if len(out) != n:
        from dithooks.errors import DithooksError
        raise DithooksError(f"{len(out)} seeds for --samples {n}: give one seed per sample (or leave --seeds out)")
    return out


def _bar(desc: str, quiet: bool):
    from tqdm.auto import tqdm

    return lambda total: tqdm(total=total, desc=desc, unit="cell", disable=quiet)


def _report(store_path: Path, as_json: bool, seconds: float, figures: bool = True) -> None:
    from dithooks.locality.store import read_meta
    from dithooks.locality.summary import summarize

    summary = summarize(store_path, figures=figures)
    meta = read_meta(store_path)
    if as_json:
        print_json({"store": str(store_path), "kind": meta.get("kind"), "status": meta.get("status"),
                    "seconds_this_run": round(seconds, 3), "seconds_total": meta.get("seconds"), "summary": summary})
        return
    for table in summary["tables"]:
        if table["rows"]:
            print_table(table["rows"], title=table["title"], floatfmt=".4g")
    for note in summary["notes"]:
        typer.echo(f"  {note}")
    for f in summary["figures"]:
        typer.echo(f"figure: {store_path / f}")
    typer.echo(f"wrote {store_path} ({meta.get('status')}) in {seconds:.1f} s")


def _interrupts():
    from .running import sigterm_as_interrupt as _sigterm_as_interrupt

    _sigterm_as_interrupt()


def gaps(
    out: ro.Out = Path("gaps.zarr"),
    model: ro.Model = None,
    samples: int = typer.Option(32, "--samples", "-n", help="Samples per trajectory."),
    seeds: ro.SampleSeeds = None,
    classes: str = typer.Option("0-9", "--classes", "-c", help="Classes of the sampling trajectories, cycled over the samples."),
    steps: int = typer.Option(50, "--steps", help="DDIM steps of the time grid."),
    every: int = typer.Option(2, "--every", help="Measure at every k-th step of the grid."),
    radii: str = typer.Option("all", "--radii", help="Window radii: all (0..side-1; the last is the global model, gap exactly 0), or 0-2, 0,1."),
    trajectories: str = typer.Option("sampling,training", "--trajectories", help="sampling (DDIM from noise), training (digits noised forward), or both."),
    guidance: ro.Guidance = 1.0,
    batch: int = typer.Option(256, "--batch", help="Most rows per model call."),
    device: ro.Device = "cpu",
    resume: ro.Resume = False,
    overwrite: ro.Overwrite = False,
    quiet: ro.Quiet = False,
    as_json: ro.Json = False,
    figures: ro.StoreFigures = True,
):
    """Conditioning gap ||eps_c - eps_null||/N and locality gap ||eps_global - eps_local,r||/N over t x r (Figure 3)."""
    from dithooks.locality.digits import heldout_digits, is_digits_model
    from dithooks.locality.gaps import GapsRequest, run_gaps
    from dithooks.locality.local_denoiser import parse_radii
    from dithooks.locality.store import store_mode

    mode = store_mode(resume, overwrite)
    loaded, den = _setup(model, device, batch)
    trajs = tuple(t.strip() for t in trajectories.split(",") if t.strip())
    data, data_desc = None, ""
    if "training" in trajs and is_digits_model(loaded):
        data = heldout_digits(samples)
        data_desc = f"the first {samples} held-out digits"
    req = GapsRequest(model=model or "digits", steps=steps, every=every, radii=tuple(parse_radii(radii, den.layout)),
                      trajectories=trajs, labels=_labels(classes, samples), seeds=_seeds(seeds, samples),
                      guidance=guidance, data=data_desc)
    _interrupts()
    t0 = time.perf_counter()
    run_gaps(den, req, out, mode, data=data, progress=_bar("gaps", quiet or as_json))
    _report(out, as_json, time.perf_counter() - t0, figures)


def forward_backward(
    out: ro.Out = Path("forward_backward.zarr"),
    model: ro.Model = None,
    samples: int = typer.Option(64, "--samples", "-n", help="Held-out digits to noise and denoise."),
    seeds: Optional[str] = typer.Option(None, "--seeds", "-s", help="One forward-noise seed per sample (default 0..n-1)."),
    steps: int = typer.Option(20, "--steps", help="DDIM steps of the grid; a level at step s is denoised over the S - s remaining steps."),
    levels: int = typer.Option(10, "--levels", help="Noise levels, evenly spaced over the grid's steps (always including t = 1)."),
    radii: str = typer.Option("all", "--radii", help="Local radii besides the global model: all (0..side-2), none, or 0-2, 0,1."),
    batch: int = typer.Option(256, "--batch", help="Most rows per model call (cells are batched up to this)."),
    device: ro.Device = "cpu",
    resume: ro.Resume = False,
    overwrite: ro.Overwrite = False,
    quiet: ro.Quiet = False,
    as_json: ro.Json = False,
    figures: ro.StoreFigures = True,
):
    """Noise held-out digits to t, denoise unconditionally (global and local r): classifier error and MSE vs t (Figure 4)."""
    from dithooks.locality.digits import digits_judge, heldout_digits
    from dithooks.locality.forward_backward import ForwardBackwardRequest, level_steps, run_forward_backward
    from dithooks.locality.local_denoiser import parse_radii
    from dithooks.locality.planned import GLOBAL
    from dithooks.locality.store import store_mode

    mode = store_mode(resume, overwrite)
    loaded, den = _setup(model, device, batch)
    judge = digits_judge(loaded, "forward-backward")
    local = [] if radii.strip().lower() == "none" else parse_radii(radii, den.layout)
    local = [r for r in local if r < den.layout.max_radius] if radii.strip().lower() == "all" else local
    modes = [GLOBAL] + sorted({r if r < den.layout.max_radius else GLOBAL for r in local} - {GLOBAL})
    x0, y = heldout_digits(samples)
    req = ForwardBackwardRequest(model=model or "digits", steps=steps, levels=tuple(level_steps(steps, levels)),
                                 radii=tuple(modes), seeds=_seeds(seeds, samples),
                                 data=f"the first {samples} held-out digits")
    _interrupts()
    t0 = time.perf_counter()
    run_forward_backward(den, judge, req, x0, y, out, mode, batch_rows=batch,
                         progress=_bar("forward-backward", quiet or as_json))
    _report(out, as_json, time.perf_counter() - t0, figures)


def windowed(
    out: ro.Out = Path("windowed.zarr"),
    model: ro.Model = None,
    inside: str = typer.Option("conditioning", "--inside", help="What the window switches on: conditioning, or global (attention; local radius outside)."),
    radius: Optional[int] = typer.Option(None, "--radius", "-r", help="Local radius outside the window (--inside global)."),
    outside_cond: bool = typer.Option(False, "--outside-cond/--outside-uncond", help="--inside global: condition outside the window too (default: unconditional, the paper's scan)."),
    width: float = typer.Option(0.2, "--width", help="Window width in t (t = timestep/T, 1 = noise)."),
    stride: float = typer.Option(0.1, "--stride", help="Step of the scanned window start t0 (0, stride, ... < 1)."),
    samples: int = typer.Option(100, "--samples", "-n", help="Samples per window."),
    seeds: ro.SampleSeeds = None,
    classes: str = typer.Option("0-9", "--classes", "-c", help="Requested classes, cycled over the samples."),
    steps: int = typer.Option(20, "--steps", help="DDIM steps."),
    guidance: ro.Guidance = 1.0,
    features: str = typer.Option("classifier", "--features", help="Feature space of the Fréchet distance: classifier (digits), inception (needs local weights)."),
    batch: int = typer.Option(256, "--batch", help="Most rows per model call (windows are batched up to this)."),
    device: ro.Device = "cpu",
    resume: ro.Resume = False,
    overwrite: ro.Overwrite = False,
    quiet: ro.Quiet = False,
    as_json: ro.Json = False,
    figures: ro.StoreFigures = True,
):
    """Conditioning (or global attention) only in a window t0..t0+w, t0 scanned: error and Fréchet distance (Figures 5-6)."""
    from dithooks.locality.digits import digits_judge
    from dithooks.locality.frechet import feature_extractor
    from dithooks.locality.local_denoiser import check_radius
    from dithooks.locality.store import store_mode
    from dithooks.locality.windowed import WindowedRequest, run_windowed

    ro.check_finite(guidance, "--guidance", -1e4, 1e4)
    mode = store_mode(resume, overwrite)
    loaded, den = _setup(model, device, batch)
    judge = digits_judge(loaded, "the windowed probe")
    feats = feature_extractor(features, judge.classifier)
    req = WindowedRequest(model=model or "digits", inside=inside, steps=steps, width=width, stride=stride,
                          radius=check_radius(radius, den.layout), outside_cond=outside_cond, guidance=guidance,
                          labels=_labels(classes, samples), seeds=_seeds(seeds, samples), features=features)
    _interrupts()
    t0 = time.perf_counter()
    run_windowed(den, judge, feats, req, out, mode, batch_rows=batch, progress=_bar(f"windowed {inside}", quiet or as_json))
    _report(out, as_json, time.perf_counter() - t0, figures)


def show(
    store: Path = typer.Argument(..., help="A store written by dithooks locality gaps/forward-backward/windowed."),
    as_json: ro.Json = False,
    figures: ro.StoreFigures = True,
):
    """Re-summarise a locality store: tables, notes, figures (also of a partial store)."""
    _report(store, as_json, 0.0, figures)


def register(app: typer.Typer) -> None:
    """Add ``dithooks locality ...`` to the ``dithooks`` app."""
    locality_app.command("gaps")(user_errors(gaps))
    locality_app.command("forward-backward")(user_errors(forward_backward))
    locality_app.command("windowed")(user_errors(windowed))
    locality_app.command("show")(user_errors(show))
    app.add_typer(locality_app, name="locality")
