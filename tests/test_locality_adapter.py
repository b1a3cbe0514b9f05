"""The local denoiser goes through the adapter protocol: per-row timesteps, the batch limit and
which families it accepts (by what the adapter says, not its class name)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dithooks.adapters.dit import DiTAdapter
from dithooks.errors import DithooksError
from dithooks.locality import local_denoiser
from dithooks.locality.local_denoiser import Denoiser, TokenLayout, token_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def xs(n, seed=0, shape=(4, 8, 8)):
    return torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))


def direct_eps(loaded, x, t_rows, labels):
    """ε from one plain call of the transformer, timestep per row (no dithooks code)."""
    C = loaded.adapter.geometry.in_channels
    with torch.no_grad():
        return loaded.transformer(x, timestep=torch.as_tensor(t_rows, dtype=torch.long),
                                  class_labels=torch.as_tensor(labels)).sample[:, :C].float()


def test_per_row_timesteps_and_batches_equal_a_direct_call(tiny_loaded):
    x, y, t = xs(5, seed=3), [1, 4, 4, 0, 9], [700, 200, 700, 950, 200]
    for batch in (256, 2):  # every row in one call per timestep, or at most 2 rows per call
        got = Denoiser(tiny_loaded, batch=batch).eps(x, torch.tensor(t), y, None)
        torch.testing.assert_close(got, direct_eps(tiny_loaded, x, t, y), atol=2e-6, rtol=0)
    # one timestep for the whole batch: the same model call as before the adapter protocol, bit for bit
    one = Denoiser(tiny_loaded).eps(x, 500, y, None)
    assert torch.equal(one, direct_eps(tiny_loaded, x, [500] * 5, y))
    assert Denoiser(tiny_loaded).eps(x[:0], 500, [], None).shape == (0, 4, 8, 8)


def test_families_are_chosen_by_what_the_adapter_says(tiny_loaded, monkeypatch):
    assert token_layout(tiny_loaded) == TokenLayout(16, 4, slice(0, 16))
    text_family = type("TextDiT", (DiTAdapter,), {"conditioning": "text", "family": "textdit"})
    other = dataclasses.replace(tiny_loaded, adapter=text_family(tiny_loaded.transformer))
    with pytest.raises(DithooksError, match=r"\(textdit\) is not one \(text conditioning is not supported"):
        token_layout(other)
    # same class-conditional DiT under another class name: accepted (not keyed on "DiTAdapter")
    renamed = type("MyDiT", (DiTAdapter,), {"family": "mydit"})
    assert token_layout(dataclasses.replace(tiny_loaded, adapter=renamed(tiny_loaded.transformer))).grid_side == 4
    # a family may register its own layout
    own = TokenLayout(16, 4, slice(0, 8))
    monkeypatch.setitem(local_denoiser.TOKEN_LAYOUTS, "textdit", lambda loaded: own)
    assert token_layout(other) is own
