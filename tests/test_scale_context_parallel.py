"""Context parallelism on 2 CPU ranks (gloo, torch.multiprocessing, forked): gathering token shards
before recording (dithooks.scale.context_parallel).

One start of 2 ranks runs both parts:
* a toy sequence split: uneven shards, a joint [text, image] sequence sharded per segment, and a
  toy attention whose queries are sharded (keys/values gathered): the gathered hook values equal
  the one-process computation;
* diffusers' own context parallelism (Ulysses, degree 2) on a tiny Flux: dithooks read hooks on
  the double-stream block's image and text residual streams see shards; gathered, they equal the
  hook values of a one-process forward. diffusers computes ``torch.device(kind, rank %
  torch.accelerator.device_count())``, which divides by zero on a machine without an accelerator,
  so the ranks set ``torch.accelerator.device_count = lambda: 1`` (that is the only change; ring
  attention needs a backend returning the log-sum-exp, which native SDPA on CPU does not).
"""

import json
import os
import socket

import pytest
import torch

pytest.importorskip("torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toy(rank: int, world: int) -> dict:
    from dithooks.scale.context_parallel import equipartition, gather_tokens, gathered

    g = torch.Generator().manual_seed(0)
    full = torch.randn(2, 7, 3, generator=g)
    off, n = equipartition(7, world)[rank]
    got, offs = gather_tokens(full[:, off:off + n], 1, return_offsets=True)
    assert torch.equal(got, full) and offs == [[(0, 4), (4, 3)]]
    even = torch.randn(2, 8, 3, generator=g)  # equal shards: lengths not exchanged
    got, offs = gather_tokens(even[:, 4 * rank:4 * rank + 4], 1, equal=True, return_offsets=True)
    assert torch.equal(got, even) and offs == [[(0, 4), (4, 4)]]
    # a joint sequence: text (3 tokens) and image (5 tokens) sharded separately, concatenated per rank
    text, image = torch.randn(2, 3, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    (to, tn), (io, in_) = equipartition(3, world)[rank], equipartition(5, world)[rank]
    local = torch.cat([text[:, to:to + tn], image[:, io:io + in_]], dim=1)
    assert torch.equal(gather_tokens(local, 1, segments=[tn, in_]), torch.cat([text, image], dim=1))
    assert not torch.equal(gather_tokens(local, 1), torch.cat([text, image], dim=1))  # plain concat is wrong
    # toy attention with sharded queries; a hook on its output, gathered
    x = torch.randn(1, 7, 4, generator=g)
    wq, wk, wv = (torch.randn(4, 4, generator=g) for _ in range(3))

    def attend(q_in, kv_in):
        a = torch.softmax((q_in @ wq) @ (kv_in @ wk).transpose(1, 2) / 2.0, dim=-1)
        return a @ (kv_in @ wv)

    seen = []
    hook = gathered(lambda v, ctx: seen.append(v), dim=1, ranks=None)
    xs = x[:, off:off + n]
    out = attend(xs, gather_tokens(xs, 1))
    hook(out, None)
    torch.testing.assert_close(seen[0], attend(x, x), rtol=1e-6, atol=1e-6)
    return {"toy": True, "local_tokens": n}


def _flux(rank: int, world: int) -> dict:
    torch.accelerator.device_count = lambda: 1  # see the module docstring
    from diffusers import ContextParallelConfig

    from dithooks.adapters.flux import FluxAdapter
    from dithooks.hooks import HookManager
    from dithooks.scale.context_parallel import gathered
    from tests.conformance.family_flux import make_transformer

    model = make_transformer(seed=0)
    g = torch.Generator().manual_seed(1)
    n_text = 6  # even: equal shards
    kwargs = dict(hidden_states=torch.randn(2, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, n_text, 32, generator=g),
                  pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([0.5, 0.7]),
                  img_ids=torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.), indexing="ij"),
                                      -1).reshape(16, 3),
                  txt_ids=torch.zeros(n_text, 3), return_dict=False)
    points = ("blocks.0.resid_post", "blocks.0.context.resid_post")
    hm = HookManager(model, FluxAdapter(model))
    ref = {}
    with torch.no_grad(), hm.hooks(read={p: (lambda v, ctx, p=p: ref.__setitem__(p, v.clone())) for p in points}):
        out_ref = model(**kwargs)[0]
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    local, whole = {}, {}
    reads = {}
    for p in points:
        reads[p] = [lambda v, ctx, p=p: local.__setitem__(p, tuple(v.shape)),
                    gathered(lambda v, ctx, p=p: whole.__setitem__(p, v.clone()), dim=1)]
    with torch.no_grad():
        handles = [h for p, fns in reads.items() for fn in fns for h in hm.add_hook(p, fn)]
        try:
            out = model(**kwargs)[0]
        finally:
            hm.remove_all()
    assert local["blocks.0.resid_post"] == (2, 16 // world, 32), local
    assert local["blocks.0.context.resid_post"] == (2, n_text // world, 32), local
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)  # diffusers' CP gives the same result
    if rank == 0:
        for p in points:
            assert whole[p].shape == ref[p].shape, (p, whole[p].shape, ref[p].shape)
            torch.testing.assert_close(whole[p], ref[p], rtol=1e-5, atol=1e-5)
    else:
        assert not whole  # recorded on rank 0 only
    return {"flux": True, "handles": len(handles)}


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {**_toy(rank, world), **_flux(rank, world)}
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_gathered_hooks_under_context_parallelism(tmp_path):
    import torch.multiprocessing as mp

    # fork: the ranks inherit the imports below instead of paying them again (spawn costs ~10 s a rank
    # on a busy machine); each rank sets one torch thread before any work
    import diffusers  # noqa: F401

    import dithooks.adapters.flux  # noqa: F401
    import dithooks.hooks  # noqa: F401
    import dithooks.scale.context_parallel  # noqa: F401
    import tests.conformance.family_flux  # noqa: F401

    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got["toy"] and got["flux"]
    assert json.loads((tmp_path / "rank0.json").read_text())["local_tokens"] == 4


def test_gather_without_a_process_group_is_the_identity():
    from dithooks.scale.context_parallel import equipartition, gather_tokens

    x = torch.randn(2, 5, 3)
    got, offs = gather_tokens(x, 1, return_offsets=True)
    assert torch.equal(got, x) and offs == [[(0, 5)]]
    assert equipartition(7, 2) == [(0, 4), (4, 3)] and equipartition(1, 2) == [(0, 1), (1, 0)]
