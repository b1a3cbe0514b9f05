"""The ``dithooks`` command line: capture, look at stores, query them."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import typer

from dithooks.errors import DithooksError

from . import run_options as ro
from .output import OneLineErrors, fail, human_bytes, print_csv, print_json, print_table, user_errors
from .run_options import MODEL_HELP, parse_int_list  # noqa: F401  (parse_int_list: used by probe_cmd)

app = typer.Typer(
    name="dithooks",
    help="See inside a Diffusion Transformer while it samples: capture hook points to Zarr, query them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,  # usage errors are one line too
)

def _sigterm_as_interrupt() -> None:
    # a killed capture (SIGTERM) closes its store as cleanly as Ctrl-C does
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread (e.g. inside a test runner thread)
        pass


@app.command()
@user_errors
def capture(
    out: ro.Out = Path("capture.zarr"),
    model: ro.Model = None,
    layers: ro.Layers = "all",
    hooks: str = typer.Option("resid_post", "--hooks", help="Hook points, comma-separated: short names (resid_post, attn.out, adaln.gate_msa, attn.n_eff, jvp.routing) apply to every selected layer; full names (final.out, blocks.3.mlp.out) and globs too. See `dithooks hooks`."),
    steps: ro.Steps = 50,
    sampler: ro.SamplerName = "ddim",
    eta: ro.Eta = 0.0,
    guidance: ro.Guidance = 1.0,
    classes: ro.Classes = "0",
    seeds: ro.Seeds = "0",
    pairs: ro.Pairs = False,
    kappa: ro.Kappa = None,
    coupling: ro.Coupling = None,
    couple_until: ro.CoupleUntil = None,
    share_noise_until: ro.ShareNoiseUntil = None,
    couple_layers: ro.CoupleLayers = "all",
    window: ro.Window = None,
    window_layers: ro.WindowLayers = "all",
    top_k: ro.TopK = None,
    query_tokens: ro.QueryTokens = None,
    query_tile: ro.QueryTile = 512,
    jvp_direction: ro.JvpDirection = "auto",
    jvp_gates: ro.JvpGates = True,
    dtype: ro.StorageDtype = "fp16",
    compute_dtype: ro.ComputeDtype = "fp32",
    compression: str = typer.Option("none", "--compression", help="none, zstd or lz4."),
    device: ro.Device = "cpu",
    resume: ro.Resume = False,
    overwrite: ro.Overwrite = False,
    allow_weight_mismatch: ro.AllowWeightMismatch = False,
    png: Optional[Path] = typer.Option(None, "--png", help="Also save a PNG grid of the decoded samples here."),
    quiet: ro.Quiet = False,
    as_json: ro.Json = False,
):
    """Sample with hooks attached and stream the hooked values into a Zarr store."""
    from tqdm.auto import tqdm

    ro.check_output_file(png, "--png", (".png",))
    request = ro.sampling_request(
        out=out, model=model, layers=layers, hooks=hooks, steps=steps, sampler=sampler, eta=eta,
        guidance=guidance, classes=classes, seeds=seeds, dtype=dtype, compute_dtype=compute_dtype,
        compression=compression, device=device, resume=resume, overwrite=overwrite, pairs=pairs, kappa=kappa,
        coupling=coupling, couple_until=couple_until, share_noise_until=share_noise_until,
        couple_layers=couple_layers, window=window, window_layers=window_layers, top_k=top_k,
        query_tokens=query_tokens, query_tile=query_tile, jvp_direction=jvp_direction, jvp_gates=jvp_gates)
    session = ro.make_session(request, allow_weight_mismatch=allow_weight_mismatch)
    _sigterm_as_interrupt()

    def progress(it):  # called once sampling starts: the store is open, so the plan is news
        announce_plan(session, quiet=quiet or as_json)
        return tqdm(it, total=steps, initial=it.start, desc="capture", unit="step", disable=quiet or as_json)

    result = ro.run_session(session, progress)
    if png is not None:
        import numpy as np
        import torch

        from dithooks.images import save_image_grid
        from dithooks.store.reader import open_store

        final = np.asarray(open_store(out).select("latents", latent_step=steps).values[0])
        final = torch.from_numpy(final.reshape((-1,) + final.shape[-3:]))  # replica pairs: a's then b's
        images = session.loaded.decode(final.to(next(session.loaded.transformer.parameters()).device))
        size = images.shape[-1]
        save_image_grid(images, png, scale=max(1, 64 // size))
    summary = {"store": str(result.path), "steps_run": result.steps_run, "steps_total": result.steps_total,
               "resumed_from_step": result.resumed_from, "hook_points": len(result.hooks),
               "bytes_written": result.bytes_written, "seconds": round(result.seconds, 3),
               "nonfinite": dict(result.nonfinite)}
    if result.nonfinite:  # reported, never hidden: the store holds them and `dithooks ls` lists them
        counts = ", ".join(f"{name} {n}" for name, n in sorted(result.nonfinite.items()))
        typer.echo(f"warning: NaN/inf values were computed and stored: {counts}", err=True)
    if as_json:
        print_json(summary)
    else:
        typer.echo(f"wrote {result.path}: {result.steps_run} steps ({result.steps_total} total), "
                   f"{len(result.hooks)} hook points, {human_bytes(result.bytes_written)} "
                   f"in {result.seconds:.1f} s")


def announce_plan(session, quiet: bool) -> None:
    """Say how much the capture will write before it starts; call out N x N pattern arrays."""
    from dithooks.capture import PATTERN_DIMS

    plan = session.planned_arrays()
    if quiet or not plan:
        return
    total = sum(p.nbytes for p in plan)
    typer.echo(f"will write {human_bytes(total)} of hook values ({len(plan)} arrays) before compression", err=True)
    for p in plan:
        if all(d in p.dims for d in PATTERN_DIMS):
            typer.echo(f"  {p.name}: full attention patterns {'x'.join(map(str, p.shape))} = {human_bytes(p.nbytes)}"
                       " (reductions attn.n_eff, attn.entropy, attn.pattern_headmean, attn.pattern_query, "
                       "attn.topk_* are far smaller)", err=True)


@app.command("ls")
@user_errors
def ls_(
    store: Path = typer.Argument(..., help="A capture store."),
    verify: bool = typer.Option(False, "--verify", help="Also read every chunk of every complete step (as `dithooks verify`); exit 1 if one is missing or damaged."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """What a store holds: arrays, dims, shapes, sizes, metadata, completeness, NaN/inf counts."""
    from .store_cmd import ls

    rc = ls(store, verify=verify, as_json=as_json)
    if rc:
        raise typer.Exit(rc)


@app.command("verify")
@user_errors
def verify_(
    store: Path = typer.Argument(..., help="A store."),
    quick: bool = typer.Option(False, "--quick", help="Only check that chunk files exist and are whole; do not decode them."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check that every chunk of every complete step exists and decodes; list those that do not (exit 1)."""
    from .store_cmd import verify

    rc = verify(store, quick=quick, as_json=as_json)
    if rc:
        raise typer.Exit(rc)


