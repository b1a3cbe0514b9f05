"""Shared CLI options live once (cli/run_options.py): SamplingOptions + @sampling_command."""

import inspect

import pytest
import typer
import typer.main
from typer.testing import CliRunner

from dithooks.cli import run_options as ro
from dithooks.cli.main import app


def test_every_shared_field_reaches_the_request_builder():
    fields = {f for f in ro.SamplingOptions.__dataclass_fields__} - set(ro.SamplingOptions.COMMAND_ONLY)
    params = set(inspect.signature(ro.sampling_request).parameters) - {"hooks", "compression", "probes"}
    assert fields == params


def test_sampling_commands_share_each_option_declaration():
    command = typer.main.get_command(app)
    seen: dict[str, tuple] = {}
    shared = set(ro.SamplingOptions.__dataclass_fields__)
    for name in ("capture", "probe", "routing"):
        for p in command.commands[name].params:
            if p.name not in shared:
                continue
            decl = (tuple(p.opts), tuple(p.secondary_opts), p.help)
            assert seen.setdefault(p.name, decl) == decl, f"{name} --{p.name} differs"
    assert len(seen) >= 25  # capture's, probe's and routing's sampling options all come from one place


def test_sampling_command_builds_the_signature_and_the_value():
    got = {}

    @ro.sampling_command("seeds mine steps quiet", seeds="0-3", pairs=True)
    def cmd(run: ro.SamplingOptions, mine: int = typer.Option(1, "--mine", help="Own option.")):
        got.update(run=run, mine=mine)

    assert list(inspect.signature(cmd).parameters) == ["seeds", "mine", "steps", "quiet"]
    one = typer.Typer()
    one.command()(cmd)
    r = CliRunner().invoke(one, ["--steps", "7", "--mine", "3"])
    assert r.exit_code == 0, r.output
    run = got["run"]
    assert (run.seeds, run.steps, run.pairs, run.quiet, got["mine"]) == ("0-3", 7, True, False, 3)
    assert run.out == ro.SamplingOptions().out  # not offered: the shared default
    help_text = CliRunner().invoke(one, ["--help"], env={"COLUMNS": "200"}).output
    assert help_text.index("--seeds") < help_text.index("--mine") < help_text.index("--steps")


@pytest.mark.parametrize("layout,defaults,needle", [
    ("seeds nonsense", {}, "neither a shared option"),
    ("seeds", {}, "missing from its layout"),
    ("seeds mine", {"nonsense": 1}, "no shared options"),
])
def test_sampling_command_refuses_bad_layouts(layout, defaults, needle):
    with pytest.raises(TypeError, match=needle):
        @ro.sampling_command(layout, **defaults)
        def cmd(run, mine: int = 1):
            pass


def test_request_validates_once_in_one_place():
    from dithooks.errors import DithooksError

    base = ro.SamplingOptions(out="x.zarr")
    request = base.request(hooks="resid_post, attn.out")
    assert request["hooks"] == ("resid_post", "attn.out") and request["sampler"].name == "ddim"
    assert request[ro.AUTO_SAMPLER] is True  # --sampler auto: make_session resolves it with the model
    assert ro.AUTO_SAMPLER not in ro.SamplingOptions(out="x.zarr", sampler="ddpm").request()
    for bad, needle in ((dict(eta=2.0), "--eta"), (dict(seeds="3-1"), "empty range"), (dict(steps=0), "--steps"),
                        (dict(resume=True, overwrite=True), "exclude"), (dict(prompt_rows="0"), "--prompt-rows")):
        with pytest.raises(DithooksError, match=needle):
            ro.SamplingOptions(out="x.zarr", **bad).request()


def test_importing_the_cli_loads_no_torch():
    """Command modules import the package lazily, inside the command (`dithooks query` stays light)."""
    import subprocess
    import sys

    code = ("import sys\nfrom dithooks.cli.main import app\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'zarr') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
