"""Where the shipped weights live, and loading / shipping them."""

from __future__ import annotations

import json
import pathlib

import torch

from ..errors import ModelNotFoundError

#: Files that make up a shipped model folder (``save_pretrained`` of model and scheduler).
MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json")


def default_model_dir(variant: str = "digits") -> pathlib.Path:
    """The folder with a shipped embedded model (``digits``: also the digits classifier weights;
    ``digits64``: the 8x8-token model in ``weights/digits64``)."""
    from .config import VARIANTS

    if variant not in VARIANTS:
        raise ModelNotFoundError(f"unknown embedded model {variant!r}; choose one of {', '.join(VARIANTS)}")
    base = pathlib.Path(__file__).resolve().parent / "weights"
    return base if variant == "digits" else base / variant


def load_transformer_from(directory):
    """``DiTTransformer2DModel.from_pretrained(directory)`` in fp32 and eval mode."""
    from diffusers import DiTTransformer2DModel

    directory = pathlib.Path(directory)
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(f"no diffusers model folder at {directory} (config.json missing)")
    return DiTTransformer2DModel.from_pretrained(directory, torch_dtype=torch.float32).eval()


def load_scheduler_config_from(directory) -> dict:
    """The training noise schedule config saved next to a model."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.load_config(pathlib.Path(directory))


def ship_model_dir(source, target=None) -> pathlib.Path:
    """Copy a trained model folder into the package (default target), weights stored as fp16.

    fp16 storage halves the package size (~5.5 MB instead of ~11 MB); loading through
    :func:`load_transformer_from` casts back to fp32, and the shipped numbers in the model card
    are measured on these rounded weights.
    """
    from diffusers import DiTTransformer2DModel

    source = pathlib.Path(source)
    target = default_model_dir() if target is None else pathlib.Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model = DiTTransformer2DModel.from_pretrained(source, torch_dtype=torch.float16)
    model.save_pretrained(target)
    # save_pretrained records the training run's local path; it means nothing once shipped.
    config_path = target / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("_name_or_path", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # The shipped schedule records the DDIM spacing the model was evaluated with (older run
    # folders saved diffusers' default "leading").
    from diffusers import DDPMScheduler

    from .config import DDIM_TIMESTEP_SPACING

    scheduler_config = DDPMScheduler.load_config(source)
    DDPMScheduler.from_config(scheduler_config, timestep_spacing=DDIM_TIMESTEP_SPACING).save_pretrained(target)
    return target
