"""``dithooks capture`` under diffusers' context parallelism (Ulysses, 2 gloo ranks on CPU, forked):
the store rank 0 writes equals a one-process capture of the same run
(dithooks/capture/context_parallel.py, docs/scaling.md §4).

The tiny Flux of the conformance suite (one double-stream block, one single-stream block, 4x4
image tokens) with 6 text tokens (diffusers cuts each sequence into equal shards: 8 + 8 image,
3 + 3 text tokens). Points of every kind the gather handles: image and text residual streams
and block outputs (double and single blocks), single blocks' joint-sequence slices (attn.z,
mlp.act, parallel.out: cut at the *local* text length), the embedders, adaLN vectors and temb
(not sharded), final.out (read after diffusers' own gather).

Not bit for bit: with the tokens split, each rank's projections and MLPs multiply (8, 32)
instead of (16, 32) matrices and Ulysses' attention runs per head on the gathered sequence, so
CPU BLAS may sum in another order; the values agree to float32 rounding (measured: < 1e-6
here; tolerance 1e-5), and the sampled latents too.
"""

import json
import os
import socket

import numpy as np
import pytest
import torch

pytest.importorskip("torch.distributed")

HOOKS = ("resid_pre", "resid_post", "context.resid_post", "attn.out", "attn.z", "context.attn.z", "mlp.act",
         "parallel.out", "context.parallel.out", "adaln.gate_msa", "embed.out", "context_embed.out",
         "time_embed.out", "final.out")
TEXT = 6
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(model, out, text=TEXT, **kw):
    from dithooks.capture import CaptureConfig
    from dithooks.conditioning import Conditioning
    from dithooks.sampling import SamplerSpec
    from tests.conformance import family_flux

    g = torch.Generator().manual_seed(0)
    cond = Conditioning(prompt_embeds=torch.randn(2, text, family_flux.JOINT_DIM, generator=g),
                        pooled_prompt_embeds=torch.randn(2, family_flux.POOLED_DIM, generator=g))
    base = dict(out=str(out), model=str(model), layers="all", hooks=HOOKS, sampler=SamplerSpec("flow", STEPS),
                seeds=(0, 1), storage_dtype="fp32", conditioning=cond)
    return CaptureConfig(**{**base, **kw})


def _no_store_on_this_rank(monkeypatch_calls: list) -> None:
    """Other ranks must open and write nothing: any call is recorded (and fails the test)."""
    from dithooks.store.lifecycle import StoreLifecycle
    from dithooks.store.writer import StoreWriter

    for cls, name in ((StoreLifecycle, "open"), (StoreWriter, "__init__"), (StoreLifecycle, "finish")):
        orig = getattr(cls, name)

        def spy(*a, _orig=orig, _name=f"{cls.__name__}.{name}", **k):
            monkeypatch_calls.append(_name)
            return _orig(*a, **k)

        setattr(cls, name, spy)


def _rank_main(rank: int, world: int, ports: list, model: str, tmp: str) -> None:
    import torch.distributed as dist

    from dithooks.capture.context_parallel import capture_context_parallel
    from dithooks.errors import DithooksError

    import faulthandler

    torch.set_num_threads(1)
    faulthandler.dump_traceback_later(120, exit=True)  # a deadlock fails the test instead of hanging it
    result: dict = {}
    calls: list = []
    if rank != 0:
        _no_store_on_this_rank(calls)
    os.environ.update(MASTER_ADDR="127.0.0.1")
    # 1. a whole capture
    os.environ["MASTER_PORT"] = str(ports[0])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    got = capture_context_parallel(_cfg(model, os.path.join(tmp, "cp.zarr")), "ulysses=2")
    result["returned"] = None if got is None else got.steps_run
    dist.destroy_process_group()
    # 2. --resume of a store a one-process capture left at step 1: rank 0 sends the stored
    #    state to rank 1
    os.environ["MASTER_PORT"] = str(ports[1])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    got = capture_context_parallel(_cfg(model, os.path.join(tmp, "part.zarr"), mode="resume"), "ulysses=2")
    result["resumed"] = None if got is None else [got.resumed_from, got.steps_run]
    dist.destroy_process_group()
    result["store_calls"] = calls
    # 3. rank 1 fails in its second model call: every rank stops with one line, rank 0's store
    #    says failed and keeps step 0. Last: the failing rank's process ends (which is what
    #    unblocks the other ranks' collectives; a CLI rank ends after its one-line error)
    os.environ["MASTER_PORT"] = str(ports[2])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if rank == 1:
        _fail_second_call()
    try:
        capture_context_parallel(_cfg(model, os.path.join(tmp, "fail.zarr")), "ulysses=2")
        result["failure"] = None
    except DithooksError as e:
        result["failure"] = str(e)
    except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
        result["failure"] = f"NOT ONE LINE: {type(e).__name__}: {e}"
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def _fail_second_call() -> None:
    from diffusers import FluxTransformer2DModel

    seen = []
    orig = FluxTransformer2DModel.forward

    def failing(self, *a, **k):
        seen.append(1)
        if len(seen) == 2:
            raise RuntimeError("injected failure")
        return orig(self, *a, **k)

    FluxTransformer2DModel.forward = failing


