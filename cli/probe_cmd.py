"""``dithooks probe NAME`` (capture with a probe) and ``dithooks probes`` (list the built-ins).

``cli/main.py`` adds them with ``from .probe_cmd import register; register(app)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from .output import fail, human_bytes, print_json, print_table, user_errors


def probe(
    name: str = typer.Argument(..., help="A built-in probe (`dithooks probes`) or your own: package.module:ClassName."),
    option: List[str] = typer.Option([], "--option", "-O", help="Probe option key=value; repeat for more."),
    out: Path = typer.Option(Path("probe.zarr"), "--out", "-o", help="Store to write (a directory)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model directory, hub id in the local HF cache, or empty for the embedded digits DiT."),
    layers: str = typer.Option("all", "--layers", "-l", help="Blocks the probe reads: all, 0-27, 0,5,27, 20-."),
    hooks: str = typer.Option("", "--hooks", help="Also store these hook points raw (capture's --hooks); default: none, only probe outputs and latents."),
    steps: int = typer.Option(50, "--steps", help="Sampling steps."),
    sampler: str = typer.Option("ddim", "--sampler", help="ddim or ddpm."),
    eta: float = typer.Option(0.0, "--eta", help="DDIM eta (0 deterministic, 1 ~ DDPM)."),
    guidance: float = typer.Option(1.0, "--guidance", "-g", help="Classifier-free guidance scale; 1 = off."),
    classes: str = typer.Option("0", "--class", "--classes", "-c", help="Class label(s): one for all samples, or one per seed."),
    seeds: str = typer.Option("0-1", "--seeds", "-s", help="Seeds, one sample each: 0-7 or 0,4,9."),
    dtype: str = typer.Option("fp16", "--dtype", help="Storage dtype of raw hooks: fp32, fp16, bf16 (probe outputs are float32)."),
    device: str = typer.Option("cpu", "--device", help="torch device: cpu, cuda, cuda:1, mps."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in OUT (resumable probes only)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store at OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Sample with a probe attached and store its outputs (probe.NAME.*) in a Zarr store."""
    from tqdm.auto import tqdm

    from dithooks.capture import CaptureConfig, CaptureSession
    from dithooks.probes.api import make_probe, parse_option_texts
    from dithooks.sampling import SamplerSpec
    from dithooks.store.reader import open_store

    from .main import _sigterm_as_interrupt, parse_int_list

    if resume and overwrite:
        fail("--resume and --overwrite exclude each other")
    the_probe = make_probe(name, parse_option_texts(option))
    cfg = CaptureConfig(
        out=str(out), model=model, layers=layers, hooks=tuple(h for h in hooks.split(",") if h.strip()),
        sampler=SamplerSpec(sampler, steps, eta, guidance), labels=tuple(parse_int_list(classes, "classes")),
        seeds=tuple(parse_int_list(seeds, "seeds")), storage_dtype=dtype, device=device,
        mode="resume" if resume else "overwrite" if overwrite else "create", probes=(the_probe,))
    session = CaptureSession(cfg)
    _sigterm_as_interrupt()

    def progress(it):
        return tqdm(it, total=steps, initial=it.start, desc=the_probe.label(), unit="step", disable=quiet or as_json)

    result = session.run(progress=progress)
    store = open_store(out)
    prefix = f"probe.{the_probe.label()}."
    arrays = [store.array_info(n) for n in store.array_names() if n.startswith(prefix)]
    summary = {"store": str(result.path), "probe": the_probe.describe(), "steps_run": result.steps_run,
               "steps_total": result.steps_total, "resumed_from_step": result.resumed_from,
               "seconds": round(result.seconds, 3),
               "arrays": [{"name": a.name, "dims": list(a.dims), "shape": list(a.shape)} for a in arrays]}
    if as_json:
        print_json(summary)
        return
    typer.echo(f"wrote {result.path}: probe {the_probe.label()}, {result.steps_run} steps "
               f"({result.steps_total} total), {human_bytes(result.bytes_written)} in {result.seconds:.1f} s")
    print_table([{"array": a.name, "dims": "(" + ", ".join(a.dims) + ")", "shape": "x".join(map(str, a.shape))}
                 for a in arrays])


def probes(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the built-in (and imported) probes with their options."""
    from dithooks.probes.api import registered_probes

    rows = []
    for pname, cls in registered_probes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        rows.append({"probe": pname, "class": f"{cls.__module__}:{cls.__qualname__}", "resumable": cls.resumable,
                     "description": doc,
                     "options": {k: {"default": o.default, "help": o.help} for k, o in cls.options.items()}})
    if as_json:
        print_json({"probes": rows})
        return
    for r in rows:
        typer.echo(f"{r['probe']}  ({'resumable' if r['resumable'] else 'not resumable'})  {r['description']}")
        for k, o in r["options"].items():
            typer.echo(f"    --option {k}={o['default']}  {o['help']}")


def register(app: typer.Typer) -> None:
    """Add ``probe`` and ``probes`` to the ``dithooks`` app."""
    app.command("probe")(user_errors(probe))
    app.command("probes")(user_errors(probes))
