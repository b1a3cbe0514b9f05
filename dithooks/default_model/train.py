"""Training the default DiT on the real digits (epsilon prediction, DDPM loss, EMA)."""

from __future__ import annotations

import copy
import json
import math
import pathlib
import time

import torch
import torch.nn.functional as F

from .config import DEFAULT_VARIANT, NULL_CLASS, TRAIN_DEFAULTS
from .data import load_digit_images
from .model import build_noise_scheduler, build_transformer

EMA_SUBDIR = "ema"
RAW_SUBDIR = "raw"
LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "train_summary.json"


def warmup_cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for every parameter."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay warmed up so that early averages are not dominated by the random init."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


def drop_labels(labels: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each label by the null class with probability ``p`` (for classifier-free guidance)."""
    drop = torch.rand(labels.shape, generator=generator) < p
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


class EpochSampler:
    """Batches drawn without replacement from a reshuffled permutation each epoch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order = torch.empty(0, dtype=torch.int64)

    def next_indices(self) -> torch.Tensor:
        while len(self.order) < self.batch_size:
            self.order = torch.cat([self.order, torch.randperm(self.n, generator=self.generator)])
        idx, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return idx


def _load_stage(model: torch.nn.Module, ema: torch.nn.Module, folder: pathlib.Path) -> None:
    """Start from a checkpoint's plain (``raw``) and EMA weights; the architectures must match."""
    from diffusers import DiTTransformer2DModel

    for target, sub in ((model, RAW_SUBDIR), (ema, EMA_SUBDIR)):
        source = DiTTransformer2DModel.from_pretrained(folder / sub, torch_dtype=torch.float32)
        target.load_state_dict(source.state_dict(), strict=True)


def save_model_dir(model, scheduler, directory: pathlib.Path) -> None:
    """Write ``config.json`` + safetensors weights + ``scheduler_config.json`` to ``directory``."""
    model.save_pretrained(directory)
    scheduler.save_pretrained(directory)


def train_default_model(
    out_dir,
    *,
    seed: int = 0,
    train_steps: int = 3300,
    batch_size: int = TRAIN_DEFAULTS["batch_size"],
    threads: int = 1,
    progress: bool = True,
    log_every: int = 50,
    checkpoint_every: int = 500,
    lr: float = TRAIN_DEFAULTS["lr"],
    variant: str = DEFAULT_VARIANT,
    init_from=None,
    warmup_steps: int | None = None,
) -> dict:
    """Train the default DiT and write it to ``out_dir``.

    ``out_dir/ema`` and ``out_dir/raw`` each hold a ``from_pretrained``-loadable model folder
    (EMA and plain weights); ``out_dir/checkpoints/step_N/{ema,raw}`` hold periodic snapshots
    so partial progress can be evaluated; ``train_log.jsonl`` has one line per ``log_every``
    steps. Returns the training summary (also written to ``train_summary.json``).

    ``init_from``: a checkpoint folder (``.../checkpoints/step_N`` or a run folder) whose ``raw``
    and ``ema`` weights start this run (a second stage with a fresh optimiser and schedule).
    """
    torch.set_num_threads(threads)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = dict(TRAIN_DEFAULTS, batch_size=batch_size, lr=lr)

    images, labels = load_digit_images()
    model = build_transformer(seed, variant)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    ema_offset = 0  # a second stage continues the EMA's warm-up where the first stage left it
    if init_from is not None:
        _load_stage(model, ema, pathlib.Path(init_from))
        name = pathlib.Path(init_from).name
        ema_offset = int(name.split("_")[-1]) if name.startswith("step_") else 0
    if warmup_steps is not None:
        cfg["warmup_steps"] = warmup_steps
    scheduler = build_noise_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod.float()
    num_timesteps = scheduler.config.num_train_timesteps

    gen = torch.Generator().manual_seed(seed)
    batches = EpochSampler(len(labels), batch_size, gen)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=cfg["betas"], weight_decay=cfg["weight_decay"]
    )
    lr_at = lambda step: warmup_cosine_factor(  # noqa: E731
        step, train_steps, min(cfg["warmup_steps"], max(1, train_steps // 10)), cfg["min_lr_ratio"]
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)

    log_path = out_dir / LOG_NAME
    log_file = log_path.open("w")
    model.train()
    t_start = time.perf_counter()
    running, running_n = 0.0, 0
    for step in range(train_steps):
        idx = batches.next_indices()
        x0 = images[idx]
        y = drop_labels(labels[idx], cfg["label_dropout"], gen)
        t = torch.randint(0, num_timesteps, (batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise

        pred = model(x_t, timestep=t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        lr_schedule.step()
        update_ema(ema, model, ema_decay_at(step + ema_offset, cfg["ema_decay"]))

        running += loss.item()
        running_n += 1
        done = step + 1
        if done % log_every == 0 or done == train_steps:
            elapsed = time.perf_counter() - t_start
            record = dict(
                step=done,
                loss=running / running_n,
                lr=optimizer.param_groups[0]["lr"],
                images_seen=done * batch_size,
                elapsed_s=round(elapsed, 2),
                img_per_s=round(done * batch_size / elapsed, 1),
            )
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            if progress:
                print(
                    f"step {done}/{train_steps} loss {record['loss']:.4f} lr {record['lr']:.2e} "
                    f"{record['img_per_s']} img/s {elapsed / 60:.1f} min",
                    flush=True,
                )
            running, running_n = 0.0, 0
        if checkpoint_every and done % checkpoint_every == 0 and done < train_steps:
            ckpt = out_dir / "checkpoints" / f"step_{done:06d}"
            save_model_dir(ema, scheduler, ckpt / EMA_SUBDIR)
            save_model_dir(model, scheduler, ckpt / RAW_SUBDIR)
    log_file.close()
    wall_s = time.perf_counter() - t_start

    model.eval()
    save_model_dir(ema, scheduler, out_dir / EMA_SUBDIR)
    save_model_dir(model, scheduler, out_dir / RAW_SUBDIR)
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    summary = dict(
        seed=seed,
        variant=variant,
        init_from=None if init_from is None else str(init_from),
        train_steps=train_steps,
        batch_size=batch_size,
        images_seen=train_steps * batch_size,
        epochs=train_steps * batch_size / len(labels),
        threads=threads,
        wall_s=round(wall_s, 1),
        final_loss=records[-1]["loss"],
        recipe={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        scheduler=dict(scheduler.config),
    )
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
