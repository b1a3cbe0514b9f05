"""The local denoiser of radius r (THEORY §7; seed 004 §3.1, Appendix C.1).

Every attention layer of a pretrained model is restricted to a Chebyshev window on the token
grid, ``max(|Δrow|, |Δcol|) <= r``, with the softmax taken inside the window and the model's own
weights; nothing else changes (adaLN conditioning, MLPs and the patch embedding are per token
already). The window is the existing attention intervention
(:meth:`dithooks.attention_hooks.AttentionHooks.set_window`); this module only switches it on
for every block, for the duration of a call, and says which models it applies to.

``r >= side - 1`` covers the grid: the processor builds no mask and the result is the global
model bit for bit (tested). ``radius=None`` means global without installing anything.

The model is called through its adapter (:meth:`~dithooks.adapters.base.ModelAdapter.denoise`
with the rows of a :class:`~dithooks.conditioning.Conditioning`), so any class-conditional family
whose attention runs over its image tokens only works: the layout (:func:`token_layout`) comes
from the adapter's geometry (every token an image token on the ``side x side`` grid), not from
its class. A family may register its own layout in :data:`TOKEN_LAYOUTS` (by ``adapter.family``).
Text-conditioned families (PixArt, SD3, Flux) are refused: the measurements here use class
labels and the null class; MMDiT joint attention (SD3, Flux), where text tokens share the
attention call and must stay global while only image->image attention is windowed, is **not
supported yet** (such a family would register a layout naming its image-token range).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from ..errors import DithooksError
from ..hooks import HookManager
from ..loading import LoadedModel


@dataclass(frozen=True)
class TokenLayout:
    """Where the image tokens are: ``num_tokens`` tokens, of which ``image_tokens`` (a slice of
    the attention sequence) lie row-major on a ``grid_side x grid_side`` grid."""

    num_tokens: int
    grid_side: int
    image_tokens: slice

    @property
    def max_radius(self) -> int:
        """The smallest radius that covers the grid (``side - 1``): the global model."""
        return self.grid_side - 1


def image_only_layout(loaded: LoadedModel) -> TokenLayout | None:
    """The layout of a class-conditional family whose attention sees image tokens only (every
    token on the ``side x side`` grid, e.g. DiT); None for any other family."""
    adapter = loaded.adapter
    if getattr(adapter, "conditioning", "class") != "class":
        return None
    try:
        geo = adapter.geometry
        side, n = geo.grid_side, geo.num_tokens
    except (NotImplementedError, DithooksError):  # no latent-diffusion geometry (generic models)
        return None
    if geo.text_tokens or side * side != n:
        return None
    return TokenLayout(n, side, slice(0, n))


#: ``adapter.family`` -> its image-token grid, for families the default rule
#: (:func:`image_only_layout`) does not cover. Empty: no such family yet.
TOKEN_LAYOUTS: dict[str, Callable[[LoadedModel], TokenLayout]] = {}


def token_layout(loaded: LoadedModel) -> TokenLayout:
    """The image-token grid of ``loaded``; a one-line error for families without a layout."""
    adapter = loaded.adapter
    family = getattr(adapter, "family", type(adapter).__name__)
    make = TOKEN_LAYOUTS.get(family, image_only_layout)
    layout = make(loaded)
    if layout is None:
        raise DithooksError(
            f"local denoisers need a class-conditional model family whose attention runs over image tokens on "
            f"a grid; {type(loaded.transformer).__name__} ({family}) is not one (text conditioning is not "
            f"supported yet; MMDiT joint attention is not supported yet)")
    return layout


def check_radius(radius: int | None, layout: TokenLayout) -> int | None:
    """A radius as an int (or None = global); a one-line error for anything else."""
    if radius is None:
        return None
    if isinstance(radius, bool) or int(radius) != radius or radius < 0:
        raise DithooksError(f"window radius must be a non-negative integer, got {radius!r}")
    return int(radius)


def parse_radii(spec: str | Sequence[int] | None, layout: TokenLayout) -> list[int]:
    """``"all"``/None -> 0..side-1 (the last one is the global model, a live exactness check);
    ``"0-2"``, ``"0,1,3"`` or a list otherwise."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return list(range(layout.max_radius + 1))
    if isinstance(spec, str):
        out = parse_ints(spec, "radii")
    else:
        out = [check_radius(r, layout) for r in spec]
    if not out:
        raise DithooksError(f"empty radii {spec!r}")
    return sorted({check_radius(r, layout) for r in out})


