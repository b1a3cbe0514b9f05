import pytest
import torch

from dithooks.errors import DithooksError
from dithooks.hooks import HookManager
from dithooks.sampling import Sampler, SamplerSpec


@pytest.mark.parametrize("spec", [SamplerSpec("ddim", 6), SamplerSpec("ddim", 6, eta=1.0, guidance=3.0),
                                  SamplerSpec("ddpm", 6, guidance=1.5)])
def test_resume_from_any_state_is_exact(tiny_loaded, spec):
    s = Sampler(tiny_loaded, spec)
    states = []
    full = s.run([1, 2], [3, 4], on_step=lambda i, st: states.append(st))
    assert len(states) == 6 and states[-1].step == 6
    for k in (1, 3, 5):
        assert torch.equal(s.run([1, 2], [3, 4], state=states[k - 1]), full)


def test_each_sample_is_its_own_trajectory(tiny_loaded):
    s = Sampler(tiny_loaded, SamplerSpec("ddim", 5))
    both = s.run([1, 2], [3, 4])
    one = s.run([2], [4])
    # batch size changes GEMM blocking, so equality is up to float rounding, not bitwise
    torch.testing.assert_close(both[1:], one, rtol=1e-5, atol=1e-5)


def test_steps_and_cfg_branches_are_indexed(tiny_loaded):
    hm = HookManager(tiny_loaded.transformer, tiny_loaded.adapter)
    s = Sampler(tiny_loaded, SamplerSpec("ddim", 4, guidance=2.0), hm)
    seen = []
    with hm.hooks(read={"blocks.0.resid_pre": lambda v, c: seen.append((c.step, c.timestep, c.batch_axes, v.shape[0]))}):
        s.run([1, 2, 3], [0, 1, 2])
    assert [x[0] for x in seen] == [0, 1, 2, 3]
    assert [x[1] for x in seen] == s.timesteps
    assert seen[0][2] == (("cfg", 2), ("sample", 3)) and seen[0][3] == 6


def test_learned_sigma_is_split_off(tiny_loaded):
    """Out channels are 2C: the sampler must feed only epsilon to the scheduler."""
    s = Sampler(tiny_loaded, SamplerSpec("ddim", 3))
    x = s.run([0], [0])
    assert x.shape == (1, 4, 8, 8)


def test_bad_requests(tiny_loaded):
    with pytest.raises(DithooksError, match="classes 0-9"):
        Sampler(tiny_loaded, SamplerSpec("ddim", 2)).run([10], [0])
    with pytest.raises(DithooksError, match="unknown sampler"):
        SamplerSpec("euler", 2)
    with pytest.raises(DithooksError, match="labels"):
        Sampler(tiny_loaded, SamplerSpec("ddim", 2)).run([1, 2], [0])


def test_few_step_stochastic_ddim_stays_finite():
    """DDIM eta > 0 from pure noise on the cosine schedule: sqrt(1 - a_prev - sigma^2) must not
    round below zero (5 steps, eta 1 gave NaN latents with float32 alphas)."""
    import torch

    from dithooks.loading import load_model
    from dithooks.sampling import Sampler, SamplerSpec

    loaded = load_model()
    for steps in (3, 5):
        x = Sampler(loaded, SamplerSpec("ddim", steps, eta=1.0)).run([1, 2], [0, 1])
        assert torch.isfinite(x).all() and x.dtype == torch.float32
    # deterministic DDIM keeps diffusers' own scheduler (bit for bit with earlier runs)
    assert type(Sampler(loaded, SamplerSpec("ddim", 5)).scheduler).__name__ == "DDIMScheduler"


def test_conditioning_rows_are_replica_cfg_sample_ordered():
    from dithooks.conditioning import Conditioning

    c = Conditioning.from_labels([3, 5], null_label=10)
    assert c.rows(cfg=True, replicas=2)["labels"].tolist() == [3, 5, 10, 10, 3, 5, 10, 10]
    assert c.rows(cfg=False, replicas=1)["labels"].tolist() == [3, 5]
    emb = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    t = Conditioning(prompt_embeds=emb, pooled_prompt_embeds=torch.ones(2, 5), guidance=3.5,
                     negative_prompt_embeds=-emb[:1])
    rows = t.rows(cfg=True, replicas=2)
    pe = rows["prompt_embeds"].reshape(2, 2, 2, 3, 4)  # (replica, cfg, sample, L, D)
    for r in range(2):
        assert torch.equal(pe[r, 0], emb) and torch.equal(pe[r, 1], -emb[:1].expand(2, 3, 4))
    pooled = rows["pooled_prompt_embeds"].reshape(2, 2, 2, 5)
    assert torch.equal(pooled[:, 0], torch.ones(2, 2, 5)) and torch.equal(pooled[:, 1], torch.zeros(2, 2, 5))
    assert rows["guidance"].tolist() == [3.5] * 8
    with pytest.raises(DithooksError, match="rows for 2 samples"):
        Conditioning(prompt_embeds=emb, pooled_prompt_embeds=torch.ones(3, 5))
    with pytest.raises(DithooksError, match="labels or prompt embeddings"):
        Conditioning()


