"""What a capture is asked to do (:class:`CaptureConfig`) and its checks, in one place.

:func:`check_config` checks what needs no model (mode, compression, dtypes, labels per seed);
:func:`check_against_model` what needs one (token indices, top-k, windows, coupled layers, JVP
directions), before anything touches the disk. :func:`resolve_conditioning` turns the request's
labels or prompt embeddings into what each sample is conditioned on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DithooksError
from ..jvp_hooks import JVPSettings, check_direction
from ..layers import parse_layers
from ..sampling import ReplicaSpec, SamplerSpec
from ..store.codecs import COMPRESSIONS, storage_dtype
from ..store.lifecycle import MODES

DEFAULT_HOOKS = ("resid_post",)


@dataclass
class CaptureConfig:
    """Everything that defines a capture; the CLI builds one of these from its options."""

    out: str
    model: str | None = None
    layers: str = "all"
    hooks: tuple[str, ...] = DEFAULT_HOOKS
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    labels: tuple[int, ...] = (0,)
    seeds: tuple[int, ...] = (0,)
    storage_dtype: str = "fp16"
    compute_dtype: str = "fp32"
    compression: str = "none"
    device: str = "cpu"
    mode: str = "create"
    max_pending_bytes: int = 256 * 2**20
    # probes measured online and stored as probe.<name>.<output> (see docs/writing-probes.md):
    # Probe instances, registered names / import paths, or (name, {options})
    probes: tuple = ()
    # replica pairs (THEORY §2): each seed becomes a pair (a, b); stores gain a `replica` dim
    replicas: ReplicaSpec | None = None
    # attention processor settings (hook-points.md): Chebyshev window radius on `window_layers`
    # (None = all blocks), reductions' top-k and chosen query rows, query tile of the explicit path
    window: int | None = None
    window_layers: str | None = None
    top_k: int | None = None
    query_tokens: tuple[int, ...] | None = None
    query_tile: int = 512
    # how blocks.{i}.jvp.* are computed (dithooks/jvp_hooks.py)
    jvp: JVPSettings = field(default_factory=JVPSettings)
    # text-conditioned families (PixArt, SD3, Flux): prompt embeddings, as a file (.pt or
    # .safetensors with `prompt_embeds` [and `pooled_prompt_embeds`, `negative_*`]) or a
    # dithooks.conditioning.Conditioning; `prompts` picks each seed's row of them (default: row i
    # for seed i, or row 0 for every seed when there is one row). `labels` is then unused.
    conditioning: Any = None
    prompts: tuple[int, ...] | None = None


def compute_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise DithooksError(f"unknown compute dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


_compute_dtype = compute_dtype  # the older private name (cli/run_options.py imports it)


def check_config(cfg: CaptureConfig) -> torch.dtype:
    """Checks that need no model; one label broadcasts over the seeds. Returns the storage dtype."""
    if cfg.mode not in MODES:
        raise DithooksError(f"unknown mode {cfg.mode!r}")
    if cfg.compression not in COMPRESSIONS:
        raise DithooksError(f"unknown compression {cfg.compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    store_dtype = storage_dtype(cfg.storage_dtype)
    if cfg.conditioning is None:
        if len(cfg.labels) == 1 and len(cfg.seeds) > 1:
            cfg.labels = tuple(cfg.labels) * len(cfg.seeds)
        if len(cfg.labels) != len(cfg.seeds):
            raise DithooksError(f"{len(cfg.labels)} labels for {len(cfg.seeds)} seeds: "
                                "give one label, or one per seed")
    check_direction(cfg.jvp.direction)
    return store_dtype


# -- conditioning --------------------------------------------------------------------------------
@dataclass
class SampleConditioning:
    """What each sample of a capture is conditioned on.

    ``kind`` "class": ``labels`` (one per sample). ``kind`` "text": ``prompts`` (each sample's row
    of the prompt embeddings), ``cond`` (a Conditioning of the selected rows, one per sample) and
    ``source`` (where the embeddings came from and their sha256, for the metadata).
    """

    kind: str
    labels: tuple[int, ...] | None = None
    prompts: tuple[int, ...] | None = None
    cond: Any = None
    source: dict[str, Any] | None = None

    @property
    def text_tokens(self) -> int | None:
        """The prompt embeddings' length L (None for class-conditional samples)."""
        return None if self.cond is None else int(self.cond.prompt_embeds.shape[1])

    @property
    def sampler_input(self) -> Any:
        """What :meth:`dithooks.sampling.Sampler.run` takes: labels or a Conditioning."""
        return self.labels if self.kind == "class" else self.cond


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_tensors(cond: Any) -> str:
    """A digest of a Conditioning's tensors (name, shape, dtype, bytes) when no file names them."""
    from ..conditioning import TENSOR_FIELDS

    h = hashlib.sha256()
    for name in TENSOR_FIELDS[1:]:
        t = getattr(cond, name, None)
        if t is None:
            continue
        t = torch.as_tensor(t).detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for k in sorted(getattr(cond, "extras", {}) or {}):
        t = torch.as_tensor(cond.extras[k]).detach().to("cpu").contiguous()
        h.update(f"extra {k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if getattr(cond, "guidance", None) is not None:
        h.update(f"guidance:{float(cond.guidance)!r}".encode())
    return h.hexdigest()


def resolve_conditioning(cfg: CaptureConfig, adapter: Any) -> SampleConditioning:
    """The request's conditioning for ``adapter``'s family: labels for class-conditional models,
    prompt-embedding rows for text-conditioned ones (refused, one line, when it does not fit)."""
    kind = getattr(adapter, "conditioning", "class")
    n = len(cfg.seeds)
    if kind != "text":
        if cfg.conditioning is not None or cfg.prompts is not None:
            raise DithooksError(f"{getattr(adapter, 'family', 'this')} models are class-conditional: "
                                "give class labels (--class), not prompt embeddings")
        return SampleConditioning("class", labels=tuple(int(y) for y in cfg.labels))
    if cfg.conditioning is None:
        raise DithooksError(f"{getattr(adapter, 'family', 'this')} models are text-conditioned: give prompt "
                            "embeddings (--prompt-embeds: a .pt or .safetensors file with 'prompt_embeds')")
    if any(int(y) != 0 for y in cfg.labels):  # (0,) is the default: not asked for
        raise DithooksError(f"{getattr(adapter, 'family', 'this')} models are text-conditioned: class labels "
                            "(--class) do not apply; choose prompts with --prompt-rows")
    from ..conditioning import Conditioning, load_prompt_embeds

    if isinstance(cfg.conditioning, Conditioning):
        full = cfg.conditioning
        source = {"file": None, "sha256": _sha256_tensors(full)}
    else:
        path = Path(cfg.conditioning).expanduser()
        full = load_prompt_embeds(path)
        source = {"file": str(path), "sha256": _sha256_file(path)}
    rows = len(full)
    if cfg.prompts is None:
        if rows not in (1, n):
            raise DithooksError(f"{rows} prompts for {n} seeds: give one prompt, one per seed, "
                                "or choose rows with --prompt-rows")
        prompts = tuple(range(n)) if rows == n else (0,) * n
    else:
        prompts = tuple(int(p) for p in cfg.prompts)
        if len(prompts) == 1 and n > 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise DithooksError(f"{len(prompts)} prompt rows for {n} seeds: give one, or one per seed")
        bad = [p for p in prompts if not 0 <= p < rows]
        if bad:
            raise DithooksError(f"prompt row {bad[0]} is out of range: the embeddings hold rows 0-{rows - 1}")
    source.update(rows=rows, shape=list(full.prompt_embeds.shape),
                  fields=[f for f in ("pooled_prompt_embeds", "negative_prompt_embeds",
                                      "negative_pooled_prompt_embeds") if getattr(full, f, None) is not None],
                  guidance=full.guidance)
    return SampleConditioning("text", prompts=prompts, cond=full.select(list(prompts)), source=source)


# -- checks against the model ---------------------------------------------------------------------
def check_against_model(cfg: CaptureConfig, adapter: Any, hooks: Any, wants_jvp: bool,
                        num_rows: int) -> list[int] | None:
    """Settings that need the model: attention processor options, coupled layers, JVP
    directions. Sets the processor options on the attention extension and the JVP settings on
    the JVP extension (through their validating setters). Returns the window's layers (None: all).
    ``num_rows``: samples times cfg branches (a JVP direction's batch)."""
    n = adapter.num_layers
    att = hooks.extension("attention")
    wants_attention = (cfg.window is not None or cfg.top_k is not None or cfg.query_tokens
                       or cfg.replicas is not None)
    if wants_attention and att is None:
        raise DithooksError(f"{type(hooks.model).__name__} exposes no attention processors: "
                            "windows, top-k, query tokens and replica coupling are unavailable")
    window_layers = None
    if att is not None:
        # the extension validates its own options (one-line errors) and rebuilds its processors
        att.configure(query_tile=cfg.query_tile, top_k=cfg.top_k,
                      query_tokens=list(cfg.query_tokens) if cfg.query_tokens else None)
        if cfg.window is not None:
            from ..attention.window import validate_radius
            try:
                validate_radius(cfg.window)
            except ValueError as e:
                raise DithooksError(str(e)) from None
            window_layers = None if cfg.window_layers in (None, "all") else parse_layers(cfg.window_layers, n)
    if cfg.replicas is not None and cfg.replicas.layers is not None:
        bad = [layer for layer in cfg.replicas.layers if not 0 <= layer < n]
        if bad:
            raise DithooksError(f"coupled layer {bad[0]} is out of range: this model has blocks 0-{n - 1}")
    if wants_jvp:
        _check_direction_shapes(cfg.jvp.direction, adapter.geometry, num_rows)
        if isinstance(cfg.jvp.direction, str) and cfg.jvp.direction == "replica" and cfg.replicas is None:
            raise DithooksError("JVP direction 'replica' needs replica pairs (--pairs, --kappa or --coupling)")
        hooks.extension("jvp", required=True).use_settings(cfg.jvp)  # validated there
    return window_layers


def _check_direction_shapes(direction: Any, geo: Any, rows: int) -> None:
    """Stored directions must fit a block's input (tokens, channels): refuse before disk."""
    shape = (rows, geo.num_tokens, geo.width)
    tensors = direction.values() if isinstance(direction, dict) else [direction]
    for d in tensors:
        if isinstance(d, str) or callable(d) and not isinstance(d, torch.Tensor):
            continue
        t = torch.as_tensor(d)
        try:
            if torch.broadcast_shapes(tuple(t.shape), shape) != shape:
                raise RuntimeError
        except RuntimeError:
            raise DithooksError(f"JVP direction of shape {tuple(t.shape)} does not fit a block's input "
                                f"(tokens, channels) = ({geo.num_tokens}, {geo.width})") from None
