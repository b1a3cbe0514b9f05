"""``dithooks capture``: sample with hooks attached and stream the hooked values into a Zarr store."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import run_options as ro
from .output import human_bytes, print_json, user_errors
from .running import run_with_progress, sigterm_as_interrupt

HOOKS_HELP = ("Hook points, comma-separated: short names (resid_post, attn.out, adaln.gate_msa, attn.n_eff, "
              "jvp.routing) apply to every selected layer; full names (final.out, blocks.3.mlp.out) and globs too. "
              "See `dithooks hooks`.")
WORKERS_HELP = ("Worker processes, each capturing a contiguous range of the seeds into the one store (see "
                "docs/scaling.md). Under torchrun (WORLD_SIZE > 1) each rank is one worker instead: pass "
                "--device cuda:$LOCAL_RANK.")
SCHEDULER_HELP = ("Run the --workers on a Dask distributed cluster, one task per worker: 'local' (a LocalCluster "
                  "of N worker processes) or a scheduler address (tcp://host:8786; its workers need dithooks "
                  "and the model and store paths).")
CONTEXT_PARALLEL_HELP = ("ulysses=W: diffusers' context parallelism over the W ranks of a torchrun launch (one model "
                         "split along the tokens; Flux). Hook values are gathered across ranks; rank 0 alone writes "
                         "the store (see docs/scaling.md section 4).")


@ro.sampling_command(
    "out model layers hooks steps sampler eta guidance classes seeds prompt_embeds prompt prompt_rows "
    "negative_prompt embedded_guidance pairs kappa coupling couple_until share_noise_until couple_layers "
    "window window_layers top_k query_tokens query_tile jvp_direction jvp_gates dtype compute_dtype compression "
    "device workers scheduler context_parallel resume overwrite allow_weight_mismatch png quiet as_json",
    out=Path("capture.zarr"))
def capture(
    run: ro.SamplingOptions,
    hooks: str = typer.Option("resid_post", "--hooks", help=HOOKS_HELP),
    compression: str = typer.Option("none", "--compression", help="none, zstd or lz4."),
    png: Optional[Path] = typer.Option(None, "--png", help="Also save a PNG grid of the decoded samples here."),
    workers: int = typer.Option(1, "--workers", min=1, help=WORKERS_HELP),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=SCHEDULER_HELP),
    context_parallel: Optional[str] = typer.Option(None, "--context-parallel", help=CONTEXT_PARALLEL_HELP),
):
    """Sample with hooks attached and stream the hooked values into a Zarr store."""
    ro.check_output_file(png, "--png", (".png",))
    if scheduler is not None and workers < 2:
        raise typer.BadParameter("--scheduler runs the --workers on a Dask cluster: give --workers N (N >= 2)")
    if context_parallel is not None:
        if workers > 1 or scheduler is not None:
            raise typer.BadParameter("--context-parallel splits one model over the torchrun ranks: leave out "
                                     "--workers and --scheduler")
        return _capture_context_parallel(run, hooks, compression, png, context_parallel)
    session = run.session(run.request(hooks=hooks, compression=compression))
    from dithooks.capture.multi import torchrun_rank

    if workers > 1 or torchrun_rank() is not None:
        return _capture_multi(session, run, workers, png, scheduler)
    result = run_with_progress(session, run.steps, "capture", quiet=run.quiet or run.as_json)
    _report(session, run, result, png)


def _capture_context_parallel(run: ro.SamplingOptions, hooks: str, compression: str, png: Optional[Path],
                              spec: str) -> None:
    from dithooks.capture.context_parallel import ContextParallel

    sigterm_as_interrupt()
    cp = ContextParallel.start(spec, run.device)
    try:
        session = cp.session(lambda: run.session(run.request(hooks=hooks, compression=compression)))
        if cp.rank != 0:  # the other ranks sample with rank 0 and write nothing
            session.run()
            return
        result = run_with_progress(session, run.steps, "capture", quiet=run.quiet or run.as_json)
    finally:
        cp.close()
    _report(session, run, result, png)


def _report(session, run: ro.SamplingOptions, result, png: Optional[Path]) -> None:
    if png is not None:
        _save_png(session, run.out, run.steps, png)
    summary = {"store": str(result.path), "steps_run": result.steps_run, "steps_total": result.steps_total,
               "resumed_from_step": result.resumed_from, "hook_points": len(result.hooks),
               "bytes_written": result.bytes_written, "seconds": round(result.seconds, 3),
               "nonfinite": dict(result.nonfinite)}
    if result.nonfinite:  # reported, never hidden: the store holds them and `dithooks ls` lists them
        counts = ", ".join(f"{name} {n}" for name, n in sorted(result.nonfinite.items()))
        typer.echo(f"warning: NaN/inf values were computed and stored: {counts}", err=True)
    if run.as_json:
        print_json(summary)
    else:
        typer.echo(f"wrote {result.path}: {result.steps_run} steps ({result.steps_total} total), "
                   f"{len(result.hooks)} hook points, {human_bytes(result.bytes_written)} "
                   f"in {result.seconds:.1f} s")


def _capture_multi(session, run: ro.SamplingOptions, workers: int, png: Optional[Path],
                   scheduler: Optional[str] = None) -> None:
    from dithooks.capture.multi import capture_dask, capture_torchrun, capture_workers, torchrun_rank

    sigterm_as_interrupt()  # the workers keep their finished steps (as Ctrl-C)
    ranked = torchrun_rank()
    if ranked is not None:
        if workers > 1 or scheduler is not None:
            raise typer.BadParameter("under torchrun each rank is one worker: leave out --workers and --scheduler")
        summary = capture_torchrun(session.cfg, session.loaded, *ranked)
        if ranked[0] != 0:
            return
    elif scheduler is not None:
        summary = capture_dask(session.cfg, workers, scheduler, session.loaded)
    else:
        summary = capture_workers(session.cfg, workers, session.loaded)
    if png is not None:
        _save_png(session, run.out, run.steps, png)
    summary = {"store": str(session.path), **summary}  # session.path: the URL of an s3:// --out
    if run.as_json:
        print_json(summary)
    else:
        typer.echo(f"wrote {session.path}: {summary['workers']} workers, steps {summary['complete_steps']} complete, "
                   f"in {summary['seconds']:.1f} s")


def _save_png(session, out: Path, steps: int, png: Path) -> None:
    import numpy as np
    import torch

    from dithooks.images import save_image_grid
    from dithooks.store.reader import open_store

    final = np.asarray(open_store(out).select("latents", latent_step=steps).values[0])
    final = torch.from_numpy(final.reshape((-1,) + final.shape[-3:]))  # replica pairs: a's then b's
    images = session.loaded.decode(final.to(next(session.loaded.transformer.parameters()).device))
    size = images.shape[-1]
    save_image_grid(images, png, scale=max(1, 64 // size))


def register(app: typer.Typer) -> None:
    """Add ``capture`` to the ``dithooks`` app."""
    app.command("capture")(user_errors(capture))
