"""Options shared by the commands, declared once, and what the sampling ones build.

Each option is declared once here as an ``Annotated`` type (name, short name, help). The options
every sampling command shares (capture, probe, routing) are the fields of :class:`SamplingOptions`;
a command takes them with :func:`sampling_command`, naming the ones it offers (and where they
appear in its ``--help``) and its own defaults, and receives one :class:`SamplingOptions` value.
:meth:`SamplingOptions.request` validates them (once, in :func:`sampling_request`) and turns them
into the keyword arguments of :class:`dithooks.capture.CaptureConfig`. Commands with their own
request types (protocol1, protocol2, locality) use the ``Annotated`` types for the options whose
meaning is the same (``--model``, ``--device``, ``--resume``, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from pathlib import Path
from typing import Annotated, Any, Callable, List, Optional, Sequence, get_type_hints

import typer

from dithooks.errors import DithooksError

MODEL_HELP = ("Model: a local directory saved with save_pretrained, a hub id in the local HF cache, "
              "or empty for the embedded digits DiT.")

Out = Annotated[Path, typer.Option("--out", "-o", help="Store to write (a directory).")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP)]
Layers = Annotated[str, typer.Option("--layers", "-l", help="Blocks to hook: all, 0-27, 0,5,27, 20-.")]
Steps = Annotated[int, typer.Option("--steps", help="Sampling steps.")]
SamplerName = Annotated[str, typer.Option("--sampler", help="ddim, ddpm or flow (flow matching: SD3, Flux); auto: the model family's own (ddim for DiT and PixArt, flow for SD3 and Flux).")]
Eta = Annotated[float, typer.Option("--eta", help="DDIM eta (0 deterministic, 1 ~ DDPM).")]
Guidance = Annotated[float, typer.Option("--guidance", "-g", help="Classifier-free guidance scale; 1 = off (no unconditional branch: null class, or negative/empty prompt).")]
Classes = Annotated[str, typer.Option("--class", "--classes", "-c", help="Class label(s): one for all samples, or one per seed (0-9, 3,5).")]
Seeds = Annotated[str, typer.Option("--seeds", "-s", help="Seeds, one sample (or one replica pair) each: 0-7 or 0,4,9.")]
PromptEmbeds = Annotated[Optional[Path], typer.Option("--prompt-embeds", help="Text-conditioned families (PixArt, SD3, Flux): a .pt or .safetensors file with prompt_embeds (prompts x text tokens x channels) and, as the family needs, pooled_prompt_embeds, negative_prompt_embeds, negative_pooled_prompt_embeds; --class does not apply.")]
PromptRows = Annotated[Optional[str], typer.Option("--prompt-rows", help="Rows of --prompt-embeds (or of the --prompt list), one for all seeds or one per seed: 0, 0-3 (default: row i for seed i, or row 0 when there is one).")]
Prompts = Annotated[List[str], typer.Option("--prompt", metavar="<str>", help="Text-conditioned families whose model folder is a pipeline with its text encoders: a prompt, encoded by the pipeline; repeat for more (one for all seeds, or one per seed).")]
EmbeddedGuidance = Annotated[Optional[float], typer.Option("--embedded-guidance", help="Flux-dev: the guidance value the model takes as an input (overrides the embeddings file's; default 3.5 as FluxPipeline). Not classifier-free guidance: keep --guidance at 1.")]
NegativePrompt = Annotated[Optional[str], typer.Option("--negative-prompt", help="With --prompt and --guidance: the prompt of the unconditional branch (default: the family's empty prompt).")]
StorageDtype = Annotated[str, typer.Option("--dtype", help="Storage dtype of raw hooks: fp32, fp16, bf16 (probe outputs are float32).")]
ComputeDtype = Annotated[str, typer.Option("--compute-dtype", help="Model dtype: fp32, fp16, bf16.")]
Device = Annotated[str, typer.Option("--device", help="torch device: cpu, cuda, cuda:1, mps.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in OUT.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing store at OUT.")]
AllowWeightMismatch = Annotated[bool, typer.Option(
    "--allow-weight-mismatch", help="Load a model whose weights do not match its config.json (unused or missing "
    "weights; by default an error).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

# replica pairs (the paper's eqs [18-19], [67])
Pairs = Annotated[bool, typer.Option("--pairs", help="Sample each seed as a replica pair (a, b); implied by --kappa/--coupling.")]
Kappa = Annotated[Optional[float], typer.Option("--kappa", help="Replica separation at the start, eq [67]: 0 identical, 0.7071 independent (default).")]
Coupling = Annotated[Optional[float], typer.Option("--coupling", help="Coupling strength g in [0, 1] of eq [19] (default 0: uncoupled pair).")]
CoupleUntil = Annotated[Optional[int], typer.Option("--couple-until", help="Couple for the steps before this one (0 to --steps), then run independently (Protocol I's s*).")]
ShareNoiseUntil = Annotated[Optional[int], typer.Option("--share-noise-until", help="g = 0 control: replica b reuses a's sampler noise before this step.")]
CoupleLayers = Annotated[str, typer.Option("--couple-layers", help="Blocks whose attention is coupled: all, 0-13, ...")]

# attention processor options
Window = Annotated[Optional[int], typer.Option("--window", help="Intervention: restrict attention to a Chebyshev window of this radius in tokens, max(|drow|, |dcol|) <= r (the local denoiser of the nonlocality paper, Sec. 3.1).")]
WindowLayers = Annotated[str, typer.Option("--window-layers", help="Blocks the window applies to: all, 0-13, ...")]
TopK = Annotated[Optional[int], typer.Option("--top-k", help="k for the attn.topk_idx / attn.topk_val reductions.")]
QueryTokens = Annotated[Optional[str], typer.Option("--query-tokens", help="Query rows for attn.pattern_query: 0,5,120 or 0-15.")]
QueryTile = Annotated[int, typer.Option("--query-tile", help="Query rows per tile on the explicit-softmax path (bounds memory).")]

# JVPs
JvpDirection = Annotated[str, typer.Option("--jvp-direction", help="Direction of blocks.{i}.jvp.*: auto (replica difference with pairs, else random), replica, random, or a .npy file of shape (tokens, channels).")]
JvpGates = Annotated[bool, typer.Option("--jvp-gates/--no-jvp-gates", help="Apply rho(g), xi(g) to the routing/modulation parts.")]


# options of the analysis commands (protocol1/2, locality) that mean the same in each; options whose
# help states a command's own default (--steps "default 100, as the paper") stay with the command
BootstrapSeed = Annotated[Optional[int], typer.Option("--bootstrap-seed", help="RNG seed of the resamples (default 0).")]
SampleSeeds = Annotated[Optional[str], typer.Option("--seeds", "-s", help="One seed per sample (default 0..n-1).")]
StoreFigures = Annotated[bool, typer.Option("--figures/--no-figures", help="Write figures under STORE/figures/ (PNG + SVG).")]


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """The values of the options the sampling commands share; the defaults are capture's (a command
    that does not offer an option gets its default, or the value it fixes in :func:`sampling_command`)."""

    out: Out = Path("capture.zarr")
    model: Model = None
    layers: Layers = "all"
    steps: Steps = 50
    sampler: SamplerName = "auto"
    eta: Eta = 0.0
    guidance: Guidance = 1.0
    classes: Classes = "0"
    seeds: Seeds = "0"
    prompt_embeds: PromptEmbeds = None
    prompt_rows: PromptRows = None
    prompt: Prompts = ()
    negative_prompt: NegativePrompt = None
    embedded_guidance: EmbeddedGuidance = None
    pairs: Pairs = False
    kappa: Kappa = None
    coupling: Coupling = None
    couple_until: CoupleUntil = None
    share_noise_until: ShareNoiseUntil = None
    couple_layers: CoupleLayers = "all"
    window: Window = None
    window_layers: WindowLayers = "all"
    top_k: TopK = None
    query_tokens: QueryTokens = None
    query_tile: QueryTile = 512
    jvp_direction: JvpDirection = "auto"
    jvp_gates: JvpGates = True
    dtype: StorageDtype = "fp16"
    compute_dtype: ComputeDtype = "fp32"
    device: Device = "cpu"
    resume: Resume = False
    overwrite: Overwrite = False
    allow_weight_mismatch: AllowWeightMismatch = False
    quiet: Quiet = False
    as_json: Json = False

    #: fields that steer the command, not the capture
    COMMAND_ONLY = ("allow_weight_mismatch", "quiet", "as_json")

    def request(self, *, hooks: str = "", compression: str = "none", probes: tuple = ()) -> dict[str, Any]:
        """Validated keyword arguments of :class:`~dithooks.capture.CaptureConfig`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self.COMMAND_ONLY}
        return sampling_request(hooks=hooks, compression=compression, probes=probes, **values)

    def session(self, request: dict[str, Any]):
        """The capture session of ``request`` (the model loaded as --allow-weight-mismatch says)."""
        return make_session(request, allow_weight_mismatch=self.allow_weight_mismatch)


