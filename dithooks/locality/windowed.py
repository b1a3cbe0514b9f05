"""Windowed conditioning and windowed global attention (seed 004 §3.4–3.5, C.4; THEORY §7).

Samples are drawn from noise with DDIM (eta = 0) over an ``S``-step grid; time is
``t = timestep / T`` (1 = noise). A window ``[t0, t0 + w]`` (truncated at 1) selects the steps
whose ``t`` lies inside it; ``t0`` is scanned.

* ``inside = "conditioning"``: conditional ε (guidance ``w_cfg`` if not 1) inside the window,
  the null class outside; global attention throughout.
* ``inside = "global"``: global attention and conditioning inside the window; outside, the
  local model of radius r, unconditional (the paper's scan, Fig. 6b–c) or conditional
  (``outside_cond``).

Two references run with the same seeds and labels: ``always_on`` (the window covers every step:
conditional, global) and ``always_off`` (no step inside). Per window: the classifier error
(label differs from the requested class) with its binomial 1σ, and the Fréchet distance, in the
classifier's feature space, to ``always_on`` (bootstrap 1σ) and to the held-out real digits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import DithooksError
from ..sampling import initial_state, make_scheduler
from .forward_backward import binomial_sigma
from .frechet import bootstrap_frechet, frechet_features
from .local_denoiser import Denoiser
from .planned import GLOBAL, Plans, ddim_spec, num_train_timesteps, run_plans
from .store import ArrayDef, CellStore, run_cells

KIND = "locality-windowed"
INSIDE = ("conditioning", "global")


def window_starts(width: float, stride: float) -> list[float]:
    """``t0 = 0, stride, 2 stride, ...`` below 1 (windows near t = 1 are truncated)."""
    if not 0 < width <= 1 or not 0 < stride <= 1:
        raise DithooksError(f"window width and stride must lie in (0, 1], got {width} and {stride}")
    k = int(np.floor((1.0 - 1e-9) / stride)) + 1
    return [round(i * stride, 10) for i in range(k)]


def inside_mask(t: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """Steps whose ``t`` lies in ``[t0, t1]`` (a tolerance of 1e-9 for round-off of the grid)."""
    return (t >= t0 - 1e-9) & (t <= t1 + 1e-9)


def window_plans(labels: torch.Tensor, inside: np.ndarray, what: str, radius: int | None,
                 outside_cond: bool) -> Plans:
    """Plans for rows with ``labels`` given the per-step ``inside`` mask (S,)."""
    n, S = labels.shape[0], inside.shape[0]
    ins = torch.as_tensor(inside, dtype=torch.bool).unsqueeze(0).expand(n, S)
    start = torch.zeros((n,), dtype=torch.long)
    if what == "conditioning":
        return Plans(labels, start, ins.clone(), torch.full((n, S), GLOBAL, dtype=torch.long))
    if radius is None:
        raise DithooksError("windowed global attention needs --radius (the local model outside the window)")
    cond = ins | bool(outside_cond)
    rad = torch.where(ins, torch.full((n, S), GLOBAL, dtype=torch.long), torch.full((n, S), int(radius), dtype=torch.long))
    return Plans(labels, start, cond.clone(), rad)


@dataclass
class WindowedRequest:
    model: str
    inside: str = "conditioning"
    steps: int = 20
    width: float = 0.2
    stride: float = 0.1
    radius: int | None = None             # local radius outside the window (inside = global)
    outside_cond: bool = False
    guidance: float = 1.0
    labels: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()
    features: str = "classifier"

    def as_dict(self) -> dict:
        return {"model": self.model, "inside": self.inside, "steps": self.steps, "width": self.width,
                "stride": self.stride, "radius": self.radius, "outside_cond": self.outside_cond,
                "guidance": self.guidance, "labels": list(self.labels), "seeds": list(self.seeds),
                "features": self.features}


def run_windowed(denoiser: Denoiser, classifier, features_fn, req: WindowedRequest, out, mode: str = "create",
                 batch_rows: int = 256, progress=None) -> CellStore:
    loaded = denoiser.loaded
    if req.inside not in INSIDE:
        raise DithooksError(f"unknown --inside {req.inside!r}; choose one of {', '.join(INSIDE)}")
    n = len(req.seeds)
    if n < 2 or len(req.labels) != n:
        raise DithooksError(f"{len(req.labels)} labels for {n} seeds: give one label per sample, at least 2 samples")
    if denoiser.null_class is None:
        raise DithooksError("windowed conditioning needs a class-conditional model with a null class")
    if req.inside == "global" and req.radius is None:
        raise DithooksError("windowed global attention needs --radius (the local model outside the window)")
    S = req.steps
    sched = make_scheduler(ddim_spec(S), loaded.scheduler_config)
    ts = np.array([int(t) for t in sched.timesteps], dtype=np.int64)
    tf = ts.astype(np.float64) / num_train_timesteps(loaded)
    starts = window_starts(req.width, req.stride)
    names = [f"t0={t0:g}" for t0 in starts] + ["always_on", "always_off"]
    t0s = np.array(starts + [0.0, np.nan])
    t1s = np.array([min(1.0, t0 + req.width) for t0 in starts] + [1.0, np.nan])
    masks = [inside_mask(tf, a, b) for a, b in zip(starts, t1s[:len(starts)])]
    masks += [np.ones(S, dtype=bool), np.zeros(S, dtype=bool)]
    labels = torch.as_tensor(req.labels, dtype=torch.long)
    x_T = initial_state(loaded, req.seeds, float(sched.init_noise_sigma)).latents
    feat_dim = int(features_fn(x_T[:1].clamp(-1, 1)).shape[1])
    W = len(names)
    sizes = {"window": W, "step": S, "sample": n, "feature": feat_dim,
             "channel": x_T.shape[1], "height": x_T.shape[2], "width": x_T.shape[3]}
    coords = {"window": (("window",), np.arange(W, dtype=np.int64)),
              "window_name": (("window",), np.array(names)),
              "t0": (("window",), t0s), "t1": (("window",), t1s),
              "inside": (("window", "step"), np.stack(masks)),
              "steps_inside": (("window",), np.array([int(m.sum()) for m in masks], dtype=np.int64)),
              "step": (("step",), np.arange(S, dtype=np.int64)),
              "timestep": (("step",), ts), "t": (("step",), tf),
              "sample": (("sample",), np.arange(n, dtype=np.int64)),
              "seed": (("sample",), np.array(req.seeds, dtype=np.int64)),
              "label": (("sample",), np.array(req.labels, dtype=np.int64))}
    arrays = {"pred": ArrayDef(("window", "sample"), "int64"),
              "features": ArrayDef(("window", "sample", "feature")),
              "result": ArrayDef(("window", "sample", "channel", "height", "width"))}
    store = CellStore.open(out, kind=KIND, request={**req.as_dict(), "num_tokens": denoiser.num_tokens},
                           mode=mode, coords=coords, arrays=arrays, sizes=sizes, cell_dims=("window",))
    per_group = max(1, batch_rows // n)
    pending = store.pending()
    groups = [pending[i:i + per_group] for i in range(0, len(pending), per_group)]

    def work(cells):
        plans = Plans.cat([window_plans(labels, masks[w], req.inside, req.radius, req.outside_cond)
                           for (w,) in cells])
        x = run_plans(denoiser, S, x_T.repeat(len(cells), 1, 1, 1), plans, guidance=req.guidance)
        x = x.clamp(-1, 1)
        with torch.no_grad():
            pred = classifier(x).argmax(1)
        feats = features_fn(x)
        for i, (w,) in enumerate(cells):
            sl = slice(i * n, (i + 1) * n)
            store.write("result", (w,), x[sl].numpy())
            store.write("pred", (w,), pred[sl].numpy().astype(np.int64))
            store.write("features", (w,), feats[sl].astype(np.float32))
            store.mark((w,))

    run_cells(store, groups, work, progress)
    store.finish("complete" if store.complete else "running")
    return store


def windowed_metrics(store: CellStore, real_features: np.ndarray | None = None, n_boot: int = 200) -> dict:
    """Per window: error, its σ, FD to always_on (+ bootstrap σ), FD to real features."""
    done = store.done_mask()
    names = [str(s) for s in store.coord("window_name")]
    pred, label = store.read("pred"), store.coord("label")
    feats = store.read("features").astype(np.float64)
    n = pred.shape[1]
    err = (pred != label[None, :]).mean(1)
    on = names.index("always_on")
    fd, fd_sig, fd_real = (np.full(len(names), np.nan) for _ in range(3))
    for w in range(len(names)):
        if not done[w]:
            continue
        if done[on]:
            fd[w] = frechet_features(feats[w], feats[on])
            fd_sig[w] = bootstrap_frechet(feats[w], feats[on], n_boot, seed=w) if w != on else 0.0
        if real_features is not None:
            fd_real[w] = frechet_features(feats[w], real_features)
    return {"names": names, "error": np.where(done, err, np.nan),
            "sigma": np.where(done, binomial_sigma(err, n), np.nan), "fd": fd, "fd_sigma": fd_sig,
            "fd_real": fd_real}
