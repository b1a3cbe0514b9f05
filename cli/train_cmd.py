"""``dithooks train-default``: retrain the embedded digits DiT (see docs/model_card.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dithooks.errors import DithooksError

from . import run_options as ro
from .output import print_json, user_errors


def train_default(
    out: Path = typer.Option(Path("runs/default_model"), "--out", "-o", help="Training run folder (checkpoints, log, final and EMA weights)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimiser steps (default: the recipe in docs/model_card.md)."),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(128, "--batch-size"),
    threads: int = typer.Option(1, "--threads", help="torch threads."),
    evaluate: bool = typer.Option(True, "--evaluate/--no-evaluate", help="Classify DDIM samples of the result."),
    per_class: int = typer.Option(50, "--per-class", help="Samples per class for the evaluation."),
    ship: bool = typer.Option(False, "--ship", help="Copy the EMA weights into the installed package (becomes the default model)."),
    variant: str = typer.Option("digits", "--variant", help="Which embedded model: digits (4x4 tokens, patch 2) or digits64 (8x8 tokens, patch 1)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Retrain the embedded digits DiT from scratch with a fixed seed (see docs/model_card.md)."""
    import torch

    from dithooks.default_model import evaluate_default_model, train_default_model
    from dithooks.default_model.config import VARIANTS
    from dithooks.default_model.weights_io import default_model_dir, ship_model_dir

    if variant not in VARIANTS:
        raise DithooksError(f"unknown embedded model {variant!r}; choose one of {', '.join(VARIANTS)}")
    for value, option in ((steps, "--steps"), (batch_size, "--batch-size"), (threads, "--threads"),
                          (per_class, "--per-class")):
        if value is not None and value < 1:
            raise DithooksError(f"{option} must be at least 1, got {value}")
    if not 0 <= seed <= ro.MAX_SEED:
        raise DithooksError(f"--seed must be in 0-{ro.MAX_SEED}, got {seed}")
    if out.exists() and not out.is_dir():
        raise DithooksError(f"--out {out} is a file, not a folder")
    torch.set_num_threads(threads)
    kwargs = {} if steps is None else {"train_steps": steps}
    summary = train_default_model(out, seed=seed, batch_size=batch_size, threads=threads, variant=variant, **kwargs)
    result = {"train": {k: v for k, v in summary.items() if k != "scheduler"}}
    model_dir = out / "ema" if (out / "ema").exists() else out
    if evaluate:
        result["evaluation"] = evaluate_default_model(model_dir, per_class=per_class, seed=seed, threads=threads)
    if ship:
        result["shipped_to"] = str(ship_model_dir(model_dir, default_model_dir(variant)))
    if as_json:
        print_json(result)
    else:
        typer.echo(f"trained {out}")
        for k, v in result.get("evaluation", {}).items():
            if not isinstance(v, (dict, list)):
                typer.echo(f"  {k}: {v}")


def register(app: typer.Typer) -> None:
    """Add ``train-default`` to the ``dithooks`` app."""
    app.command("train-default")(user_errors(train_default))
