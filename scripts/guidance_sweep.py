"""Guidance on the 8x8 digits: classifier-free guidance of digits_cond over w and classifier guidance of digits over s.

    OMP_NUM_THREADS=1 python scripts/guidance_sweep.py [--n 360] [--samplers ddim ddpm]

For every row: n samples (n/10 of each class, the same x_T and per-step noise for every row), scored by the
held-out digits classifier of chapter 20 (accuracy on the requested label, mean p(requested | x), mean entropy of
p(. | x)) and by evaluate_samples against the training digits (FID, KID, IS, precision, recall, density,
coverage). Classifier guidance uses the unconditional model `digits` and the shipped time-conditioned classifier
(scripts/train_noisy_classifier.py). Writes nbs/results/guidance_digits.json after every row (the command, the
date, the machine and the settings are recorded in it); nbs/30_guidance.ipynb reads it.
"""
import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from simple_diffusion.data import load_digits
from simple_diffusion.guidance import guided_sample, load_noisy_classifier
from simple_diffusion.metrics import evaluate_samples, extract_features, load_digits_classifier
from simple_diffusion.pretrained import load
from simple_diffusion.sampling import sample

OUT = Path(__file__).resolve().parents[1] / "nbs" / "results" / "guidance_digits.json"
STEPS = {"ddim": 25, "ddpm": 50, "dpmpp2m": 25}


def scores(x, labels, clf, reference, seed):
    "Classifier scores on the requested labels and the sample metrics of chapter 20."
    _, probs = extract_features(x.clamp(-1, 1), clf)
    y = labels.numpy()
    p_req = probs[np.arange(len(y)), y]
    entropy = -(probs * np.log(np.clip(probs, 1e-12, 1))).sum(1)
    per_class = [float((probs.argmax(1) == y)[y == k].mean()) for k in range(10)]
    shuffled = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))]  # IS splits mix classes
    return dict(accuracy=float((probs.argmax(1) == y).mean()), confidence=float(p_req.mean()),
                entropy=float(entropy.mean()), accuracy_per_class=per_class,
                **evaluate_samples(shuffled, reference, classifier=clf, seed=seed))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=360, help="samples per row, a multiple of 10 (default 360, chapter 20's n)")
    ap.add_argument("--samplers", nargs="+", default=["ddim", "ddpm"], help="samplers for the CFG sweep")
    ap.add_argument("--w", type=float, nargs="+", default=[0, 0.1, 0.3, 0.5, 1, 2, 4], help="CFG weights")
    ap.add_argument("--s", type=float, nargs="+", default=[0, 1, 2, 4, 8], help="classifier-guidance scales")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cond, schedule, _ = load("digits_cond")
    uncond, _, _ = load("digits")
    clf, noisy = load_digits_classifier(), load_noisy_classifier()
    reference = load_digits("train")[0]
    labels = torch.arange(10).repeat_interleave(a.n // 10)
    x_T = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(a.seed))
    command = "OMP_NUM_THREADS=1 python scripts/guidance_sweep.py " + " ".join(
        [f"--n {a.n}", "--samplers " + " ".join(a.samplers), "--w " + " ".join(f"{w:g}" for w in a.w),
         "--s " + " ".join(f"{s:g}" for s in a.s), f"--seed {a.seed}"])
    result = dict(command=command, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
                  n=len(labels), steps=STEPS, clip_denoised=True, seed=a.seed, rows=[])

    def run(method, sampler, weight, draw):
        t0 = time.perf_counter()
        x = draw(dict(sampler=sampler, steps=STEPS[sampler], clip_denoised=True, noise=x_T,
                      generator=torch.Generator().manual_seed(a.seed + 1)))
        row = dict(method=method, sampler=sampler, steps=STEPS[sampler], weight=weight,
                   seconds=round(time.perf_counter() - t0, 1), **scores(x, labels, clf, reference, a.seed))
        result["rows"].append(row)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "accuracy_per_class"}), flush=True)

    shape = tuple(x_T.shape)
    for w in a.w:
        run("cfg", a.samplers[0], w, lambda kw: guided_sample(cond, schedule, shape, labels, w, **kw))
    for s in a.s:
        draw = (lambda kw: sample(uncond, schedule, shape, **kw)) if s == 0 else (
            lambda kw: guided_sample(uncond, schedule, shape, labels, classifier=noisy, classifier_scale=s, **kw))
        run("classifier", a.samplers[0], s, draw)
    for sampler in a.samplers[1:]:
        for w in a.w:
            run("cfg", sampler, w, lambda kw: guided_sample(cond, schedule, shape, labels, w, **kw))


if __name__ == "__main__":
    main()
