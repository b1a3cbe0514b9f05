"""Loading models the diffusers way: the embedded default, a local directory, or a hub id.

A hub id (``facebook/DiT-XL-2-256``) is looked up in the local Hugging Face cache first and only
then fetched (unless ``HF_HUB_OFFLINE=1``). A directory is either a pipeline saved with
``save_pretrained`` (``model_index.json`` with ``transformer/``, optional ``vae/``,
``scheduler/`` and text encoders) or a bare transformer (``config.json`` + weights, optional
``scheduler_config.json`` beside it).

Any registered family loads this way (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
``SD3Transformer2DModel``, ``FluxTransformer2DModel``: the class named in the transformer's
config picks the adapter). The schedule defaults to what the family samples with: DiT's linear
DDPM schedule for epsilon models, FlowMatchEulerDiscreteScheduler's defaults for flow models;
a scheduler config in the directory overrides it. When the pipeline directory ships text
encoders, :meth:`LoadedModel.encode_prompts` turns prompts into a
:class:`~dithooks.conditioning.Conditioning` through the pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for
from .errors import DithooksError, ModelNotFoundError

DEFAULT_MODEL = "dithooks/digits-dit"
#: Embedded models by the names users pass to ``--model`` (variant names of default_model.config).
EMBEDDED_MODELS = {"digits": DEFAULT_MODEL, "digits64": "dithooks/digits64-dit"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# DiT's training schedule (Peebles & Xie): used when a checkpoint ships no scheduler config.
DIT_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                "beta_schedule": "linear", "clip_sample": False}


@dataclass
class LoadedModel:
    """A transformer with its adapter, the schedule it was trained with and an optional VAE."""

    transformer: nn.Module
    adapter: ModelAdapter
    model_id: str
    source: str
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    vae: nn.Module | None = None
    vae_scale: float = 1.0
    vae_shift: float = 0.0
    #: the pipeline directory (model_index.json) when loaded from one
    pipeline_dir: Path | None = None
    #: pipeline components beside the transformer (``text_encoder``, ``tokenizer_2``, ...)
    components: tuple[str, ...] = ()
    _pipeline: Any = field(default=None, repr=False)

    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def has_text_encoders(self) -> bool:
        return any(c.startswith("text_encoder") for c in self.components)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents to images in [0, 1]: through the VAE when there is one, else pixels directly."""
        if self.vae is None:
            return ((latents.float().clamp(-1, 1) + 1) / 2)
        with torch.no_grad():
            z = latents.to(next(self.vae.parameters()).dtype) / self.vae_scale + self.vae_shift
            img = self.vae.decode(z).sample
        return ((img.float().clamp(-1, 1) + 1) / 2)

    def pipeline(self):
        """The diffusers pipeline of :attr:`pipeline_dir` sharing this transformer (loaded once)."""
        if self._pipeline is None:
            if self.pipeline_dir is None:
                raise DithooksError(f"{self.model_id} is a bare transformer: no pipeline (text encoders) to use")
            import diffusers

            try:
                self._pipeline = diffusers.DiffusionPipeline.from_pretrained(
                    str(self.pipeline_dir), transformer=self.transformer,
                    torch_dtype=next(self.transformer.parameters()).dtype)
            except Exception as e:
                raise ModelNotFoundError(f"could not load the pipeline in {self.pipeline_dir}: {_first_line(e)}") from None
        return self._pipeline

    def encode_prompts(self, prompts, negative_prompts=None):
        """Prompts to a :class:`~dithooks.conditioning.Conditioning` through the pipeline's text
        encoders (the adapter's ``encode_prompts(pipeline, prompts, negative_prompts)``)."""
        if self.adapter.conditioning != "text":
            raise DithooksError(f"{self.family} models are not conditioned on text")
        if not self.has_text_encoders:
            raise DithooksError(f"{self.model_id} ships no text encoders: give precomputed prompt embeddings "
                                "(a .pt/.safetensors file with prompt_embeds)")
        encode = getattr(self.adapter, "encode_prompts", None)
        if encode is None:
            raise DithooksError(f"the {self.family} adapter cannot encode prompts")
        return encode(self.pipeline(), list(prompts), None if negative_prompts is None else list(negative_prompts))


