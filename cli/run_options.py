"""Options shared by every command that samples (capture, probe, routing), and what they build.

Each option is declared once here as an ``Annotated`` type; commands list the ones they take
(with their own defaults) and hand the values to :func:`sampling_request`, which turns them into
the keyword arguments of :class:`dithooks.capture.CaptureConfig`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from dithooks.errors import DithooksError

MODEL_HELP = ("Model: a local directory saved with save_pretrained, a hub id in the local HF cache, "
              "or empty for the embedded digits DiT.")

Out = Annotated[Path, typer.Option("--out", "-o", help="Store to write (a directory).")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP)]
Layers = Annotated[str, typer.Option("--layers", "-l", help="Blocks to hook: all, 0-27, 0,5,27, 20-.")]
Steps = Annotated[int, typer.Option("--steps", help="Sampling steps.")]
SamplerName = Annotated[str, typer.Option("--sampler", help="ddim or ddpm.")]
Eta = Annotated[float, typer.Option("--eta", help="DDIM eta (0 deterministic, 1 ~ DDPM).")]
Guidance = Annotated[float, typer.Option("--guidance", "-g", help="Classifier-free guidance scale; 1 = off (no null-class branch).")]
Classes = Annotated[str, typer.Option("--class", "--classes", "-c", help="Class label(s): one for all samples, or one per seed (0-9, 3,5).")]
Seeds = Annotated[str, typer.Option("--seeds", "-s", help="Seeds, one sample (or one replica pair) each: 0-7 or 0,4,9.")]
StorageDtype = Annotated[str, typer.Option("--dtype", help="Storage dtype of raw hooks: fp32, fp16, bf16 (probe outputs are float32).")]
ComputeDtype = Annotated[str, typer.Option("--compute-dtype", help="Model dtype: fp32, fp16, bf16.")]
Device = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1, mps.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in OUT.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing store at OUT.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

# replica pairs (THEORY §2)
Pairs = Annotated[bool, typer.Option("--pairs", help="Sample each seed as a replica pair (a, b); implied by --kappa/--coupling.")]
Kappa = Annotated[Optional[float], typer.Option("--kappa", help="Replica separation at the start, eq [67]: 0 identical, 0.7071 independent (default).")]
Coupling = Annotated[Optional[float], typer.Option("--coupling", help="Coupling strength g in [0, 1] of eq [19] (default 0: uncoupled pair).")]
CoupleUntil = Annotated[Optional[int], typer.Option("--couple-until", help="Couple for the steps before this one, then run independently (Protocol I's s*).")]
ShareNoiseUntil = Annotated[Optional[int], typer.Option("--share-noise-until", help="g = 0 control: replica b reuses a's sampler noise before this step.")]
CoupleLayers = Annotated[str, typer.Option("--couple-layers", help="Blocks whose attention is coupled: all, 0-13, ...")]

# attention processor options
Window = Annotated[Optional[int], typer.Option("--window", help="Intervention: restrict attention to a Chebyshev window of this radius in tokens (THEORY §7).")]
WindowLayers = Annotated[str, typer.Option("--window-layers", help="Blocks the window applies to: all, 0-13, ...")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="k for the attn.topk_idx / attn.topk_val reductions.")]
QueryTokens = Annotated[Optional[str], typer.Option("--query-tokens", help="Query rows for attn.pattern_query: 0,5,120 or 0-15.")]
QueryTile = Annotated[int, typer.Option("--query-tile", help="Query rows per tile on the explicit-softmax path (bounds memory).")]

# JVPs
JvpDirection = Annotated[str, typer.Option("--jvp-direction", help="Direction of blocks.{i}.jvp.*: auto (replica difference with pairs, else random), replica, random, or a .npy file of shape (tokens, channels).")]
JvpGates = Annotated[bool, typer.Option("--jvp-gates/--no-jvp-gates", help="Apply rho(g), xi(g) to the routing/modulation parts.")]


def parse_int_list(spec: str, what: str) -> list[int]:
    """``0-7``, ``0,3,5``, ``4`` -> list of ints."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
        except ValueError:
            raise DithooksError(f"malformed {what} {spec!r}: use e.g. 3, 0-7 or 0,2,5") from None
    if not out:
        raise DithooksError(f"empty {what} {spec!r}")
    return out


def _jvp_direction(text: str) -> Any:
    if text in ("auto", "replica", "random"):
        return text
    path = Path(text)
    if path.suffix != ".npy":
        raise DithooksError(f"--jvp-direction must be auto, replica, random or a .npy file, got {text!r}")
    if not path.is_file():
        raise DithooksError(f"no direction file {path}")
    import numpy as np
    import torch

    try:
        return torch.from_numpy(np.load(path, allow_pickle=False).astype("float32"))
    except (ValueError, OSError) as e:
        raise DithooksError(f"cannot read {path} as a numpy array: {e}") from None


def sampling_request(*, out: Path, model: str | None, layers: str, hooks: str, steps: int, sampler: str,
                     eta: float, guidance: float, classes: str, seeds: str, dtype: str = "fp16",
                     compute_dtype: str = "fp32", compression: str = "none", device: str = "cpu",
                     resume: bool = False, overwrite: bool = False, pairs: bool = False,
                     kappa: float | None = None, coupling: float | None = None, couple_until: int | None = None,
                     share_noise_until: int | None = None, couple_layers: str = "all",
                     window: int | None = None, window_layers: str = "all", top_k: int | None = None,
                     query_tokens: str | None = None, query_tile: int = 512, jvp_direction: str = "auto",
                     jvp_gates: bool = True, probes: tuple = ()) -> dict[str, Any]:
    """Keyword arguments of :class:`~dithooks.capture.CaptureConfig` from command-line values."""
    from dithooks.jvp_hooks import JVPSettings
    from dithooks.sampling import ReplicaSpec, SamplerSpec

    if resume and overwrite:
        raise DithooksError("--resume and --overwrite exclude each other")
    replicas = None
    if pairs or kappa is not None or coupling is not None or couple_until is not None or share_noise_until is not None:
        coupled = None  # every block; the capture checks a list against the model's blocks
        if couple_layers not in ("all", ""):
            coupled = tuple(parse_int_list(couple_layers, "coupled layers"))
        replicas = ReplicaSpec(kappa=2 ** -0.5 if kappa is None else kappa, g=coupling or 0.0,
                               couple_until=couple_until, share_noise_until=share_noise_until, layers=coupled)
    return dict(
        out=str(out), model=model, layers=layers, hooks=tuple(h.strip() for h in hooks.split(",") if h.strip()),
        sampler=SamplerSpec(sampler, steps, eta, guidance), labels=tuple(parse_int_list(classes, "classes")),
        seeds=tuple(parse_int_list(seeds, "seeds")), storage_dtype=dtype, compute_dtype=compute_dtype,
        compression=compression, device=device, mode="resume" if resume else "overwrite" if overwrite else "create",
        probes=probes, replicas=replicas, window=window, window_layers=None if window is None else window_layers,
        top_k=top_k, query_tokens=tuple(parse_int_list(query_tokens, "query tokens")) if query_tokens else None,
        query_tile=query_tile,
        jvp=JVPSettings(direction=_jvp_direction(jvp_direction), apply_gates=jvp_gates))
