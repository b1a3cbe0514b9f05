"""Replica pairs in the sampler: layout, coupling schedules, and the g = 0 / shared-noise controls."""

import pytest
import torch

from dithooks.errors import DithooksError
from dithooks.hooks import HookManager
from dithooks.sampling import ReplicaSpec, Sampler, SamplerSpec, TrajectoryState, initial_replica_state


def test_uncoupled_pairs_equal_plain_runs_from_the_same_start(tiny_loaded):
    spec = SamplerSpec("ddim", 5)
    rep = ReplicaSpec(kappa=0.5, g=0.0)
    start = initial_replica_state(tiny_loaded, [3, 4], rep)
    x = Sampler(tiny_loaded, spec, replicas=rep).run([1, 2], [3, 4])
    plain = Sampler(tiny_loaded, spec).run([1, 2, 1, 2], [0, 0, 0, 0],
                                           state=TrajectoryState(0, start.latents, start.rng_states))
    # the same rows in the same batch order: only GEMM blocking could differ, and it does not
    torch.testing.assert_close(x, plain, rtol=1e-6, atol=1e-6)


def test_kappa_zero_gives_identical_replicas(tiny_loaded):
    x = Sampler(tiny_loaded, SamplerSpec("ddim", 4, guidance=2.0), replicas=ReplicaSpec(kappa=0.0, g=0.5)).run([1], [0])
    assert torch.equal(x[0], x[1])


def test_coupling_schedule_and_batch_layout(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    rep = ReplicaSpec(kappa=0.7, g=0.4, couple_until=2, layers=(1, 2))
    seen = []

    def look(v, ctx):
        procs = [type(b.attn1.processor).__name__ for b in tiny_loaded.transformer.transformer_blocks]
        g = [getattr(b.attn1.processor, "g", None) for b in tiny_loaded.transformer.transformer_blocks]
        seen.append((ctx.step, ctx.batch_axes, v.shape[0], procs, g))

    with hm.hooks(read={"blocks.0.resid_pre": look}):
        Sampler(tiny_loaded, SamplerSpec("ddim", 4, guidance=2.0), hm, replicas=rep).run([1, 2, 3], [0, 1, 2])
    assert seen[0][1] == (("replica", 2), ("cfg", 2), ("sample", 3)) and seen[0][2] == 12
    assert seen[0][4] == [None, 0.4, 0.4, None] and seen[1][4] == [None, 0.4, 0.4, None]
    assert seen[2][3] == ["AttnProcessor2_0"] * 4  # after s* the blocks run their own processors
    assert all(type(b.attn1.processor).__name__ == "AttnProcessor2_0" for b in tiny_loaded.transformer.transformer_blocks)


def test_coupling_pulls_replicas_together(tiny_loaded):
    spec = SamplerSpec("ddim", 6)
    d = {}
    for g in (0.0, 1.0):
        x = Sampler(tiny_loaded, spec, replicas=ReplicaSpec(kappa=0.7, g=g)).run([1, 2, 3, 4], [0, 1, 2, 3])
        d[g] = (x[:4] - x[4:]).norm().item()
    assert d[1.0] < d[0.0]


def test_shared_noise_control(tiny_loaded):
    """κ = 0 and DDPM: shared noise keeps the pair identical until s*, then they part."""
    spec = SamplerSpec("ddpm", 6)
    states = []
    Sampler(tiny_loaded, spec, replicas=ReplicaSpec(kappa=0.0, share_noise_until=3)).run(
        [1], [0], on_step=lambda s, st: states.append(st.latents))
    assert all(torch.equal(st[0], st[1]) for st in states[:3])
    assert not torch.equal(states[3][0], states[3][1])
    independent = []
    Sampler(tiny_loaded, spec, replicas=ReplicaSpec(kappa=0.0)).run(
        [1], [0], on_step=lambda s, st: independent.append(st.latents))
    assert not torch.equal(independent[0][0], independent[0][1])


def test_replica_resume_is_exact(tiny_loaded):
    s = Sampler(tiny_loaded, SamplerSpec("ddim", 5, eta=1.0), replicas=ReplicaSpec(kappa=0.6, g=0.3, couple_until=3))
    states = []
    full = s.run([1, 2], [0, 1], on_step=lambda i, st: states.append(st))
    assert torch.equal(s.run([1, 2], [0, 1], state=states[1]), full)


def test_bad_replica_specs():
    with pytest.raises(DithooksError, match="kappa"):
        ReplicaSpec(kappa=1.5)
    with pytest.raises(DithooksError):
        ReplicaSpec(g=-0.1)


def test_replica_b_noise_stream_differs_from_a():
    """torch keeps only the low 32 bits of a CPU seed: b's generator must not replay a's stream."""
    import torch

    from dithooks.sampling import replica_seed

    for seed in (0, 3, 12345, 2**31 + 7):
        a = torch.randn(8, generator=torch.Generator().manual_seed(seed))
        b = torch.randn(8, generator=torch.Generator().manual_seed(replica_seed(seed)))
        assert not torch.equal(a, b)
        assert replica_seed(seed) == replica_seed(seed)  # deterministic
    assert len({replica_seed(s) for s in range(1000)} & set(range(1000))) == 0
