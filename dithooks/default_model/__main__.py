"""``python -m dithooks.default_model {train,evaluate,ship}``: reproduce the default model.

    python -m dithooks.default_model train --out runs/default_model
    python -m dithooks.default_model evaluate --model runs/default_model/ema --json runs/eval_ema.json
    python -m dithooks.default_model ship --model runs/default_model/ema
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dithooks.default_model")
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="train the default DiT on the real digits")
    p_train.add_argument("--out", required=True, type=pathlib.Path)
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--steps", type=int, default=None)
    p_train.add_argument("--batch-size", type=int, default=128)
    p_train.add_argument("--threads", type=int, default=1)
    p_train.add_argument("--log-every", type=int, default=50)
    p_train.add_argument("--checkpoint-every", type=int, default=500)
    p_train.add_argument("--variant", default="digits", help="embedded model: digits (4x4 tokens) or digits64 (8x8)")
    p_train.add_argument("--lr", type=float, default=None)
    p_train.add_argument("--init-from", type=pathlib.Path, default=None,
                         help="checkpoint folder (with raw/ and ema/) to start a second stage from")
    p_train.add_argument("--warmup-steps", type=int, default=None)

    p_eval = sub.add_parser("evaluate", help="classify DDIM samples of a model folder")
    p_eval.add_argument("--model", type=pathlib.Path, default=None, help="default: shipped weights")
    p_eval.add_argument("--per-class", type=int, default=50)
    p_eval.add_argument("--guidance", type=float, nargs="*", default=[1.5, 3.0])
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--threads", type=int, default=1)
    p_eval.add_argument("--json", type=pathlib.Path, default=None, help="also write results here")
    p_eval.add_argument("--grid", type=pathlib.Path, default=None, help="write a sample grid PNG")
    p_eval.add_argument(
        "--plain-eps", action="store_true",
        help="DDIM step without use_clipped_model_output (diffusers' default; breaks guidance)",
    )

    p_cls = sub.add_parser("train-classifier", help="train and ship the digits classifier")
    p_cls.add_argument("--seed", type=int, default=0)
    p_cls.add_argument("--out", type=pathlib.Path, default=None, help="default: shipped folder")
    p_cls.add_argument("--threads", type=int, default=1)

    p_ship = sub.add_parser("ship", help="copy a trained model folder into the package")
    p_ship.add_argument("--model", required=True, type=pathlib.Path)
    p_ship.add_argument("--variant", default="digits", help="embedded model the weights become: digits or digits64")

    p_plot = sub.add_parser("plot-loss", help="plot train_log.jsonl to a PNG")
    p_plot.add_argument("--log", required=True, type=pathlib.Path)
    p_plot.add_argument("--png", required=True, type=pathlib.Path)

    args = parser.parse_args(argv)
    import torch

    # One thread unless asked otherwise: the machine's other core belongs to other work.
    torch.set_num_threads(getattr(args, "threads", 1))
    if args.command == "train":
        from .train import train_default_model

        kwargs = {} if args.steps is None else {"train_steps": args.steps}
        if args.lr is not None:
            kwargs["lr"] = args.lr
        summary = train_default_model(
            args.out, seed=args.seed, batch_size=args.batch_size, threads=args.threads,
            log_every=args.log_every, checkpoint_every=args.checkpoint_every,
            variant=args.variant, init_from=args.init_from, warmup_steps=args.warmup_steps, **kwargs,
        )
        print(json.dumps({k: v for k, v in summary.items() if k != "scheduler"}, indent=2))
    elif args.command == "evaluate":
        from .evaluate import evaluate_default_model

        result = evaluate_default_model(
            args.model, per_class=args.per_class, guidance_scales=tuple(args.guidance),
            seed=args.seed, threads=args.threads, grid_path=args.grid, clipped_eps=not args.plain_eps,
        )
        text = json.dumps(result, indent=2)
        print(text)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(text + "\n")
    elif args.command == "train-classifier":
        from .classifier import train_and_save_digits_classifier

        print(json.dumps(train_and_save_digits_classifier(args.out, seed=args.seed), indent=2))
    elif args.command == "ship":
        from .weights_io import ship_model_dir

        from .weights_io import default_model_dir

        print(ship_model_dir(args.model, default_model_dir(args.variant)))
    elif args.command == "plot-loss":
        from .plots import plot_loss_curve

        plot_loss_curve(args.log, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