def test_labels_and_conditioning_sample_the_same(tiny_loaded):
    s = Sampler(tiny_loaded, SamplerSpec("ddim", 3, guidance=2.0))
    cond = tiny_loaded.adapter.make_conditioning([1, 2])
    assert torch.equal(s.run([1, 2], [3, 4]), s.run(cond, [3, 4]))
    with pytest.raises(DithooksError, match="does not fit a model that predicts epsilon"):
        Sampler(tiny_loaded, SamplerSpec("flow", 2))


def test_flow_sampler_is_guided_euler_on_the_velocity(tmp_path):
    """Flow matching by hand: x_{s+1} = x_s + (sigma_{s+1} - sigma_s) v_guided, with the velocity
    from plain model calls and v = v_u + w (v_c - v_u); the scheduler's sigmas (shift 3)."""
    from tests.conformance import family_sd3 as fam

    loaded = fam.make_tiny(tmp_path)
    cond = fam.conditioning(2)
    sampler = Sampler(loaded, SamplerSpec("flow", 3, guidance=2.5))
    got = sampler.run(cond, [7, 8])
    model = loaded.transformer
    shift, n = 3.0, 3

    def shifted(u):
        return shift * u / (1 + (shift - 1) * u)

    # diffusers: linspace(sigma_max, sigma_min) of the (shifted) training sigmas, then shifted again
    t = torch.linspace(1.0, shifted(1.0 / 1000), n, dtype=torch.float64)
    sig = shifted(t).tolist() + [0.0]
    x = torch.stack([torch.randn(loaded.adapter.geometry.latent_shape, generator=torch.Generator().manual_seed(s))
                     for s in (7, 8)])
    emb = torch.cat([cond.prompt_embeds, torch.zeros_like(cond.prompt_embeds)])
    pooled = torch.cat([cond.pooled_prompt_embeds, torch.zeros_like(cond.pooled_prompt_embeds)])
    with torch.no_grad():
        for i in range(n):
            v = model(torch.cat([x, x]), timestep=torch.full((4,), sig[i] * 1000), encoder_hidden_states=emb,
                      pooled_projections=pooled).sample
            vu, vc = v[2:], v[:2]
            x = x + (sig[i + 1] - sig[i]) * (vu + 2.5 * (vc - vu))
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)
    assert sampler.timesteps == pytest.approx([s * 1000 for s in sig[:-1]], rel=1e-5)


def test_prompt_embeddings_file_round_trip(tmp_path):
    from dithooks.conditioning import load_prompt_embeds

    emb, mask = torch.randn(3, 4, 8), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    torch.save({"prompt_embeds": emb, "prompt_attention_mask": mask, "negative_prompt_embeds": torch.zeros(1, 4, 8),
                "negative_prompt_attention_mask": torch.tensor([[1, 0, 0, 0]])}, tmp_path / "p.pt")
    c = load_prompt_embeds(tmp_path / "p.pt")
    assert len(c) == 3 and torch.equal(c.prompt_embeds, emb)
    rows = c.rows(cfg=True)
    assert torch.equal(rows["prompt_attention_mask"][:3], mask)
    assert rows["prompt_attention_mask"][3:].tolist() == [[1, 0, 0, 0]] * 3
    from safetensors.torch import save_file

    save_file({"prompt_embeds": emb}, str(tmp_path / "p.safetensors"))
    assert torch.equal(load_prompt_embeds(tmp_path / "p.safetensors").prompt_embeds, emb)
    with pytest.raises(DithooksError, match="no prompt-embeddings file"):
        load_prompt_embeds(tmp_path / "nope.pt")
    torch.save({"x": emb}, tmp_path / "bad.pt")
    with pytest.raises(DithooksError, match="no 'prompt_embeds'"):
        load_prompt_embeds(tmp_path / "bad.pt")
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        data = {"prompt_embeds": emb.clone(), "pooled_prompt_embeds": torch.randn(3, 8)}
        data[key].view(-1)[5] = float("nan")
        torch.save(data, tmp_path / "nan.pt")
        with pytest.raises(DithooksError, match=f"'{key}' has 1 NaN/inf"):
            load_prompt_embeds(tmp_path / "nan.pt")


def test_one_conditioning_row_serves_every_seed(tiny_loaded):
    from dithooks.conditioning import Conditioning

    s = Sampler(tiny_loaded, SamplerSpec("ddim", 2, guidance=2.0))
    one = Conditioning.from_labels([4], null_label=10)
    assert torch.equal(s.run(one, [0, 1]), s.run([4, 4], [0, 1]))
    with pytest.raises(DithooksError, match="conditioning for 2 samples with 3 seeds"):
        s.run(Conditioning.from_labels([4, 5], null_label=10), [0, 1, 2])
