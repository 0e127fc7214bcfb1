"""Retrain the digits classifier behind the sample metrics and write the shipped weights.

    python scripts/train_digits_classifier.py --steps 1000 --seed 0

writes simple_diffusion/weights/digits_classifier.safetensors and digits_classifier.json
(configuration, seed, steps, time taken, train and test accuracy). See nbs/20_metrics.ipynb.
"""
import argparse
import json

import torch

from simple_diffusion.metrics import save_digits_classifier, train_digits_classifier


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="optimiser steps (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, batches, shifts and dropout (default 0)")
    ap.add_argument("--out", default=None, help="output .safetensors path (default: the package's shipped weights)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, info = train_digits_classifier(steps=args.steps, seed=args.seed, progress=True)
    info["command"] = f"python scripts/train_digits_classifier.py --steps {args.steps} --seed {args.seed}"
    path = save_digits_classifier(net, info, args.out)
    print(json.dumps(info, indent=1))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB) and {path.with_suffix('.json').name}")
    if info["test_accuracy"] < 0.97:
        raise SystemExit(f"test accuracy {info['test_accuracy']:.4f} < 0.97: do not ship these weights")


if __name__ == "__main__":
    main()
