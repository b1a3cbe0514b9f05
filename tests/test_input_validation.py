"""Issue 9: what the fuzz suite cannot show by exit codes alone.

Config/weights mismatches and the opt-in, devices, hook globs against ``--layers`` (checked
against fnmatch), probes loaded from a file path, ``routing --resume`` after an interruption
(bit-for-bit the unbroken run), help texts, and the Python-level validation of the specs.
"""

from __future__ import annotations

import json
import math
import shutil
from fnmatch import fnmatchcase

import numpy as np
import pytest
import torch
import typer.main
from typer.testing import CliRunner

from dithooks.cli.main import app
from dithooks.errors import DithooksError, HookNameError, ModelNotFoundError
from dithooks.loading import check_device, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_config_weight_mismatch_is_refused_unless_allowed(tiny_model_dir, tmp_path):
    fewer = _with_config(tiny_model_dir, tmp_path / "fewer", num_layers=2)   # weights of blocks 2-3 unused
    more = _with_config(tiny_model_dir, tmp_path / "more", num_layers=6)     # blocks 4-5 without weights
    with pytest.raises(ModelNotFoundError, match=r"weights the config does not use.*transformer_blocks\.2\."):
        load_model(str(fewer))
    with pytest.raises(ModelNotFoundError, match=r"parameters the weights do not provide.*transformer_blocks\.[45]\."):
        load_model(str(more))
    loaded = load_model(str(fewer), allow_weight_mismatch=True)
    assert loaded.adapter.num_layers == 2
    full = load_model(str(tiny_model_dir))
    for name, p in loaded.transformer.state_dict().items():  # what does load is the checkpoint's
        assert torch.equal(p, full.transformer.state_dict()[name]), name
    r = run("hooks", "--model", fewer)
    assert r.exit_code == 2 and "--allow-weight-mismatch" in r.output
    r = run("hooks", "--model", fewer, "--allow-weight-mismatch", "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["num_layers"] == 2


def test_capture_opt_in_to_a_mismatch(tiny_model_dir, tmp_path):
    fewer = _with_config(tiny_model_dir, tmp_path / "fewer", num_layers=2)
    out = tmp_path / "c.zarr"
    r = run("capture", "--model", fewer, "--steps", "2", "--out", out, "-q")
    assert r.exit_code == 2 and not out.exists()
    r = run("capture", "--model", fewer, "--steps", "2", "--out", out, "-q", "--allow-weight-mismatch")
    assert r.exit_code == 0, r.output
    assert json.loads(run("ls", out, "--json").stdout)["metadata"]["layers"] == [0, 1]


def test_truncated_config_names_the_file(tiny_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    text = (d / "config.json").read_text()
    (d / "config.json").write_text(text[:40])
    with pytest.raises(ModelNotFoundError, match=r"config\.json is not valid JSON"):
        load_model(str(d))


def test_devices():
    assert check_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cpu:x", ""):
        with pytest.raises(DithooksError):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(DithooksError, match="CUDA is not available"):
            check_device("cuda")
    else:
        with pytest.raises(DithooksError, match="does not exist"):
            check_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.parametrize("pattern,layers", [
    ("blocks.2*.mlp.out", [0, 1, 2, 3]), ("blocks.[13].resid_*", [1, 2]), ("*.resid_post", [3]),
    ("final.*", [0]), ("blocks.?.attn.out", [0, 2]),
])
def test_hook_globs_expand_against_the_selected_layers(tiny_loaded, pattern, layers):
    from dithooks.capture import expand_hooks
    from dithooks.hookpoints import layer_template

    available = list(tiny_loaded.adapter.hook_points())
    got = expand_hooks([pattern], layers, available)
    # independently: every point the glob matches whose block (if any) is selected, in listing order
    want = [n for n in available if fnmatchcase(n, pattern) and layer_template(n)[1] in (None, *layers)]
    assert got == want and got


def test_hook_names_outside_the_selected_layers_are_refused(tiny_loaded):
    from dithooks.capture import expand_hooks

    available = list(tiny_loaded.adapter.hook_points())
    with pytest.raises(HookNameError, match="among the selected blocks 0-1"):
        expand_hooks(["blocks.2*.mlp.out"], [0, 1], available)
    with pytest.raises(HookNameError, match="block 3, which --layers"):
        expand_hooks(["blocks.3.resid_post"], [0, 1], available)
    assert expand_hooks(["blocks.1.resid_post", "final.out"], [0, 1], available) == ["blocks.1.resid_post", "final.out"]


def test_glob_capture_stores_only_selected_layers(tiny_model_dir, tmp_path):
    out = tmp_path / "g.zarr"
    r = run("capture", "--model", tiny_model_dir, "--layers", "2-", "--hooks", "blocks.*.mlp.out",
            "--steps", "2", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    meta = json.loads(run("ls", out, "--json").stdout)["metadata"]
    assert meta["hooks"] == ["blocks.2.mlp.out", "blocks.3.mlp.out"]


PROBE_FILE = '''
from helper_of_the_probe import SCALE  # a module beside this file
from dithooks.probes.api import Output, Probe

class Mean(Probe):
    needs = ("resid_post",)
    resumable = True

    def start(self, run):
        self.layers, self.vals = run.layers, {}

    def observe(self, name, value, ctx):
        self.vals[ctx.layer] = float(value.float().mean()) * SCALE

    def end_step(self, step):
        return {"mean": Output([self.vals[i] for i in self.layers], ("layer",))}
'''


def test_probe_from_a_file_path(tmp_path, tiny_model_dir, monkeypatch):
    from dithooks.probes.api import Probe, probe_class

    pp = tmp_path / "pp"
    pp.mkdir()
    (pp / "probe.py").write_text(PROBE_FILE)
    (pp / "helper_of_the_probe.py").write_text("SCALE = 2.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))  # the file's folder is added for the run
    cls = probe_class("pp/probe.py:Mean")
    assert issubclass(cls, Probe) and probe_class("pp/probe.py:Mean") is cls  # loaded once
    out = tmp_path / "p.zarr"
    r = run("probe", "pp/probe.py:Mean", "--model", tiny_model_dir, "--layers", "0,2", "--steps", "2",
            "--seeds", "0", "--hooks", "resid_post", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    from dithooks.store.reader import open_store

    s = open_store(out)
    means = np.asarray(s.select("probe.Mean.mean").values)
    raw = np.asarray(s.select("blocks.resid_post").values, dtype=np.float64)  # stored as fp16
    assert means.shape == (2, 2)
    np.testing.assert_allclose(means, 2.0 * raw.reshape(2, 2, -1).mean(-1), rtol=2e-3, atol=2e-3)


def test_check_options_value_error_becomes_a_probe_error():
    from dithooks.probes.api import Option, Probe, ProbeError

    class Picky(Probe):
        options = {"n": Option(1)}

        def check_options(self):
            if self.opts["n"] < 1:
                raise ValueError("n must be at least 1")

    with pytest.raises(ProbeError, match=r"Picky: n must be at least 1"):
        Picky(n="0")
    assert Picky(n="3").opts["n"] == 3


def test_routing_resume_after_an_interruption_equals_an_unbroken_run(tiny_model_dir, tmp_path, monkeypatch):
    from dithooks.probes.routing import RoutingDominance as RoutingProbe
    from dithooks.store.reader import open_store

    args = ["routing", "--model", tiny_model_dir, "--layers", "0,3", "--steps", "3", "--seeds", "0-1",
            "--coupling", "0.3", "-q", "--json"]
    r = run(*args, "--out", tmp_path / "whole.zarr")
    assert r.exit_code == 0, r.output
    original = RoutingProbe.end_step

    def interrupted(self, step):
        if step == 1:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(RoutingProbe, "end_step", interrupted)
    part = tmp_path / "part.zarr"
    r = run(*args, "--out", part)
    assert r.exit_code != 0 and "--resume" in r.stderr and len(r.stderr.splitlines()) == 1, r.output
    assert json.loads(run("ls", part, "--json").stdout)["metadata"]["status"] == "interrupted"
    monkeypatch.setattr(RoutingProbe, "end_step", original)
    r = run(*args, "--out", part, "--resume")
    assert r.exit_code == 0, r.output
    whole, resumed = open_store(tmp_path / "whole.zarr"), open_store(part)
    names = [n for n in whole.array_names() if n.startswith("probe.routing.")]
    assert names and names == [n for n in resumed.array_names() if n.startswith("probe.routing.")]
    for n in names:
        a, b = np.asarray(whole.select(n).values), np.asarray(resumed.select(n).values)
        assert a.tobytes() == b.tobytes(), n


def _leaf_commands():
    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, path + [name])
        else:
            yield path

    return list(walk(typer.main.get_command(app), []))


def test_help_cites_no_theory_file_and_shows_flags_without_a_value():
    commands = _leaf_commands()
    assert len(commands) >= 9
    for path in commands:
        r = run(*path, "--help")
        assert r.exit_code == 0, (path, r.output)
        assert "THEORY" not in r.output, (path, [l for l in r.output.splitlines() if "THEORY" in l])
        assert "<bool>" not in r.output, path
    assert "THEORY" not in run("probes").output


def test_python_specs_refuse_bad_numbers():
    from dithooks.sampling import ReplicaSpec, SamplerSpec, make_scheduler
    from dithooks.loading import DIT_SCHEDULE

    for bad in (dict(guidance=math.nan), dict(guidance=math.inf), dict(eta=math.nan), dict(steps=0),
                dict(steps=2.5)):
        with pytest.raises(DithooksError):
            SamplerSpec(**bad)
    for bad in (dict(g=2.0), dict(g=math.nan), dict(kappa=1.5), dict(couple_until=-1),
                dict(share_noise_until=-2), dict(layers=(-1,)), dict(layers=())):
        with pytest.raises(DithooksError):
            ReplicaSpec(**bad)
    with pytest.raises(DithooksError, match="use --steps 1-1000"):
        make_scheduler(SamplerSpec(steps=1001), DIT_SCHEDULE)
    assert len(make_scheduler(SamplerSpec(steps=1000), DIT_SCHEDULE).timesteps) == 1000


def test_list_options():
    from dithooks.cli.run_options import MAX_LIST_ITEMS, parse_int_list

    assert parse_int_list("0-3,7", "seeds") == [0, 1, 2, 3, 7]
    assert parse_int_list("-2--1", "x") == [-2, -1]
    with pytest.raises(DithooksError, match="more than"):
        parse_int_list(f"0-{MAX_LIST_ITEMS}", "seeds")
    with pytest.raises(DithooksError, match="out of range"):
        parse_int_list("5", "seeds", lo=0, hi=4)
    with pytest.raises(DithooksError, match="empty range"):
        parse_int_list("3-1", "seeds")