def load_model(spec: str | None = None, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               with_vae: bool = True, allow_weight_mismatch: bool = False,
               adapter_options: dict[str, Any] | None = None) -> LoadedModel:
    """Load ``spec`` (None = the embedded default model) for inference on ``device``.

    Weights that the config does not use, or parameters the weights do not provide (a config
    that says 12 blocks beside weights of 28), raise :class:`ModelNotFoundError` unless
    ``allow_weight_mismatch`` is set; an unusable ``device`` is refused before anything loads.
    ``adapter_options`` set attributes of the adapter that the config does not fix (Flux: the
    latent ``sample_size`` and ``text_tokens``); an unknown one is refused.
    """
    check_device(device)
    embedded = {None: "digits", "": "digits", "default": "digits",
                 **{k: k for k in EMBEDDED_MODELS}, **{v: k for k, v in EMBEDDED_MODELS.items()}}
    # an embedded name wins unless a model folder of that name is here (an output folder is not one)
    if spec in embedded and not (spec and _is_model_dir(Path(spec).expanduser())):
        from .default_model import default_model_dir
        variant = embedded[spec]
        path = default_model_dir(variant)
        if not (path / "config.json").exists():
            raise ModelNotFoundError(f"the embedded model {variant!r} has no weights in this install; "
                                     f"run `dithooks train-default --variant {variant}` or pass --model")
        loaded = _load_dir(path, EMBEDDED_MODELS[variant], "embedded", with_vae, allow_weight_mismatch)
    else:
        path = Path(spec).expanduser()
        if path.exists():
            loaded = _load_dir(path, str(spec), "local directory", with_vae, allow_weight_mismatch)
        elif _HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
            loaded = _load_dir(_hub_snapshot(spec), spec, "hub cache", with_vae, allow_weight_mismatch)
        else:
            raise ModelNotFoundError(f"no model directory at {spec!r} (and it is not a hub id like org/name)")
    for key, value in (adapter_options or {}).items():
        if key.startswith("_") or not hasattr(loaded.adapter, key) or callable(getattr(loaded.adapter, key)):
            raise DithooksError(f"the {loaded.adapter.family} adapter has no option {key!r}")
        setattr(loaded.adapter, key, value)
    loaded.transformer.to(device=device, dtype=dtype).eval()
    loaded.transformer.requires_grad_(False)
    if loaded.vae is not None:
        loaded.vae.to(device=device).eval()
    return loaded


def _is_model_dir(path: Path) -> bool:
    """A folder saved by diffusers: a pipeline (model_index.json) or a model (config.json)."""
    return (path / "model_index.json").is_file() or (path / "config.json").is_file()


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
            f"run `huggingface-cli download {repo_id}` where there is internet, or pass a local directory")
    try:
        return Path(snapshot_download(repo_id))
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded "
            f"({reason}): run `huggingface-cli download {repo_id}` where there is internet, "
            "or pass a local directory saved with save_pretrained") from None


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, or a one-line error when this machine cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DithooksError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DithooksError(f"device {str(device)!r} asked for, but CUDA is not available "
                                f"(torch {torch.__version__}{'' if torch.version.cuda else ' is a CPU-only build'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DithooksError(f"device {str(device)!r} does not exist: this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s), cuda:0-{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DithooksError("device 'mps' asked for, but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise DithooksError(f"device {str(device)!r} is not supported: use cpu, cuda, cuda:N or mps")
    return dev


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelNotFoundError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                                 "is it truncated?") from None
    except UnicodeDecodeError:
        raise ModelNotFoundError(f"{path} is not a text (JSON) file") from None
    if not isinstance(obj, dict):
        raise ModelNotFoundError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _check_loading_info(info: dict[str, Any], where: Path, what: str) -> None:
    """Refuse weights that do not fit the config (see :func:`load_model`)."""
    missing, unused = list(info.get("missing_keys") or ()), list(info.get("unexpected_keys") or ())
    mismatched = list(info.get("mismatched_keys") or ())
    if not (missing or unused or mismatched):
        return
    parts = []
    if unused:
        parts.append(f"{len(unused)} weights the config does not use (e.g. {sorted(unused)[0]})")
    if missing:
        parts.append(f"{len(missing)} parameters the weights do not provide (e.g. {sorted(missing)[0]})")
    if mismatched:
        parts.append(f"{len(mismatched)} weights of the wrong shape (e.g. {mismatched[0][0]})")
    raise ModelNotFoundError(f"the {what} weights in {where} do not match its config.json: {'; '.join(parts)}; "
                             "fix the config (e.g. num_layers), or pass --allow-weight-mismatch to load anyway")


def _from_pretrained(cls, path: Path, subfolder: str | None, what: str, allow_weight_mismatch: bool):
    kwargs = {"subfolder": subfolder} if subfolder else {}
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, **kwargs)
    except Exception as e:  # a corrupt or inconsistent checkpoint is the user's file, not our bug
        raise ModelNotFoundError(f"could not load the {what} from {path}: {_first_line(e)}") from None
    if not allow_weight_mismatch:
        _check_loading_info(info, path / subfolder if subfolder else path, what)
    return model


