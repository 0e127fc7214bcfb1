"""Train the time-conditioned digits classifier p_φ(y | x_t) used for classifier guidance and ship it.

    OMP_NUM_THREADS=1 python scripts/train_noisy_classifier.py --steps 3000 --width 128 --seed 0

writes simple_diffusion/weights/digits_noisy_classifier.safetensors and digits_noisy_classifier.json
(configuration, seed, steps, time taken, the command, and the held-out accuracy at several t).
See nbs/30_guidance.ipynb.
"""
import argparse
import json
import platform

import torch

from simple_diffusion.data import load_digits
from simple_diffusion.forward import q_sample
from simple_diffusion.guidance import save_noisy_classifier, train_noisy_classifier
from simple_diffusion.schedules import NoiseSchedule


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000, help="optimiser steps (default 3000)")
    ap.add_argument("--width", type=int, default=128, help="hidden width (default 128)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, batches, t and noise (default 0)")
    ap.add_argument("--out", default=None, help="output .safetensors path (default: the package's shipped weights)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    schedule = NoiseSchedule.from_name("cosine", 1000)            # the schedule of digits and digits_cond
    (xtr, ytr), (xte, yte) = load_digits("train"), load_digits("test")
    net, info = train_noisy_classifier(xtr, ytr, schedule, steps=args.steps, seed=args.seed, width=args.width)
    g, acc = torch.Generator().manual_seed(1), {}
    for t in (0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 999):
        tt = torch.full((len(xte),), t)
        xt = q_sample(schedule, xte, tt, torch.randn(xte.shape, generator=g))
        acc[str(t)] = round(float((net(xt, tt).argmax(1) == yte).float().mean()), 4)
    info.update(schedule="cosine", num_timesteps=1000, data="digits (train split)", test_accuracy_at_t=acc,
                command=f"OMP_NUM_THREADS=1 python scripts/train_noisy_classifier.py --steps {args.steps} "
                        f"--width {args.width} --seed {args.seed}",
                machine=platform.platform(), torch_version=torch.__version__)
    path = save_noisy_classifier(net, info, args.out)
    print(json.dumps(info, indent=1))
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} kB) and {path.with_suffix('.json').name}")


if __name__ == "__main__":
    main()