def parse_ints(spec: str, what: str) -> list[int]:
    """``"3"``, ``"0-7"``, ``"0,2,5"`` -> ints (non-negative); a one-line error otherwise.

    The syntax is :func:`dithooks.lists.parse_int_list`'s; this only adds the sign check."""
    from ..lists import parse_int_list

    out = parse_int_list(spec, what)
    if min(out) < 0:
        raise DithooksError(f"{what} {spec!r}: give non-negative integers, e.g. 3, 0-7 or 0,2,5")
    return out


@contextlib.contextmanager
def local_attention(hooks: HookManager, radius: int | None) -> Iterator[None]:
    """Every attention layer windowed to ``radius`` (None: global) inside the ``with`` block;
    the manager's previous window setting is put back afterwards, even on error."""
    att = hooks.extension("attention")
    if att is None:
        raise DithooksError(f"{type(hooks.model).__name__} exposes no attention processors: "
                            "no local denoiser can be built from it")
    old = (att.window, None if att.window_layers is None else sorted(att.window_layers))
    att.set_window(radius, None)
    try:
        yield
    finally:
        att.set_window(*old)


class Denoiser:
    """ε(x_t, t, y) of a loaded model, global or local of radius r, in float32.

    ``eps(x, t, labels, radius)`` runs the model on ``x`` (B, C, H, W) at integer timestep ``t``
    (one for the batch, or one per row) with class labels (the model's null class for ε(·, ∅))
    and returns the epsilon channels (learned-variance channels dropped) on the CPU, in batches of
    at most ``batch`` rows. ``radius=None`` is the global model. The model is called through
    ``adapter.denoise`` with the rows of the adapter's :class:`~dithooks.conditioning.Conditioning`.
    """

    def __init__(self, loaded: LoadedModel, hooks: HookManager | None = None, device: str | torch.device = "cpu",
                 batch: int = 256):
        self.loaded = loaded
        self.layout = token_layout(loaded)
        self.hooks = hooks if hooks is not None else HookManager(loaded.transformer, loaded.adapter)
        self.device = torch.device(device)
        self.batch = max(1, int(batch))
        self.adapter = loaded.adapter
        geo = self.adapter.geometry
        self.channels = geo.latent_channels
        self.null_class = geo.null_class

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: int | torch.Tensor, labels: torch.Tensor | Sequence[int],
            radius: int | None = None) -> torch.Tensor:
        radius = check_radius(radius, self.layout)
        x = x.to(self.device)
        labels = torch.as_tensor(labels, device=self.device, dtype=torch.long).reshape(-1)
        tt = torch.as_tensor(t, device=self.device, dtype=torch.long).reshape(-1)
        if tt.numel() == 1:
            tt = tt.expand(x.shape[0])
        if labels.numel() != x.shape[0] or tt.numel() != x.shape[0]:
            raise DithooksError(f"{x.shape[0]} inputs with {labels.numel()} labels and {tt.numel()} timesteps")
        cond = self.adapter.make_conditioning(labels.tolist())
        rows = {k: v.to(self.device) for k, v in cond.rows(False).items()}
        out = torch.zeros((x.shape[0], self.channels) + tuple(x.shape[2:]))
        with local_attention(self.hooks, radius):
            # adapter.denoise takes one timestep per call: rows with the same t go together
            for t_val in torch.unique(tt).tolist():
                idx = (tt == t_val).nonzero().flatten()
                for i in range(0, idx.numel(), self.batch):
                    sel = idx[i:i + self.batch]
                    out[sel.cpu()] = self.adapter.denoise(x[sel], int(t_val), {k: v[sel] for k, v in rows.items()}).cpu()
        return out

    def null_labels(self, n: int) -> torch.Tensor:
        if self.null_class is None:
            raise DithooksError("the unconditional score needs a class-conditional model with a null class")
        return torch.full((n,), int(self.null_class), dtype=torch.long)


def gap_norm(a: torch.Tensor, b: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per-sample ``‖a - b‖₂ / N``: the L2 norm over all latent elements (channels x height x
    width) of one sample, divided by the number of image tokens N (THEORY §7, seed 004 C.2)."""
    d = (a.float() - b.float()).flatten(1)
    return torch.linalg.vector_norm(d, dim=1) / float(num_tokens)
