"""Label accuracy of the embedded model's samples through dithooks' own sampler (the path every
command takes), judged by the shipped digits classifier.

    python benchmarks/default_model_quality.py [--per-class 20] [--guidance 1 1.5]
"""

import argparse
import time

import torch

from dithooks.default_model import load_digits_classifier
from dithooks.loading import load_model
from dithooks.sampling import Sampler, SamplerSpec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5])
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded, clf = load_model(), load_digits_classifier()
    labels = [c for c in range(10) for _ in range(args.per_class)]
    seeds = list(range(len(labels)))
    for g in args.guidance:
        t0 = time.time()
        x = Sampler(loaded, SamplerSpec("ddim", args.steps, guidance=g)).run(labels, seeds)
        with torch.no_grad():
            pred = clf(x.clamp(-1, 1)).argmax(1)
        acc = (pred == torch.tensor(labels)).float().mean().item()
        print(f"guidance {g}: accuracy {acc:.3f} on {len(labels)} samples, DDIM {args.steps} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