def _load_dir(path: Path, model_id: str, source: str, with_vae: bool,
              allow_weight_mismatch: bool = False) -> LoadedModel:
    import diffusers

    # diffusers' advice about `accelerate` and dtype casting is noise for a CLI user
    diffusers.utils.logging.set_verbosity_error()

    components: tuple[str, ...] = ()
    if (path / "model_index.json").exists():
        tdir, subfolder = path, "transformer"
        sched_file = path / "scheduler" / "scheduler_config.json"
        index = _read_json(path / "model_index.json")
        components = tuple(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)
                           and v[0] is not None and (path / k).is_dir())
    elif (path / "config.json").exists():
        tdir, subfolder = path, None
        sched_file = path / "scheduler_config.json"
    else:
        raise ModelNotFoundError(f"{path} holds neither model_index.json (a pipeline) nor config.json "
                                 "(a transformer saved with save_pretrained)")
    cfg_file = tdir / subfolder / "config.json" if subfolder else tdir / "config.json"
    if not cfg_file.exists():
        raise ModelNotFoundError(f"{path} is a pipeline without a transformer/ folder")
    class_name = _read_json(cfg_file).get("_class_name", "DiTTransformer2DModel")
    cls = getattr(diffusers, str(class_name), None)
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        raise ModelNotFoundError(f"{cfg_file} names model class {class_name!r}, unknown to diffusers "
                                 f"{diffusers.__version__}")
    transformer = _from_pretrained(cls, tdir, subfolder, "transformer", allow_weight_mismatch)
    try:
        adapter = adapter_for(transformer)
    except DithooksError:
        raise
    except Exception as e:  # an adapter that cannot read this config's geometry
        raise ModelNotFoundError(f"cannot use the {class_name} in {path}: {_first_line(e)}") from None
    sched = default_schedule(adapter)
    if sched_file.exists():
        sched.update({k: v for k, v in _read_json(sched_file).items() if not k.startswith("_")})
    vae, scale, shift = None, 1.0, 0.0
    if with_vae and (path / "vae" / "config.json").exists():
        vcfg = _read_json(path / "vae" / "config.json")
        vcls = getattr(diffusers, str(vcfg.get("_class_name", "AutoencoderKL")), None)
        if not (isinstance(vcls, type) and hasattr(vcls, "from_pretrained")):
            vcls = diffusers.AutoencoderKL
        vae = _from_pretrained(vcls, path, "vae", "VAE", allow_weight_mismatch)
        scale = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        shift = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)
    return LoadedModel(transformer, adapter, model_id, source, sched, vae, scale, shift,
                       path if components else None, components)


def default_schedule(adapter: ModelAdapter) -> dict[str, Any]:
    """The training schedule assumed when a checkpoint ships no scheduler config: the adapter's
    ``default_schedule`` (a dict, e.g. Flux's shifted flow schedule) when it has one, else DiT's
    for epsilon models and FlowMatchEulerDiscreteScheduler's defaults for flow models."""
    own = getattr(adapter, "default_schedule", None)
    if isinstance(own, dict):
        return dict(own)
    if getattr(adapter, "prediction", "epsilon") == "flow":
        return {"num_train_timesteps": 1000, "shift": 1.0}
    return dict(DIT_SCHEDULE)