def test_context_parallel_capture_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    import diffusers  # noqa: F401 - imported before the fork, so the ranks do not pay it again

    from dithooks.capture import capture
    from dithooks.capture import context_parallel  # noqa: F401
    from dithooks.store.reader import open_store
    from tests.conformance import family_flux

    model = family_flux.save_tiny(tmp_path / "tiny-flux")
    ref = capture(_cfg(model, tmp_path / "ref.zarr"))  # one process, no parallelism
    assert ref.steps_run == STEPS
    from diffusers import FluxTransformer2DModel

    orig = FluxTransformer2DModel.forward
    _fail_second_call()  # a one-process capture that stops after step 0, for the --resume case
    try:
        with pytest.raises(RuntimeError, match="injected"):
            capture(_cfg(model, tmp_path / "part.zarr"))
    finally:
        FluxTransformer2DModel.forward = orig
    assert list(open_store(tmp_path / "part.zarr").step_complete()) == [True, False, False]
    mp.start_processes(_rank_main, args=(2, [_free_port() for _ in range(3)], str(model), str(tmp_path)), nprocs=2,
                       join=True, start_method="fork")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["returned"] == STEPS and r1["returned"] is None
    assert r1["store_calls"] == []  # rank 1 opened and wrote nothing

    import zarr

    a, b = zarr.open_group(str(tmp_path / "ref.zarr"), mode="r"), zarr.open_group(str(tmp_path / "cp.zarr"), mode="r")
    assert open_store(tmp_path / "cp.zarr").meta["status"] == "complete"
    from dithooks.store.verify import verify_store

    assert verify_store(tmp_path / "cp.zarr").ok
    names = {k for k, _ in a.arrays()}
    assert names == {k for k, _ in b.arrays()}
    assert {"blocks.attn.z", "blocks.context.parallel.out", "blocks.mlp.act", "final.out", "latents"} <= names
    for name in sorted(names):
        x, y = np.asarray(a[name][...]), np.asarray(b[name][...])
        assert x.shape == y.shape and x.dtype == y.dtype, name
        assert a[name].metadata.dimension_names == b[name].metadata.dimension_names, name
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(y, x, err_msg=name)
    # the single block's joint slices are cut where the text ends (6 text, 16 image tokens)
    assert a["blocks.context.attn.z"].shape[-3] == TEXT and a["blocks.attn.z"].shape[-3] == 16

    # the failure: one line on every rank, naming rank 1; rank 0's store is failed and holds step 0
    assert r0["failure"] == r1["failure"] == "rank 1 failed: RuntimeError: injected failure", (r0, r1)
    f = open_store(tmp_path / "fail.zarr")
    assert f.meta["status"] == "failed" and "rank 1 failed: RuntimeError: injected failure" in f.meta["error"]
    assert list(f.step_complete()) == [True, False, False]

    # the one-process partial store, resumed under context parallelism (rank 1 sampled from rank
    # 0's stored state): complete, and equal to the one-process capture as above
    assert r0["resumed"] == [1, STEPS - 1] and r1["resumed"] is None
    c = zarr.open_group(str(tmp_path / "part.zarr"), mode="r")
    assert open_store(tmp_path / "part.zarr").meta["status"] == "complete"
    for name in ("blocks.resid_post", "blocks.parallel.out", "final.out", "latents"):
        np.testing.assert_allclose(np.asarray(c[name][...]), np.asarray(a[name][...]), rtol=1e-5, atol=1e-5,
                                   err_msg=name)


# -- refusals (one process: checked before any process group is needed) --------------------------------------
@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    from tests.conformance import family_flux

    return family_flux.save_tiny(tmp_path_factory.mktemp("cp") / "tiny-flux")


