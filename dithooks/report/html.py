"""One self-contained HTML page from dithooks stores: tables, figures and run metadata.

Every store contributes a section with its run metadata (kind, status, model, times and
durations, the request as stored, library versions) and then, by what it holds:

- any store whose ``attrs["dithooks"]`` carries the summary convention
  ``{"kind": ..., "summary": {"tables": [{"title", "rows": [dict]}], "figures": ["figures/x.svg",
  ...], "notes": [...]}}`` (Protocol I and II, locality stores, ...): its tables, its figures and
  its notes. Figures are embedded: SVG inline (ids prefixed per figure so several SVGs can share
  the page), PNG as base64 ``<img>``; when both exist for one name only the SVG is shown. Nested
  capture stores (a protocol store's ``runs/*``) are listed with their completeness and timings.
- a capture store (``dithooks capture`` / ``probe`` / ``routing``): completeness, replica,
  attention and JVP settings, probes, and the arrays (dims, shape, dtype, size in memory and on
  disk). With ``probe.routing.*`` also the per-layer routing table, the bound counts and the
  linearisation error (:mod:`dithooks.analysis.routing_summary`) and the layer × step heatmap; with
  ``probe.difference_modes.*`` the band energies and R per layer at the last complete step.

Nothing is fetched at view time: no scripts, no external stylesheets, fonts or images.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DithooksError, StoreError
from ..store.layout import STEP_COMPLETE

#: registered names of the probes whose stored outputs get their own tables
ROUTING, MODES = "routing", "difference_modes"

ATTR_KEY = "dithooks"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5rem auto;max-width:1180px;
color:#1b1b1b;line-height:1.4;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.3rem;border-bottom:2px solid #ddd;padding-bottom:.2rem;
margin-top:2.2rem}h3{font-size:1.05rem;margin:1.2rem 0 .4rem}
table{border-collapse:collapse;margin:.4rem 0 1rem;font-size:.82rem}th,td{border:1px solid #d5d5d5;
padding:.18rem .45rem;text-align:right;vertical-align:top}th{background:#f3f3f3;text-align:center}
td.text{text-align:left}table.meta td{text-align:left}table.meta th{text-align:left;background:#fafafa}
.scroll{overflow-x:auto;max-height:34rem;overflow-y:auto}figure{margin:.6rem 0 1.2rem}
figure svg,figure img{max-width:100%;height:auto}figcaption{font-size:.8rem;color:#555}
.status-complete{color:#17702b;font-weight:600}.status-other{color:#a33;font-weight:600}
pre{background:#f7f7f7;padding:.5rem;font-size:.75rem;overflow-x:auto;max-height:24rem}
.notes li{margin:.2rem 0;font-size:.88rem}.muted{color:#666;font-size:.85rem}
nav ul{columns:2;font-size:.9rem}
"""


# -- formatting --------------------------------------------------------------------------------------
def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def fmt(v: Any) -> str:
    """A cell value as text: floats to 4 significant digits, NaN/None as n/a, pairs as [a, b]."""
    if v is None:
        return "n/a"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}" if abs(int(v)) >= 10000 else str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if not math.isfinite(v):
            return "n/a" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) <= 6 and all(isinstance(x, (int, float, np.number)) or x is None for x in v):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return json.dumps(v, default=str)[:200]
    if isinstance(v, dict):
        return json.dumps(v, default=str)[:200]
    return str(v)


def table_html(rows: Sequence[dict], title: str | None = None, cls: str = "data") -> str:
    """A ``<table>`` from a list of dicts (columns: union of keys, first-seen order)."""
    if not rows:
        return f"<h3>{_esc(title)}</h3><p class='muted'>(no rows)</p>" if title else "<p class='muted'>(no rows)</p>"
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    out = [f"<h3>{_esc(title)}</h3>" if title else "", "<div class='scroll'>", f"<table class='{cls}'>", "<thead><tr>"]
    out += [f"<th>{_esc(c)}</th>" for c in cols]
    out.append("</tr></thead><tbody>")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            numeric = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            cells.append(f"<td{'' if numeric else ' class=text'}>{_esc(fmt(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def meta_table(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(fmt(v) if not isinstance(v, str) else v)}</td></tr>"
                   for k, v in pairs if v is not None and v != "")
    return f"<table class='meta'>{rows}</table>"


