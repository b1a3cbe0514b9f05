"""What a batch of samples is conditioned on, and how it becomes model-batch rows.

One :class:`Conditioning` holds M samples' conditioning: class labels (class-conditional DiT)
or prompt embeddings (PixArt, SD3, Flux: ``prompt_embeds`` (M, L, D), SD3/Flux also
``pooled_prompt_embeds`` (M, D2)), the null branch for classifier-free guidance (the null class
label, or ``negative_*`` embeddings; zeros when absent) and Flux-dev's embedded ``guidance``.

:meth:`Conditioning.rows` lays them out as the sampler's model batch, in (replica, cfg, sample)
order: replica a's conditional rows, a's null rows, then replica b's (the coupled attention
processor pairs row i with row i + B/2). The adapter's ``model_kwargs(rows)`` turns the rows into
the model's keyword arguments.

Text families read precomputed embeddings with :func:`load_prompt_embeds` (a ``.pt`` or
``.safetensors`` file holding ``prompt_embeds`` [and ``pooled_prompt_embeds``,
``negative_prompt_embeds``, ``negative_pooled_prompt_embeds``, ``prompt_attention_mask``,
``negative_prompt_attention_mask``]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .errors import DithooksError

TENSOR_FIELDS = ("labels", "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                 "negative_pooled_prompt_embeds")
#: per-sample extras read from a prompt-embeddings file (with their ``negative_`` twins)
MASK_FIELDS = ("prompt_attention_mask",)


@dataclass
class Conditioning:
    """Conditioning of M samples (see the module docstring). ``extras``: further per-sample
    tensors (leading axis M) a family needs, e.g. a text attention mask; their null rows are
    ``negative_extras[k]`` when given, else the conditional rows repeated."""

    labels: torch.Tensor | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    null_label: int | None = None
    guidance: float | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    negative_extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if self.labels is not None:
            self.labels = torch.as_tensor(self.labels, dtype=torch.long).reshape(-1)
        if self.labels is None and self.prompt_embeds is None:
            raise DithooksError("conditioning needs class labels or prompt embeddings")
        if self.prompt_embeds is not None:
            self.prompt_embeds = torch.as_tensor(self.prompt_embeds)
            if self.prompt_embeds.ndim == 2:  # one prompt (L, D)
                self.prompt_embeds = self.prompt_embeds[None]
            if self.prompt_embeds.ndim != 3:
                raise DithooksError(f"prompt embeddings must be (samples, tokens, channels), got shape "
                                    f"{tuple(self.prompt_embeds.shape)}")
        if self.pooled_prompt_embeds is not None:
            self.pooled_prompt_embeds = torch.as_tensor(self.pooled_prompt_embeds)
            if self.pooled_prompt_embeds.ndim == 1:
                self.pooled_prompt_embeds = self.pooled_prompt_embeds[None]
        m = len(self)
        for name in TENSOR_FIELDS[1:]:
            t = getattr(self, name)
            if t is None:
                continue
            t = torch.as_tensor(t)
            if name.startswith("negative") and t.shape[0] == 1 and m > 1:  # one negative for all
                t = t.expand(m, *t.shape[1:])
            if t.shape[0] != m:
                raise DithooksError(f"{name} has {t.shape[0]} rows for {m} samples")
            setattr(self, name, t)
        for k, t in list(self.negative_extras.items()):
            t = torch.as_tensor(t)
            self.negative_extras[k] = t.expand(m, *t.shape[1:]) if t.shape[0] == 1 and m > 1 else t
        for k, t in {**self.extras, **self.negative_extras}.items():
            if torch.as_tensor(t).shape[0] != m:
                raise DithooksError(f"conditioning extra {k!r} has {torch.as_tensor(t).shape[0]} rows for {m} samples")
        if self.guidance is not None and not math.isfinite(float(self.guidance)):
            raise DithooksError(f"embedded guidance must be a finite number, got {self.guidance}")

    def __len__(self) -> int:
        return int(self.labels.shape[0] if self.labels is not None else self.prompt_embeds.shape[0])

    @classmethod
    def from_labels(cls, labels, null_label: int | None = None) -> "Conditioning":
        return cls(labels=torch.as_tensor([int(v) for v in labels], dtype=torch.long), null_label=null_label)

    def select(self, index) -> "Conditioning":
        """The samples at ``index`` (a slice or index list), same settings."""
        def pick(t):
            return None if t is None else t[index]
        return Conditioning(**{f.name: pick(getattr(self, f.name)) for f in fields(self) if f.name in TENSOR_FIELDS},
                            null_label=self.null_label, guidance=self.guidance,
                            extras={k: v[index] for k, v in self.extras.items()},
                            negative_extras={k: v[index] for k, v in self.negative_extras.items()})

    def _null(self, name: str) -> torch.Tensor | None:
        cond = getattr(self, name)
        if cond is None:
            return None
        if name == "labels":
            if self.null_label is None:
                raise DithooksError("guidance needs a class-conditional model (num_embeds_ada_norm unset)")
            return torch.full_like(cond, int(self.null_label))
        neg = getattr(self, "negative_" + name)
        return torch.zeros_like(cond) if neg is None else neg.to(cond.dtype)

    def rows(self, cfg: bool, replicas: int = 1, device: torch.device | str | None = None) -> dict[str, Any]:
        """Model-batch rows in (replica, cfg, sample) order: ``{"labels": (R*ncfg*M,), ...}``.

        Only the fields that are set appear (``labels``, ``prompt_embeds``, ``pooled_prompt_embeds``,
        each extra); ``guidance`` (a float tensor, one per row) when embedded guidance is set."""
        out: dict[str, Any] = {}
        m = len(self)
        names = [n for n in ("labels", "prompt_embeds", "pooled_prompt_embeds") if getattr(self, n) is not None]
        for name in names:
            branches = [getattr(self, name)] + ([self._null(name)] if cfg else [])
            out[name] = _layout(branches, replicas, device)
        for k, v in self.extras.items():
            branches = [v] + ([self.negative_extras.get(k, v)] if cfg else [])
            out[k] = _layout(branches, replicas, device)
        if self.guidance is not None:
            out["guidance"] = torch.full((replicas * (2 if cfg else 1) * m,), float(self.guidance),
                                         dtype=torch.float32, device=device)
        return out


def _layout(branches: list[torch.Tensor], replicas: int, device) -> torch.Tensor:
    """Stack (cfg, M, ...) and repeat over replicas: (R * ncfg * M, ...)."""
    y = torch.stack([torch.as_tensor(b) for b in branches])
    if device is not None:
        y = y.to(device)
    y = y.unsqueeze(0).expand(replicas, *y.shape)
    return y.reshape(-1, *y.shape[3:])


def load_prompt_embeds(path: str | Path) -> Conditioning:
    """A :class:`Conditioning` from a ``.pt`` or ``.safetensors`` file of prompt embeddings."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DithooksError(f"no prompt-embeddings file at {str(path)!r}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            data = load_file(str(path))
        else:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise DithooksError(f"cannot read prompt embeddings from {path}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}") from None
    if isinstance(data, torch.Tensor):
        data = {"prompt_embeds": data}
    if not isinstance(data, dict) or "prompt_embeds" not in data:
        raise DithooksError(f"{path} holds no 'prompt_embeds' tensor")
    known = {k: data[k] for k in TENSOR_FIELDS[1:] if k in data}
    for key, value in known.items():
        # a NaN embedding would sample NaN latents and store them with only a warning: refuse it here
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise DithooksError(f"{path}: '{key}' has {bad} NaN/inf values; prompt embeddings must be finite")
    guidance = data.get("guidance")
    # text attention masks (PixArt's pipeline makes both) become extras under the model's key
    extras = {k: data[k] for k in MASK_FIELDS if k in data}
    negative = {k: data["negative_" + k] for k in MASK_FIELDS if "negative_" + k in data}
    return Conditioning(**known, guidance=None if guidance is None else float(torch.as_tensor(guidance)),
                        extras=extras, negative_extras=negative)