def test_context_parallel_option_is_parsed_or_refused_in_one_line():
    from dithooks.capture.context_parallel import CPSpec, parse_context_parallel
    from dithooks.errors import DithooksError

    assert parse_context_parallel("ulysses=2") == CPSpec("ulysses", 2) and str(CPSpec("ulysses", 4)) == "ulysses=4"
    for bad, msg in (("ulysses", "takes ulysses=W"), ("ulysses=1", "W >= 2"), ("tp=2", "takes ulysses=W"),
                     ("ring=2", "ring attention needs an attention backend that returns the log-sum-exp")):
        with pytest.raises(DithooksError, match=msg) as e:
            parse_context_parallel(bad)
        assert "\n" not in str(e.value)


def test_what_cannot_be_right_under_context_parallelism_is_refused(tmp_path, flux_dir, tiny_model_dir):
    from dithooks.capture import CaptureSession
    from dithooks.capture.context_parallel import CPSpec, ContextParallel, check_context_parallel
    from dithooks.errors import DithooksError
    from dithooks.loading import load_model
    from dithooks.sampling import ReplicaSpec

    loaded = load_model(str(flux_dir))
    two = CPSpec("ulysses", 2)
    out = tmp_path / "x.zarr"
    check_context_parallel(CaptureSession(_cfg(flux_dir, out), loaded), two)  # the test's own request passes
    cases = [
        (dict(hooks=("resid_post", "attn.q")), "blocks.0.attn.q: attention-internal points are computed by dithooks' "
                                               "attention processors over a rank's local tokens only"),
        (dict(hooks=("attn.pattern",)), "attention-internal points"),
        (dict(hooks=("jvp.full",), layers="0"), "JVP points are not supported under --context-parallel"),
        (dict(hooks=("modules.x_embedder.out",)), "raw module points are not supported"),
        (dict(probes=("residual_norms",)), "probes cannot run under --context-parallel"),
        (dict(window=1), "--window is not supported under --context-parallel"),
        (dict(replicas=ReplicaSpec(kappa=0.3, g=0.5)), "replica pairs/coupling are not supported"),
    ]
    for kw, msg in cases:
        with pytest.raises(DithooksError, match=msg) as e:
            check_context_parallel(CaptureSession(_cfg(flux_dir, out, **kw), loaded), two)
        assert "\n" not in str(e.value)
    with pytest.raises(DithooksError, match="diffusers cuts the 5 text tokens into 2 equal shards"):
        check_context_parallel(CaptureSession(_cfg(flux_dir, out, text=5), loaded), two)
    with pytest.raises(DithooksError, match="splits the 2 attention heads over 4 ranks"):
        check_context_parallel(CaptureSession(_cfg(flux_dir, out), loaded), CPSpec("ulysses", 4))
    # a family whose diffusers model has no _cp_plan
    from dithooks.capture import CaptureConfig
    from dithooks.sampling import SamplerSpec

    dit = CaptureSession(CaptureConfig(out=str(out), model=str(tiny_model_dir), sampler=SamplerSpec("ddim", 2)))
    with pytest.raises(DithooksError, match=r"^dit does not support context parallelism in diffusers 0\.42"):
        check_context_parallel(dit, two)
    # no process group and no torchrun: say how to launch it
    os.environ.pop("WORLD_SIZE", None)
    with pytest.raises(DithooksError, match="launch it with torchrun --nproc-per-node 2"):
        ContextParallel.start("ulysses=2")
    assert not out.exists()


def test_cli_refuses_context_parallel_with_workers_and_without_torchrun(tmp_path, flux_dir):
    from typer.testing import CliRunner

    from dithooks.cli.main import app

    emb = tmp_path / "emb.pt"
    torch.save({"prompt_embeds": torch.randn(2, TEXT, 32), "pooled_prompt_embeds": torch.randn(2, 16)}, emb)
    base = ["capture", "--out", str(tmp_path / "c.zarr"), "--model", str(flux_dir), "--prompt-embeds", str(emb),
            "--seeds", "0-1", "--steps", "2", "--context-parallel", "ulysses=2"]
    for extra, msg in ((["--workers", "2"], "--context-parallel splits one model over the torchrun ranks"),
                       ([], "launch it with torchrun --nproc-per-node 2")):
        r = CliRunner().invoke(app, base + extra, env={"WORLD_SIZE": "1"})
        assert r.exit_code != 0 and msg in " ".join(r.output.split()), r.output
        assert "Traceback" not in r.output
    assert not (tmp_path / "c.zarr").exists()
