"""``dithooks probe NAME`` (capture with a probe) and ``dithooks probes`` (list the built-ins).

``cli/main.py`` adds them with ``register(app)``; the sampling options are ``run_options``'.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import run_options as ro
from .output import human_bytes, print_csv, print_json, print_table, user_errors
from .running import run_with_progress


@ro.sampling_command(
    "name option out model layers hooks steps sampler eta guidance classes seeds prompt_embeds prompt prompt_rows "
    "negative_prompt embedded_guidance pairs kappa coupling couple_until share_noise_until couple_layers "
    "window window_layers jvp_direction dtype device resume overwrite allow_weight_mismatch quiet as_json",
    out=Path("probe.zarr"), seeds="0-1")
def probe(
    run: ro.SamplingOptions,
    name: str = typer.Argument(..., help="A built-in probe (`dithooks probes`) or your own: package.module:ClassName "
                               "(importable, e.g. via PYTHONPATH) or path/to/file.py:ClassName."),
    option: List[str] = typer.Option([], "--option", "-O", help="Probe option key=value; repeat for more."),
    hooks: str = typer.Option("", "--hooks", help="Also store these hook points raw (capture's --hooks); default: none, only probe outputs and latents."),
):
    """Sample with a probe attached and store its outputs (probe.NAME.*) in a Zarr store."""
    from dithooks.probes.api import make_probe, parse_option_texts

    the_probe = make_probe(name, parse_option_texts(option))
    request = run.request(hooks=hooks, probes=(the_probe,))
    result, arrays = run_probe(the_probe, request, quiet=run.quiet or run.as_json,
                               allow_weight_mismatch=run.allow_weight_mismatch)
    summary = {"store": str(result.path), "probe": the_probe.describe(), "steps_run": result.steps_run,
               "steps_total": result.steps_total, "resumed_from_step": result.resumed_from,
               "seconds": round(result.seconds, 3),
               "arrays": [{"name": a.name, "dims": list(a.dims), "shape": list(a.shape)} for a in arrays]}
    if run.as_json:
        print_json(summary)
        return
    typer.echo(f"wrote {result.path}: probe {the_probe.label()}, {result.steps_run} steps "
               f"({result.steps_total} total), {human_bytes(result.bytes_written)} in {result.seconds:.1f} s")
    print_table([{"array": a.name, "dims": "(" + ", ".join(a.dims) + ")", "shape": "x".join(map(str, a.shape))}
                 for a in arrays])


def run_probe(the_probe, request: dict, quiet: bool, allow_weight_mismatch: bool = False):
    """Run a capture with ``the_probe``; returns the result and the probe's stored arrays."""
    from dithooks.store.layout import probe_array_name
    from dithooks.store.reader import open_store

    session = ro.make_session(request, allow_weight_mismatch=allow_weight_mismatch)
    result = run_with_progress(session, request["sampler"].steps, the_probe.label(), quiet=quiet)
    store = open_store(request["out"])
    prefix = probe_array_name(the_probe.label(), "")
    return result, [store.array_info(n) for n in store.array_names() if n.startswith(prefix)]


def _user_text(text: str) -> str:
    """Docstrings cite THEORY.md, which users do not have: keep the paper's equation numbers only."""
    import re

    text = re.sub(r"THEORY(?:\.md)?\s*§\s*[\d\-–]+(?:\s*,\s*§\s*[\d\-–]+)*\s*,?\s*", "", text)
    text = re.sub(r"\(\s*\[", "(eqs [", text)  # "(THEORY §4 [42–44])" -> "(eqs [42–44])"
    return re.sub(r"\s*\(\s*\)", "", text)