@app.command()
@user_errors
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
    from .query_cmd import run_query

    run_query(store, hook, step=step, layer=layer, sample=sample, cfg=cfg, replica=replica, reduce=reduce,
              over=over, as_json=as_json, as_csv=as_csv, limit=limit, allow_incomplete=allow_incomplete)


@app.command("hooks")
@user_errors
def hooks_(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=MODEL_HELP),
    layer: Optional[int] = typer.Option(0, "--layer", help="Show the per-block points of this block."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    allow_weight_mismatch: ro.AllowWeightMismatch = False,
):
    """List the hook points of a model: name, dims and meaning."""
    from dithooks.hookpoints import layer_template
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


@app.command("train-default")
@user_errors
def train_default(
    out: Path = typer.Option(Path("runs/default_model"), "--out", "-o", help="Training run folder (checkpoints, log, final and EMA weights)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: the recipe in docs/model_card.md)."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(128, "--batch-size"),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Classify DDIM samples of the result."),
    per_class: int = typer.Option(50, "--per-class", help="Samples per class for the evaluation."),
    ship: bool = typer.Option(False, "--ship", help="Copy the EMA weights into the installed package (becomes the default model)."),
    variant: str = typer.Option("digits", "--variant", help="Which embedded model: digits (4x4 tokens, patch 2) or digits64 (8x8 tokens, patch 1)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Retrain the embedded digits DiT from scratch with a fixed seed (see docs/model_card.md)."""
    import torch

    from dithooks.default_model import evaluate_default_model, train_default_model
    from dithooks.default_model.config import VARIANTS
    from dithooks.default_model.weights_io import default_model_dir, ship_model_dir

    if variant not in VARIANTS:
        raise DithooksError(f"unknown embedded model {variant!r}; choose one of {', '.join(VARIANTS)}")
    for value, option in ((steps, "--steps"), (batch_size, "--batch-size"), (threads, "--threads"),
                          (per_class, "--per-class")):
        if value is not None and value < 1:
            raise DithooksError(f"{option} must be at least 1, got {value}")
    if not 0 <= seed <= ro.MAX_SEED:
        raise DithooksError(f"--seed must be in 0-{ro.MAX_SEED}, got {seed}")
    if out.exists() and not out.is_dir():
        raise DithooksError(f"--out {out} is a file, not a folder")
    torch.set_num_threads(threads)
    kwargs = {} if steps is None else {"train_steps": steps}
    summary = train_default_model(out, seed=seed, batch_size=batch_size, threads=threads, variant=variant, **kwargs)
    result = {"train": {k: v for k, v in summary.items() if k != "scheduler"}}
    model_dir = out / "ema" if (out / "ema").exists() else out
    if evaluate:
        result["evaluation"] = evaluate_default_model(model_dir, per_class=per_class, seed=seed, threads=threads)
    if ship:
        result["shipped_to"] = str(ship_model_dir(model_dir, default_model_dir(variant)))
    if as_json:
        print_json(result)
    else:
        typer.echo(f"trained {out}")
        for k, v in result.get("evaluation", {}).items():
            if not isinstance(v, (dict, list)):
                typer.echo(f"  {k}: {v}")


from .probe_cmd import register as _register_probe_commands  # noqa: E402  (needs `app` above)

_register_probe_commands(app)

from .protocol2_cmd import register as _register_protocol2_command  # noqa: E402
from .report_cmd import register as _register_report_command  # noqa: E402

_register_protocol2_command(app)
_register_report_command(app)

from .locality_cmd import register as _register_locality_commands  # noqa: E402

_register_locality_commands(app)

from .protocol_cmd import register as _register_protocol_commands  # noqa: E402

_register_protocol_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
