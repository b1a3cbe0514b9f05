"""``dithooks ls`` and ``dithooks verify``: what a store holds, and whether all of it is on disk.

:func:`ls` and :func:`verify` do the work; ``ls_`` and ``verify_`` are the commands, added to the app by
:func:`register`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import typer

from .output import human_bytes, print_json, print_table

# `ls` reads every chunk of stores up to this size (cheap); larger ones only get the file checks
LS_DECODE_BYTES = 64 * 2**20
MAX_PROBLEM_LINES = 50


def _quiet_zarr():
    """Zarr warns about files it does not know (the lock, figures/): not news for a reader."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


def nonfinite_summary(meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{array: {"values": total, "rows": "1-4" (steps, or latent steps), "dim": ...}} from the metadata."""
    from dithooks.layers import format_layers

    out = {}
    for name, rows in sorted((meta.get("nonfinite") or {}).items()):
        if not rows:
            continue
        idx = sorted(int(k) for k in rows if k != "all")
        out[name] = {"values": int(sum(rows.values())), "rows": format_layers(idx) if idx else "",
                     "whole_array": "all" in rows}
    return out


def _nonfinite_line(summary: dict[str, dict[str, Any]], layout) -> str:
    parts = []
    for name, s in summary.items():
        a = layout.arrays.get(name)
        dim = a.dims[0] if a is not None and a.dims else "row"
        where = f" ({dim} {s['rows']})" if s["rows"] else ""
        parts.append(f"{name} {s['values']}{where}")
    return "; ".join(parts)


def _lock_state(path: Path) -> dict[str, Any] | None:
    """The live writer of a store (its lock's owner), or None."""
    from dithooks.store.lock import LOCK_NAME, is_stale, read_lock

    info = read_lock(path)
    if info is None or is_stale(info, path / LOCK_NAME):
        return None
    return info


def _status(layout, comp: dict, report, decoded: bool, writer: dict | None) -> str:
    from dithooks.store.lock import describe_owner
    from dithooks.store.metadata import how_to_continue

    path, meta = layout.path, layout.meta
    if not report.ok:
        if report.first_bad_step is not None:
            fix = (f"--resume recomputes from step {report.first_bad_step}: "
                   f"{how_to_continue(meta, path)}")
        else:
            fix = "replace it by running the command that made it with --overwrite"
        return f"damaged: {report.summary()}; {fix}"
    span = f"steps {comp['complete_steps']} of 0-{comp['steps_total'] - 1} on disk"
    if writer is not None:
        return f"running: {span}, being written by {describe_owner(writer)}"
    if comp["complete"]:
        bad = sum(v["values"] for v in nonfinite_summary(meta).values())
        return (("complete" if decoded else "complete (every chunk file present; --verify also reads them)")
                + (f"; {bad} NaN/inf values (below)" if bad else ""))
    return f"{comp['status']}: {span}; {how_to_continue(meta, path)}"


def ls(store: Path, verify: bool = False, as_json: bool = False) -> int:
    """Print what ``store`` holds; returns the exit code (1: --verify found damage)."""
    from dithooks.store.metadata import completeness
    from dithooks.store.reader import open_store
    from dithooks.store.verify import inspect_store, stored_bytes, verify_store

    ctx = _quiet_zarr()
    try:
        layout = inspect_store(store)
        decode = verify or stored_bytes(store) <= LS_DECODE_BYTES
        report = verify_store(store, decode=decode, layout=layout)
        s = open_store(store)
        arrays = [s.array_info(n) for n in s.array_names()]
    finally:
        ctx.__exit__(None, None, None)
    m = layout.meta
    writer = _lock_state(layout.path)
    if layout.step_complete is not None:
        comp = completeness(layout.step_complete)
        comp["status"] = m.get("status")
        if m.get("status") == "running" and not comp["complete"] and writer is None:
            comp["status"] = "incomplete"  # nothing writes it: it was killed mid-way
        comp["complete"] = comp["complete"] and report.ok
        if not report.ok:
            comp["status"] = "damaged"
    else:
        comp = {"status": m.get("status"), "complete": m.get("status") == "complete" and report.ok}
    nonfinite = nonfinite_summary(m)
    rc = 1 if verify and not report.ok else 0
    if as_json:
        print_json({"store": str(store), "completeness": comp, "verify": report.as_dict(),
                    "writer": writer, "nonfinite": nonfinite, "metadata": m, "arrays": [a.__dict__ for a in arrays]})
        return rc
    smp = m.get("sampler", {})
    typer.echo(f"store     {store}")
    if layout.kind != "capture":  # a results store of another command (its own layout)
        typer.echo(f"kind      {layout.kind}")
        typer.echo(f"times     started {m.get('started')}, finished {m.get('finished')}")
        typer.echo(f"status    {comp['status']}" + ("" if report.ok else f", damaged: {report.summary()}"))
        if nonfinite:
            typer.echo(f"NaN/inf   {_nonfinite_line(nonfinite, layout)}")
        print_table([{"array": a.name, "dims": "(" + ", ".join(a.dims) + ")", "shape": "x".join(map(str, a.shape)),
                      "dtype": a.dtype, "size": human_bytes(a.nbytes_logical),
                      "on disk": human_bytes(a.nbytes_stored)} for a in arrays])
        return rc
    cfg = m.get("model_config", {})
    blocks = f"{cfg.get('num_layers')} blocks"
    if cfg.get("num_single_layers"):  # Flux: double-stream blocks, then single-stream ones
        blocks = f"{cfg['num_layers'] + cfg['num_single_layers']} blocks: {cfg['num_layers']} double, {cfg['num_single_layers']} single"
    typer.echo(f"model     {m.get('model_id')} ({m.get('model_class')}, {blocks})")
    typer.echo(f"sampler   {smp.get('name')} {smp.get('steps')} steps, eta {smp.get('eta')}, guidance {smp.get('guidance')}")
    if m.get("conditioning") == "text":  # text families: rows of a prompt-embeddings file
        source = m.get("prompt_embeds_file") or "in-memory embeddings"
        typer.echo(f"samples   prompt rows {m.get('prompts')} of {source} seeds {m.get('seeds')}")
    else:
        typer.echo(f"samples   labels {m.get('labels')} seeds {m.get('seeds')}")
    typer.echo(f"layers    {m.get('layers')}")
    extras = m.get("extras") or {}
    if "replicas" in extras:
        r = extras["replicas"]
        typer.echo(f"replicas  pairs, kappa {r['kappa']:.4g}, g {r['g']}, couple until {r['couple_until']}, "
                   f"shared noise until {r['share_noise_until']}, coupled blocks {r['layers'] or 'all'}")
    if "attention" in extras:
        typer.echo("attention " + ", ".join(f"{k} {v}" for k, v in extras["attention"].items()))
    if "jvp" in extras:
        typer.echo("jvp       " + ", ".join(f"{k} {v}" for k, v in extras["jvp"].items()))
    if m.get("probes"):
        typer.echo("probes    " + ", ".join(p["name"] for p in m["probes"]))
    typer.echo(f"dtype     stored {m.get('storage_dtype')}, computed {m.get('compute_dtype')}, compression {m.get('compression')}")
    typer.echo(f"times     started {m.get('started')}, finished {m.get('finished')}")
    typer.echo(f"status    {_status(layout, comp, report, decode, writer)}")
    if nonfinite:
        typer.echo(f"NaN/inf   {_nonfinite_line(nonfinite, layout)}")
    if m.get("error"):
        typer.echo(f"error     {m['error']}")
    print_table([{"array": a.name, "dims": "(" + ", ".join(a.dims) + ")", "shape": "x".join(map(str, a.shape)),
                  "dtype": a.dtype, "size": human_bytes(a.nbytes_logical), "on disk": human_bytes(a.nbytes_stored),
                  **({"NaN/inf": nonfinite.get(a.name, {}).get("values", 0)} if nonfinite else {})}
                 for a in arrays])
    return rc


def verify(store: Path, quick: bool = False, as_json: bool = False) -> int:
    """Check ``store``; print the result; returns the exit code (0 whole, 1 damaged)."""
    from dithooks.store.metadata import how_to_continue
    from dithooks.store.verify import inspect_store, verify_store

    ctx = _quiet_zarr()
    try:
        layout = inspect_store(store)
        report = verify_store(store, decode=not quick, layout=layout)
    finally:
        ctx.__exit__(None, None, None)
    rc = 0 if report.ok else 1
    if as_json:
        print_json(report.as_dict())
        return rc
    what = (f"{report.arrays} arrays, {report.files_checked} chunk files"
            + (f", {report.chunks_decoded} chunks decoded" if report.decoded else " (not decoded: --quick)")
            + (f"; {report.steps_marked} of {report.steps_total} steps marked complete" if layout.kind == "capture" else ""))
    if report.ok:
        typer.echo(f"{store}: ok ({what})")
        return rc
    typer.echo(f"{store}: DAMAGED, {len(report.problems)} problem{'s' if len(report.problems) != 1 else ''} ({what})")
    for p in report.problems[:MAX_PROBLEM_LINES]:
        typer.echo(f"  {p.line()}")
    if len(report.problems) > MAX_PROBLEM_LINES:
        typer.echo(f"  ... {len(report.problems) - MAX_PROBLEM_LINES} more (--json lists all)")
    if report.first_bad_step is not None and layout.kind == "capture":
        typer.echo(f"--resume recomputes from step {report.first_bad_step}: {how_to_continue(layout.meta, layout.path)}")
    else:
        typer.echo("replace it by running the command that made it with --overwrite")
    return rc


def ls_(
    store: Path = typer.Argument(..., help="A capture store."),
    verify: bool = typer.Option(False, "--verify", help="Also read every chunk of every complete step (as `dithooks verify`); exit 1 if one is missing or damaged."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """What a store holds: arrays, dims, shapes, sizes, metadata, completeness, NaN/inf counts."""
    from dithooks.store.storage import as_path

    store = as_path(store)  # a folder, or an object-store URL (s3://bucket/run.zarr)
    rc = ls(store, verify=verify, as_json=as_json)
    if rc:
        raise typer.Exit(rc)


def verify_(
    store: Path = typer.Argument(..., help="A store."),
    quick: bool = typer.Option(False, "--quick", help="Only check that chunk files exist and are whole; do not decode them."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check that every chunk of every complete step exists and decodes; list those that do not (exit 1)."""
    from dithooks.store.storage import as_path

    store = as_path(store)  # a folder, or an object-store URL
    rc = verify(store, quick=quick, as_json=as_json)
    if rc:
        raise typer.Exit(rc)


def register(app: typer.Typer) -> None:
    """Add ``ls`` and ``verify`` to the ``dithooks`` app."""
    from .output import user_errors

    app.command("ls")(user_errors(ls_))
    app.command("verify")(user_errors(verify_))