def probes(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the built-in (and imported) probes with their options."""
    from dithooks.probes.api import registered_probes

    rows = []
    for pname, cls in registered_probes().items():
        doc = _user_text((cls.__doc__ or "").strip().splitlines()[0]) if cls.__doc__ else ""
        rows.append({"probe": pname, "class": f"{cls.__module__}:{cls.__qualname__}", "resumable": cls.resumable,
                     "description": doc,
                     "options": {k: {"default": o.default, "help": _user_text(o.help)} for k, o in cls.options.items()}})
    if as_json:
        print_json({"probes": rows})
        return
    for r in rows:
        typer.echo(f"{r['probe']}  ({'resumable' if r['resumable'] else 'not resumable'})  {r['description']}")
        for k, o in r["options"].items():
            typer.echo(f"    --option {k}={o['default']}  {o['help']}")


@ro.sampling_command(
    "out from_store model layers steps sampler eta guidance classes seeds kappa coupling couple_until couple_layers "
    "window window_layers modes per_head plot device resume overwrite allow_weight_mismatch quiet as_json as_csv",
    out=Path("routing.zarr"), seeds="0-3", pairs=True, jvp_direction="replica")
def routing(
    run: ro.SamplingOptions,
    from_store: Optional[Path] = typer.Option(None, "--from", help="Summarise this existing routing store instead of sampling."),
    modes: int = typer.Option(0, "--modes", help="Also measure per-mode gains chi_k, pi_k, f_k along K difference modes (K block JVPs per pair, layer and step)."),
    per_head: bool = typer.Option(False, "--per-head", help="One row per layer and head."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Save a heatmap (layer x step) of log10 ||R||/||M|| here (.png or .svg)."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the table as CSV."),
):
    """Routing-dominance ratios ||R||/||M|| per layer (Appendix B): sample replica pairs, measure, tabulate."""
    from dithooks.probes.api import make_probe
    from dithooks.probes.routing_summary import routing_heatmap, routing_summary, routing_table, summary_lines
    from dithooks.store.reader import open_store

    from dithooks.errors import DithooksError

    as_json = run.as_json
    if as_json and as_csv:
        raise DithooksError("--json and --csv exclude each other")
    ro.check_output_file(plot, "--plot", (".png", ".svg", ".pdf"))
    if from_store is None:
        if modes < 0:
            raise DithooksError(f"--modes must be >= 0, got {modes}")
        the_probe = make_probe("routing", {"modes": modes})
        request = run.request(probes=(the_probe,))
        pairs = len(request["seeds"])
        if modes > pairs:
            raise DithooksError(f"--modes {modes} is more than the {pairs} replica pair(s) (--seeds) can span: "
                                f"use at most {pairs}")
        run_probe(the_probe, request, quiet=run.quiet or as_json or as_csv,
                  allow_weight_mismatch=run.allow_weight_mismatch)
    elif run.resume or run.overwrite:
        raise DithooksError("--from re-summarises a store without sampling: --resume and --overwrite do not apply")
    store = open_store(from_store if from_store is not None else run.out)
    rows = routing_table(store, per_head=per_head)
    summary = routing_summary(store)
    if plot is not None:
        routing_heatmap(store, plot)
    if as_json:
        meta = store.meta
        print_json({"store": str(store.path), "replicas": meta.get("extras", {}).get("replicas"),
                    "sampler": meta.get("sampler"), "plot": str(plot) if plot else None, "summary": summary,
                    "rows": rows})
    elif as_csv:
        print_csv(rows)
    else:
        rep = store.meta.get("extras", {}).get("replicas") or {}
        kappa = rep.get("kappa")
        print_table(rows, title=f"routing dominance  g={rep.get('g')}  kappa={kappa if kappa is None else f'{kappa:.4g}'}  "
                                f"({store.path}; medians over steps and samples)", floatfmt=".3g")
        for line in summary_lines(summary):
            typer.echo(line)
        if plot is not None:
            typer.echo(f"heatmap: {plot}")


def register(app: typer.Typer) -> None:
    """Add ``probe`` and ``probes`` to the ``dithooks`` app."""
    app.command("probe")(user_errors(probe))
    app.command("probes")(user_errors(probes))
    app.command("routing")(user_errors(routing))