def sampling_command(layout: str, **defaults: Any) -> Callable[[Callable], Callable]:
    """Declare a sampling command from the shared options and its own parameters.

    ``layout`` names, in ``--help`` order, the :class:`SamplingOptions` fields the command offers
    and its own parameters (those after the first); ``defaults`` sets the command's defaults of
    offered options and the fixed values of options it does not offer (``pairs=True``). The
    decorated function receives the :class:`SamplingOptions` first, then its own parameters::

        @sampling_command("out model layers hooks steps quiet", out=Path("x.zarr"), seeds="0-3")
        def mine(run: SamplingOptions, hooks: str = typer.Option("", "--hooks")): ...
    """
    hints = get_type_hints(SamplingOptions, include_extras=True)
    shared = {f.name: f for f in dataclasses.fields(SamplingOptions)}
    unknown = set(defaults) - set(shared)
    if unknown:
        raise TypeError(f"sampling_command: no shared options {sorted(unknown)}")

    def decorate(fn: Callable) -> Callable:
        own = dict(list(inspect.signature(fn, eval_str=True).parameters.items())[1:])
        params, offered = [], []
        for name in layout.split():
            if name in own:
                params.append(own.pop(name).replace(kind=inspect.Parameter.KEYWORD_ONLY))
            elif name in shared:
                offered.append(name)
                params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[name],
                                                default=defaults.get(name, shared[name].default)))
            else:
                raise TypeError(f"{fn.__name__}: {name!r} is neither a shared option nor a parameter")
        if own:
            raise TypeError(f"{fn.__name__}: parameters {sorted(own)} are missing from its layout")
        fixed = {k: v for k, v in defaults.items() if k not in offered}

        @functools.wraps(fn)
        def command(**kwargs):
            run = SamplingOptions(**fixed, **{k: kwargs.pop(k) for k in offered})
            return fn(run, **kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


# list options ("0-7", "0,4,9") share one parser with the whole package
from dithooks.lists import MAX_LIST_ITEMS, parse_int_list  # noqa: E402,F401


def check_finite(value: float | None, option: str, lo: float | None = None, hi: float | None = None) -> None:
    """Refuse NaN, infinities and values outside ``[lo, hi]`` of a numeric option, naming it."""
    if value is None:
        return
    if not math.isfinite(value):
        raise DithooksError(f"{option} must be a finite number, got {value}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        where = (f"in [{lo:g}, {hi:g}]" if lo is not None and hi is not None
                 else f">= {lo:g}" if lo is not None else f"<= {hi:g}")
        raise DithooksError(f"{option} must be {where}, got {value:g}")


def check_output_file(path: Path | None, option: str, suffixes: tuple[str, ...]) -> None:
    """A file the command writes at the end: refuse a wrong suffix or a missing folder up front."""
    if path is None:
        return
    if path.suffix.lower() not in suffixes:
        raise DithooksError(f"{option} {path}: the file name must end in {' or '.join(suffixes)}")
    parent = path.expanduser().parent
    if not parent.is_dir():
        raise DithooksError(f"{option} {path}: folder {parent} does not exist")
    if path.is_dir():
        raise DithooksError(f"{option} {path} is a folder")


#: Seeds must fit torch's generator (< 2**64); replica b's seed is hashed into 32 bits (replica_seed).
MAX_SEED = 2**63 - 1


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
        arr = np.load(path, allow_pickle=False)
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"it holds {arr.dtype} values, not numbers")
        arr = arr.astype("float32")
    except (ValueError, OSError, EOFError) as e:
        raise DithooksError(f"cannot read {path} as a numpy array: {e}") from None
    if arr.size == 0:
        raise DithooksError(f"JVP direction {path} is empty")
    if not np.isfinite(arr).all():
        raise DithooksError(f"JVP direction {path} holds {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    if not np.any(arr):
        raise DithooksError(f"JVP direction {path} is all zeros: a JVP along it is zero")
    return torch.from_numpy(arr)


def _store_location(out: Path) -> Any:
    """``--out``: a folder, or an object-store URL (``s3://...``, which typer's Path would
    collapse to ``s3:/...``)."""
    from dithooks.store.storage import as_path

    return as_path(out)


def sampling_request(*, out: Path, model: str | None, layers: str, hooks: str, steps: int, sampler: str,
                     eta: float, guidance: float, classes: str, seeds: str, prompt_embeds: Path | None = None,
                     prompt_rows: str | None = None, prompt: Sequence[str] = (), negative_prompt: str | None = None,
                     embedded_guidance: float | None = None,
                     dtype: str = "fp16",
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
    check_finite(eta, "--eta", 0.0, 1.0)
    check_finite(guidance, "--guidance", -1e4, 1e4)
    check_finite(kappa, "--kappa", 0.0, 1.0)
    check_finite(coupling, "--coupling (g)", 0.0, 1.0)
    if steps < 1:
        raise DithooksError(f"--steps must be at least 1, got {steps}")
    for value, option in ((couple_until, "--couple-until"), (share_noise_until, "--share-noise-until")):
        if value is not None and not 0 <= value <= steps:
            raise DithooksError(f"{option} must be a step in 0-{steps} (--steps), got {value}")
    if window is not None and window < 0:
        raise DithooksError(f"--window must be a radius >= 0 in tokens, got {window}")
    if top_k is not None and top_k < 1:
        raise DithooksError(f"--top-k must be at least 1, got {top_k}")
    if query_tile < 1:
        raise DithooksError(f"--query-tile must be at least 1, got {query_tile}")
    for text, option in ((layers, "--layers"), (couple_layers, "--couple-layers"), (window_layers, "--window-layers")):
        if not str(text).strip():
            raise DithooksError(f"empty {option}: give blocks (0-27, 0,5, 20-) or all")
    replicas = None
    if pairs or kappa is not None or coupling is not None or couple_until is not None or share_noise_until is not None:
        coupled = None  # every block; the capture checks a list against the model's blocks
        if couple_layers.strip().lower() != "all":
            coupled = tuple(parse_int_list(couple_layers, "coupled layers", lo=0))
        replicas = ReplicaSpec(kappa=2 ** -0.5 if kappa is None else kappa, g=coupling or 0.0,
                               couple_until=couple_until, share_noise_until=share_noise_until, layers=coupled)
    auto = sampler.strip().lower() == "auto"  # resolved by make_session, which loads the model
    return dict(
        out=str(_store_location(out)), model=model, layers=layers, hooks=tuple(h.strip() for h in hooks.split(",") if h.strip()),
        sampler=SamplerSpec("ddim" if auto else sampler, steps, eta, guidance),
        labels=tuple(parse_int_list(classes, "classes", lo=0)),
        seeds=tuple(parse_int_list(seeds, "seeds", lo=0, hi=MAX_SEED)), storage_dtype=dtype, compute_dtype=compute_dtype,
        compression=compression, device=device, mode="resume" if resume else "overwrite" if overwrite else "create",
        probes=probes, replicas=replicas, window=window, window_layers=None if window is None else window_layers,
        top_k=top_k, query_tokens=tuple(parse_int_list(query_tokens, "query tokens", lo=0)) if query_tokens is not None else None,
        query_tile=query_tile,
        jvp=JVPSettings(direction=_jvp_direction(jvp_direction), apply_gates=jvp_gates),
        **_text_conditioning(prompt_embeds, prompt_rows, tuple(prompt or ()), negative_prompt, embedded_guidance),
        **({AUTO_SAMPLER: True} if auto else {}))


def _text_conditioning(prompt_embeds: Path | None, prompt_rows: str | None, prompt: tuple[str, ...],
                       negative_prompt: str | None, embedded_guidance: float | None) -> dict[str, Any]:
    """CaptureConfig's ``conditioning``/``prompts`` (and the prompts make_session encodes) of the text options."""
    out: dict[str, Any] = {}
    if prompt and prompt_embeds is not None:
        raise DithooksError("--prompt and --prompt-embeds exclude each other: give prompts as text or as embeddings")
    if negative_prompt is not None and not prompt:
        raise DithooksError("--negative-prompt goes with --prompt (a file's negatives are its negative_prompt_embeds)")
    if prompt_embeds is not None:
        if not Path(prompt_embeds).expanduser().is_file():
            raise DithooksError(f"--prompt-embeds {prompt_embeds}: no such file")
        out["conditioning"] = str(prompt_embeds)
    if prompt:  # encoded by make_session, which loads the model (and its pipeline's text encoders)
        out[ENCODE_PROMPTS] = (prompt, negative_prompt)
    if prompt_rows is not None:
        if prompt_embeds is None and not prompt:
            raise DithooksError("--prompt-rows picks rows of --prompt-embeds (or of the --prompt list): give those too")
        out["prompts"] = tuple(parse_int_list(prompt_rows, "prompt rows", lo=0))
    if embedded_guidance is not None:
        check_finite(embedded_guidance, "--embedded-guidance", 0.0, 1e4)
        if prompt_embeds is None and not prompt:
            raise DithooksError("--embedded-guidance goes with --prompt-embeds or --prompt (Flux-dev)")
        out[EMBEDDED_GUIDANCE] = float(embedded_guidance)
    return out


#: request key (not a CaptureConfig field) of ``--sampler auto``: make_session picks the family's sampler
AUTO_SAMPLER = "_auto_sampler"
#: request key of ``--prompt``: (prompts, negative prompt), encoded by make_session
ENCODE_PROMPTS = "_encode_prompts"
#: request key of ``--embedded-guidance``: set on the conditioning by make_session
EMBEDDED_GUIDANCE = "_embedded_guidance"


def make_session(request: dict[str, Any], *, allow_weight_mismatch: bool = False):
    """The :class:`~dithooks.capture.CaptureSession` of a request; nothing is on disk yet.

    ``--sampler auto`` and ``--prompt`` load the model here: the adapter's ``default_sampler`` and the
    pipeline's text encoders."""
    from dithooks.capture import CaptureConfig, CaptureSession, _compute_dtype
    from dithooks.loading import load_model

    request = dict(request)
    auto = request.pop(AUTO_SAMPLER, False)
    encode = request.pop(ENCODE_PROMPTS, None)
    guidance = request.pop(EMBEDDED_GUIDANCE, None)
    cfg = CaptureConfig(**request)
    loaded = None
    if allow_weight_mismatch or auto or encode:  # the session loads strictly by itself otherwise
        loaded = load_model(cfg.model, device=cfg.device, dtype=_compute_dtype(cfg.compute_dtype),
                            allow_weight_mismatch=allow_weight_mismatch)
    if auto:
        name = getattr(loaded.adapter, "default_sampler", "ddim")
        if name != cfg.sampler.name:
            cfg.sampler = dataclasses.replace(cfg.sampler, name=name)
    if encode:
        prompts, negative = encode
        cfg.conditioning = loaded.encode_prompts(list(prompts), None if negative is None else [negative] * len(prompts))
    if guidance is not None:  # the file's tensors with this guidance (the metadata keeps their sha256)
        from dithooks.conditioning import Conditioning, load_prompt_embeds

        cond = cfg.conditioning
        cond = cond if isinstance(cond, Conditioning) else load_prompt_embeds(cond)
        cfg.conditioning = dataclasses.replace(cond, guidance=guidance)
    return CaptureSession(cfg, loaded)


def run_session(session, progress):
    """Run a session; an error after the store exists says what state the store was left in."""
    from dithooks.store.metadata import ATTR_KEY

    try:
        return session.run(progress=progress)
    except DithooksError as e:
        text = str(e)
        if "--resume" in text or "--overwrite" in text:
            raise
        status = None
        try:
            import zarr

            status = dict(zarr.open_group(str(session.path), mode="r").attrs[ATTR_KEY]).get("status")
        except Exception:
            pass
        if status in ("failed", "interrupted"):
            raise type(e)(f"{text}; {session.path} is marked {status}: fix the cause and continue it with "
                          "--resume (or start again with --overwrite)") from e
        raise
