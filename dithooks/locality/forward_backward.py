"""Forward–backward error correction (seed 004 §3.3, C.3; THEORY §7).

Clean samples ``x_0`` (held-out digits, labels ``y``) are noised forward to a level ``t`` with
the training schedule (``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) z``, one ``z`` per sample shared by
all levels and modes), then denoised back to ``t = 0`` **unconditionally** (the null class) with
DDIM (eta = 0) over the remaining steps of an ``S``-step grid, by the global model or the local
model of radius r. The levels are steps of that grid, so level ``t_s`` is followed by ``S − s``
denoising steps.

Per (mode, level): the classifier's label of each result (``error`` = it differs from ``y``),
the error rate ``p`` with its 1σ binomial error ``sqrt(p (1 − p) / n)``, and the per-pixel MSE
``mean((x̂_0 − x_0)²)`` in the model's [-1, 1] range, the result clamped to [-1, 1] first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import DithooksError
from .local_denoiser import Denoiser
from .planned import GLOBAL, Plans, noise_to, num_train_timesteps, run_plans, timesteps
from .store import ArrayDef, CellStore, run_cells

KIND = "locality-forward-backward"


def mode_name(radius: int) -> str:
    return "global" if radius == GLOBAL else f"r{radius}"


def binomial_sigma(p, n) -> np.ndarray:
    """1σ error of a rate p measured on n Bernoulli trials: ``sqrt(p (1 − p) / n)``."""
    p = np.asarray(p, dtype=np.float64)
    return np.sqrt(p * (1.0 - p) / np.maximum(np.asarray(n, dtype=np.float64), 1.0))


def level_steps(steps: int, levels: int | Sequence[int]) -> list[int]:
    """Step indices of the noise levels: an int picks that many, evenly spaced over the grid and
    always including its noisiest step (0); a sequence is taken as given."""
    if isinstance(levels, int):
        if not 1 <= levels <= steps:
            raise DithooksError(f"--levels must lie in 1..{steps} (the grid's steps), got {levels}")
        return sorted({int(round(i * steps / levels)) for i in range(levels)})
    out = sorted({int(s) for s in levels})
    if not out or out[0] < 0 or out[-1] >= steps:
        raise DithooksError(f"level steps must lie in 0..{steps - 1}")
    return out


@dataclass
class ForwardBackwardRequest:
    model: str
    steps: int = 20
    levels: tuple[int, ...] = ()          # step indices of the grid
    radii: tuple[int, ...] = ()           # GLOBAL (-1) for the global model
    seeds: tuple[int, ...] = ()           # one per clean sample (its forward noise)
    data: str = ""

    def as_dict(self) -> dict:
        return {"model": self.model, "steps": self.steps, "levels": list(self.levels), "radii": list(self.radii),
                "seeds": list(self.seeds), "data": self.data}


def noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s) + 1_000_003))
                        for s in seeds])


def run_forward_backward(denoiser: Denoiser, classifier, req: ForwardBackwardRequest, x0: torch.Tensor,
                         y: torch.Tensor, out, mode: str = "create", batch_rows: int = 256,
                         progress=None) -> CellStore:
    """Measure the (mode, level) grid into a store at ``out``; ``classifier(x)`` gives logits."""
    loaded = denoiser.loaded
    n = x0.shape[0]
    if n == 0 or len(req.seeds) != n or y.shape[0] != n:
        raise DithooksError(f"{n} clean samples, {y.shape[0]} labels and {len(req.seeds)} seeds: give one each")
    if denoiser.null_class is None:
        raise DithooksError("unconditional denoising needs a class-conditional model with a null class")
    S = req.steps
    ts = np.array(timesteps(loaded, S), dtype=np.int64)[list(req.levels)]
    z = noise(req.seeds, tuple(x0.shape[1:]))
    with torch.no_grad():
        clean_pred = classifier(x0.float()).argmax(1)
    sizes = {"mode": len(req.radii), "level": len(req.levels), "sample": n,
             "channel": x0.shape[1], "height": x0.shape[2], "width": x0.shape[3]}
    coords = {"mode": (("mode",), np.array([mode_name(r) for r in req.radii])),
              "radius": (("mode",), np.array(req.radii, dtype=np.int64)),
              "level": (("level",), np.arange(len(req.levels), dtype=np.int64)),
              "step": (("level",), np.array(req.levels, dtype=np.int64)),
              "timestep": (("level",), ts),
              "t": (("level",), ts.astype(np.float64) / num_train_timesteps(loaded)),
              "denoise_steps": (("level",), np.array([S - s for s in req.levels], dtype=np.int64)),
              "sample": (("sample",), np.arange(n, dtype=np.int64)),
              "seed": (("sample",), np.array(req.seeds, dtype=np.int64)),
              "label": (("sample",), y.numpy().astype(np.int64)),
              "clean_pred": (("sample",), clean_pred.numpy().astype(np.int64))}
    arrays = {"pred": ArrayDef(("mode", "level", "sample"), "int64"),
              "mse": ArrayDef(("mode", "level", "sample")),
              "result": ArrayDef(("mode", "level", "sample", "channel", "height", "width"))}
    store = CellStore.open(out, kind=KIND, request={**req.as_dict(), "num_tokens": denoiser.num_tokens},
                           mode=mode, coords=coords, arrays=arrays, sizes=sizes, cell_dims=("mode", "level"))
    per_group = max(1, batch_rows // n)
    pending = store.pending()
    groups = [pending[i:i + per_group] for i in range(0, len(pending), per_group)]

    def work(cells):
        xs, plans = [], []
        for m, l in cells:
            s = req.levels[l]
            xs.append(noise_to(denoiser, S, x0, z, s))
            p = Plans(torch.full((n,), int(denoiser.null_class), dtype=torch.long),
                      torch.full((n,), s, dtype=torch.long), torch.zeros((n, S), dtype=torch.bool),
                      torch.full((n, S), int(req.radii[m]), dtype=torch.long))
            plans.append(p)
        res = run_plans(denoiser, S, torch.cat(xs), Plans.cat(plans))
        res = res.clamp(-1, 1)
        with torch.no_grad():
            pred = classifier(res).argmax(1)
        mse = ((res - x0.float().repeat(len(cells), 1, 1, 1)) ** 2).flatten(1).mean(1)
        for i, (m, l) in enumerate(cells):
            sl = slice(i * n, (i + 1) * n)
            store.write("result", (m, l), res[sl].numpy())
            store.write("pred", (m, l), pred[sl].numpy().astype(np.int64))
            store.write("mse", (m, l), mse[sl].numpy())
            store.mark((m, l))

    run_cells(store, groups, work, progress)
    store.finish("complete" if store.complete else "running")
    return store


def fb_metrics(store: CellStore) -> dict[str, np.ndarray]:
    """Error rate, its binomial σ and mean MSE per (mode, level); NaN where a cell is missing."""
    done = store.done_mask()
    pred, label = store.read("pred"), store.coord("label")
    err = (pred != label[None, None, :]).mean(-1).astype(np.float64)
    n = pred.shape[-1]
    mse = store.read("mse").astype(np.float64)
    out = {"error": np.where(done, err, np.nan), "sigma": np.where(done, binomial_sigma(err, n), np.nan),
           "mse": np.where(done, mse.mean(-1), np.nan),
           "mse_sem": np.where(done, mse.std(-1, ddof=1) / np.sqrt(n) if n > 1 else 0.0, np.nan)}
    return out