def _details(label: str, obj: Any) -> str:
    return (f"<details><summary>{_esc(label)}</summary><pre>{_esc(json.dumps(obj, indent=2, default=str))}"
            "</pre></details>")


# -- figures ---------------------------------------------------------------------------------------
_SVG_ID = re.compile(r'(\sid="|href="#|url\(#)([^")\s]+)')


def inline_svg(text: str, prefix: str) -> str:
    """An SVG file's text made fit to sit inside HTML: no XML prolog or doctype, every id (and
    reference to it) prefixed so that several figures never share an id."""
    text = re.sub(r"<\?xml[^>]*\?>", "", text)
    text = re.sub(r"<!DOCTYPE[^>]*>", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    ids = set(re.findall(r'\sid="([^"]+)"', text))

    def sub(m: re.Match) -> str:
        return m.group(1) + prefix + m.group(2) if m.group(2) in ids else m.group(0)

    return _SVG_ID.sub(sub, text).strip()


def figure_html(path: Path, prefix: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{_esc(caption or path.name)}</figcaption>"
    if not path.is_file():
        return f"<p class='muted'>figure {_esc(path.name)} is missing from the store</p>"
    if path.suffix.lower() == ".svg":
        return f"<figure>{inline_svg(path.read_text(encoding='utf-8'), prefix)}{cap}</figure>"
    if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".gif"):
        mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg" if path.suffix.lower() != ".gif" else "image/gif"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"<figure><img alt='{_esc(path.name)}' src='data:{mime};base64,{data}'>{cap}</figure>"
    return f"<p class='muted'>figure {_esc(path.name)}: unsupported format</p>"


def figures_html(root: Path, figures: Sequence[str], prefix: str) -> str:
    """Figures listed by a store (relative to it); SVG preferred over a PNG of the same name."""
    by_stem: dict[str, list[Path]] = {}
    for f in figures:
        p = (root / f).resolve()
        by_stem.setdefault(str(p.with_suffix("")), []).append(p)
    out = []
    for i, (stem, paths) in enumerate(by_stem.items()):
        svg = [p for p in paths if p.suffix.lower() == ".svg" and p.is_file()]
        chosen = svg[0] if svg else paths[0]
        out.append(figure_html(chosen, f"{prefix}f{i}-", chosen.relative_to(root.resolve()).as_posix()
                               if chosen.is_relative_to(root.resolve()) else chosen.name))
    return "".join(out)


# -- reading stores -----------------------------------------------------------------------------------
def _open_meta(path: Path) -> dict:
    import zarr

    if not path.exists():
        raise StoreError(f"no store at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    except Exception:
        raise StoreError(f"{path} is not a Zarr store") from None
    if ATTR_KEY not in group.attrs:
        raise StoreError(f"{path} is a Zarr store but not a dithooks store (no '{ATTR_KEY}' metadata)")
    return dict(group.attrs[ATTR_KEY])


def _duration(meta: dict) -> float | None:
    try:
        a = _dt.datetime.fromisoformat(meta["started"])
        b = _dt.datetime.fromisoformat(meta["finished"])
        return (b - a).total_seconds()
    except Exception:
        return None


def _status_html(status: Any) -> str:
    cls = "status-complete" if status == "complete" else "status-other"
    return f"<span class='{cls}'>{_esc(status or 'unknown')}</span>"


def _run_metadata(path: Path, meta: dict, kind: str) -> str:
    req = meta.get("request") if isinstance(meta.get("request"), dict) else None
    model = meta.get("model_id") or (req or {}).get("model") or "embedded default"
    dur = _duration(meta)
    pairs = [("store", str(path)), ("kind", kind), ("model", model), ("started", meta.get("started")),
             ("finished", meta.get("finished")),
             ("wall time", f"{dur:.1f} s (first start to last finish)" if dur is not None else None),
             ("runs (starts)", len(meta.get("runs", [])) or None), ("command", meta.get("command")),
             ("error", meta.get("error"))]
    out = [f"<p>status: {_status_html(meta.get('status'))}</p>", meta_table(pairs)]
    timings = meta.get("timings")
    if isinstance(timings, dict) and timings:
        out.append(table_html([{"part": k, "seconds": v} for k, v in timings.items()], "timings"))
    if isinstance(meta.get("cells"), dict):
        c = meta["cells"]
        out.append(f"<p class='muted'>cells complete: {_esc(c.get('done'))} of {_esc(c.get('total'))}</p>")
    if req is not None:
        out.append(_details("request (as stored)", req))
    elif kind == "capture":
        keys = ("model_id", "sampler", "seeds", "labels", "layers", "hooks", "storage_dtype", "compute_dtype",
                "extras", "probes")
        out.append(_details("request (as stored)", {k: meta.get(k) for k in keys if k in meta}))
    if isinstance(meta.get("versions"), dict):
        out.append("<h3>versions</h3>" + meta_table(sorted(meta["versions"].items())))
    return "".join(out)


def _summary_convention(path: Path, meta: dict, prefix: str) -> str:
    s = meta.get("summary")
    if not isinstance(s, dict):
        return "<p class='muted'>this store has no summary yet (unfinished run?)</p>"
    out = []
    for t in s.get("tables") or []:
        out.append(table_html(list(t.get("rows") or []), t.get("title")))
    figs = s.get("figures") or []
    if figs:
        out.append("<h3>figures</h3>" + figures_html(path, figs, prefix))
    notes = s.get("notes") or []
    if notes:
        out.append("<h3>notes</h3><ul class='notes'>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    return "".join(out)


def _nested_runs(path: Path) -> str:
    from ..store.reader import open_store

    rows = []
    for marker in sorted(path.rglob(STEP_COMPLETE)):  # every capture store has this array
        d = marker.parent
        if d == path or not marker.is_dir():
            continue
        try:
            meta = _open_meta(d)
            comp = open_store(d).completeness()
        except StoreError:
            continue
        dur = _duration(meta)
        rows.append({"run": d.relative_to(path).as_posix(), "status": comp.get("status"),
                     "steps complete": f"{comp['steps_complete']} of {comp['steps_total']}",
                     "seconds": round(dur, 1) if dur is not None else None})
    return table_html(rows, "capture runs inside this store") if rows else ""


def _capture_section(path: Path, prefix: str) -> str:
    from ..store.reader import open_store

    s = open_store(path)
    meta = s.meta
    comp = s.completeness()
    smp = meta.get("sampler", {}) or {}
    extras = meta.get("extras") or {}
    facts = [("sampler", f"{smp.get('name')} {smp.get('steps')} steps, eta {smp.get('eta')}, guidance {smp.get('guidance')}"),
             ("samples", f"labels {meta.get('labels')}, seeds {meta.get('seeds')}"),
             ("layers", str(meta.get("layers"))),
             ("steps complete", f"{comp['steps_complete']} of {comp['steps_total']} ({comp['complete_steps']})"),
             ("dtype", f"stored {meta.get('storage_dtype')}, computed {meta.get('compute_dtype')}")]
    for k in ("replicas", "attention", "jvp"):
        if k in extras:
            facts.append((k, json.dumps(extras[k])))
    if meta.get("probes"):
        facts.append(("probes", ", ".join(p["name"] for p in meta["probes"])))
    out = ["<h3>capture</h3>", meta_table(facts)]
    names = s.array_names()
    from ..probe_runner import probe_array_name  # imports torch: only for capture stores

    if any(n.startswith(probe_array_name(ROUTING, "")) for n in names):
        out.append(_routing_html(s, prefix))
    if any(n.startswith(probe_array_name(MODES, "")) for n in names):
        out.append(_modes_html(s))
    arrays = []
    for n in names:
        a = s.array_info(n)
        arrays.append({"array": a.name, "dims": "(" + ", ".join(a.dims) + ")", "shape": "x".join(map(str, a.shape)),
                       "dtype": a.dtype, "MiB": round(a.nbytes_logical / 2**20, 3),
                       "MiB on disk": round(a.nbytes_stored / 2**20, 3)})
    out.append(table_html(arrays, f"arrays ({len(arrays)})"))
    return "".join(out)


def _routing_html(store, prefix: str) -> str:
    from ..analysis.routing_summary import routing_heatmap, routing_summary, routing_table, summary_lines

    try:
        rows = routing_table(store)
        summary = routing_summary(store)
    except StoreError as e:
        return f"<p class='muted'>routing probe: {_esc(e)}</p>"
    out = [table_html(rows, "routing dominance per block (medians over steps and samples)"),
           "<ul class='notes'>" + "".join(f"<li>{_esc(line)}</li>" for line in summary_lines(summary)) + "</ul>"]
    with tempfile.TemporaryDirectory() as tmp:
        fig = Path(tmp) / "routing_heatmap.svg"
        try:
            routing_heatmap(store, fig)
            out.append(figure_html(fig, f"{prefix}rh-", "log10 ‖R‖/‖M‖ (gated), layer × step"))
        except Exception as e:  # a plot is a nicety: the tables stand without it
            out.append(f"<p class='muted'>routing heatmap unavailable: {_esc(e)}</p>")
    return "".join(out)


def _modes_html(store) -> str:
    from ..probe_runner import probe_array_name

    done = np.flatnonzero(np.asarray(store.step_complete(), dtype=bool))
    if not done.size:
        return ""
    step = int(done[-1])
    if probe_array_name(MODES, "R") not in store.array_names():
        return ""
    vals = {k: np.asarray(store.select(probe_array_name(MODES, k), step=step).values, dtype=float)
            for k in ("E_lead", "E_trail", "R")}
    layers = store.coord("layer").tolist()
    rows = [{"block": int(layer), "E_lead": vals["E_lead"][0, i], "E_trail": vals["E_trail"][0, i], "R": vals["R"][0, i]}
            for i, layer in enumerate(layers)]
    return table_html(rows, f"difference modes at the last complete step ({step})")


def store_section(path: str | Path, index: int = 0) -> tuple[str, str]:
    """(title, HTML) of one store's section."""
    path = Path(path)
    meta = _open_meta(path)
    kind = meta.get("kind") or "capture"
    prefix = f"s{index}-"
    body = [_run_metadata(path, meta, kind)]
    if isinstance(meta.get("summary"), dict) or kind != "capture":
        body.append(_summary_convention(path, meta, prefix))
        body.append(_nested_runs(path))
    if STEP_COMPLETE in {p.name for p in path.iterdir()}:
        body.append(_capture_section(path, prefix))
    title = f"{path.name} ({kind})"
    return title, "".join(body)


def build_report(paths: Sequence[str | Path], title: str | None = None, command: str | None = None) -> str:
    """The whole page for ``paths`` (one section each, in order)."""
    from .. import __version__

    if not paths:
        raise DithooksError("give at least one store")
    sections = [store_section(p, i) for i, p in enumerate(paths)]
    title = title or "dithooks report"
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    toc = "".join(f"<li><a href='#store-{i}'>{_esc(t)}</a></li>" for i, (t, _) in enumerate(sections))
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{_esc(title)}</h1>",
             f"<p class='muted'>made {when} by dithooks {_esc(__version__)}"
             + (f" with <code>{_esc(command)}</code>" if command else "") + f"; {len(sections)} store(s)</p>",
             f"<nav><ul>{toc}</ul></nav>"]
    for i, (t, body) in enumerate(sections):
        parts.append(f"<section id='store-{i}'><h2>{_esc(t)}</h2>{body}</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(paths: Sequence[str | Path], out: str | Path, title: str | None = None,
                 command: str | None = None) -> Path:
    """Write :func:`build_report` to ``out`` (UTF-8); returns the path."""
    out = Path(out)
    text = build_report(paths, title, command)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as e:
        raise DithooksError(f"cannot write {out}: {e.strerror or e}") from None
    return out
