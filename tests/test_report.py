"""`dithooks report`: one self-contained HTML page, checked in headless Chromium."""

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dithooks.capture import CaptureConfig, capture
from dithooks.cli.main import app
from dithooks.errors import StoreError
from dithooks.protocols.protocol2 import Protocol2Request, run_protocol2
from dithooks.protocols.store import ResultsStore
from dithooks.report import build_report, write_report
from dithooks.report.html import inline_svg
from dithooks.sampling import ReplicaSpec, SamplerSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dir, tiny_loaded):
    d = tmp_path_factory.mktemp("stores")
    plain = d / "plain.zarr"
    capture(CaptureConfig(out=str(plain), model=str(tiny_model_dir), layers="0-1", sampler=SamplerSpec("ddim", 2),
                          seeds=(0, 1)), loaded=tiny_loaded)
    routing = d / "routing.zarr"
    capture(CaptureConfig(out=str(routing), model=str(tiny_model_dir), layers="0-3", hooks=(),
                          sampler=SamplerSpec("ddim", 2), labels=(1,), seeds=(0, 1), replicas=ReplicaSpec(g=0.3),
                          probes=("routing", ("difference_modes", {"pairs": "replica"}))), loaded=tiny_loaded)
    p2 = d / "p2.zarr"
    run_protocol2(Protocol2Request(model=str(tiny_model_dir), g=(0.0, 0.5), pairs=4, steps=2, at_step=(1,),
                                   layers="0-2", bootstrap=20), p2, loaded=tiny_loaded, log=lambda m: None)
    # a store of another kind following the summary convention (as locality / protocol1 stores do)
    other = d / "other.zarr"
    rs = ResultsStore.create(other, "locality", {"radius": [0, 1]})
    (other / "figures").mkdir()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(other / "figures" / "only_png.png")
    fig.savefig(other / "figures" / "both.svg")
    fig.savefig(other / "figures" / "both.png")
    plt.close(fig)
    rs.update_meta(timings={"radius 0": 1.5}, summary={
        "tables": [{"title": "locality gap", "rows": [{"r": 0, "G_loc": 0.31, "ci": [0.2, 0.4]},
                                                      {"r": 1, "G_loc": float("nan"), "ci": [None, None]}]}],
        "figures": ["figures/only_png.png", "figures/both.svg", "figures/both.png"],
        "notes": ["a <b>note</b> & more"]})
    rs.finish("complete")
    return {"plain": plain, "routing": routing, "p2": p2, "other": other}


def test_report_holds_every_store_self_contained(stores, tmp_path):
    out = write_report(list(stores.values()), tmp_path / "r.html", title="test report", command="dithooks report ...")
    page = out.read_text()
    for name in ("plain.zarr (capture)", "routing.zarr (capture)", "p2.zarr (protocol2)", "other.zarr (locality)"):
        assert name in page
    # nothing fetched at view time: no scripts, stylesheets or remote sources
    assert "<script" not in page and "<link" not in page and not re.search(r"src=['\"]https?:", page)
    # protocol2: its tables, 4 figures inline as SVG, notes; nested runs listed
    assert "Protocol II: mode energies and gap ratio" in page and "capture runs inside this store" in page
    assert "runs/g_0.5" in page
    # routing store: the routing table with bound counts and linearisation error, the modes table
    assert "routing dominance per block" in page and "non-vacuous (denominator &gt; 0)" in page
    assert "Linearisation error" in page and "difference modes at the last complete step" in page
    # the other kind: png as base64, svg preferred over the png of the same name, notes escaped
    assert page.count("<img ") == 1 and "<img alt='only_png.png' src='data:image/png;base64," in page
    assert "a &lt;b&gt;note&lt;/b&gt; &amp; more" in page
    # every element id on the page is unique (SVG ids are prefixed per figure)
    ids = re.findall(r'\sid="([^"]+)"', page) + re.findall(r"\sid='([^']+)'", page)
    assert len(ids) == len(set(ids)) and len(ids) > 20
    svgs = page.count("<svg")
    assert svgs == 4 + 1 + 1  # protocol2 figures, routing heatmap, other/both.svg


def test_inline_svg_prefixes_ids_and_references():
    text = ('<?xml version="1.0"?>\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "x">\n<svg xmlns="http://www.w3.org/2000/svg">'
            '<defs><path id="g1" d="M0 0"/><clipPath id="c1"><rect/></clipPath></defs>'
            '<use xlink:href="#g1"/><g clip-path="url(#c1)"/><a href="#other"/></svg>')
    out = inline_svg(text, "p-")
    assert out.startswith("<svg") and "DOCTYPE" not in out
    assert 'id="p-g1"' in out and 'xlink:href="#p-g1"' in out and "url(#p-c1)" in out
    assert 'href="#other"' in out  # not an id of this figure: left alone


def test_bad_inputs_are_one_line_errors(tmp_path, stores):
    with pytest.raises(StoreError, match="no store at"):
        build_report([tmp_path / "nope.zarr"])
    runner = CliRunner()
    r = runner.invoke(app, ["report", str(tmp_path / "nope.zarr"), "--out", str(tmp_path / "x.html")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "no store at" in r.output
    r = runner.invoke(app, ["report", str(stores["other"]), "--out", str(tmp_path / "y.html")])
    assert r.exit_code == 0 and "wrote" in r.output and (tmp_path / "y.html").stat().st_size > 1000


# what the browser is asked: after load, count rendered tables, SVGs with a non-empty box, decoded images
PROBE_SCRIPT = """<script>
window.addEventListener('load', () => {
  const svgs = [...document.querySelectorAll('figure > svg')];
  const imgs = [...document.querySelectorAll('figure > img')];
  const out = {tables: document.querySelectorAll('table').length,
               rows: document.querySelectorAll('tbody tr').length,
               svgs: svgs.length, svgs_drawn: svgs.filter(s => s.getBoundingClientRect().width > 50 &&
                                                         s.getBBox().width > 10).length,
               imgs: imgs.length, imgs_decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
               sections: document.querySelectorAll('section').length};
  const pre = document.createElement('pre'); pre.id = 'render-check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); CI has it")
def test_report_renders_in_headless_chromium(stores, tmp_path):
    page = build_report(list(stores.values()))
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE_SCRIPT + "</body>"), encoding="utf-8")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="render-check">(.*?)</pre>', res.stdout)
    assert m, f"no render check in the DOM (exit {res.returncode}): {res.stderr[-2000:]}"
    got = json.loads(m.group(1).replace("&quot;", '"'))
    assert got["sections"] == 4
    assert got["svgs"] == 6 and got["svgs_drawn"] == 6, got
    assert got["imgs"] == 1 and got["imgs_decoded"] == 1, got
    assert got["tables"] >= 12 and got["rows"] > 30, got
