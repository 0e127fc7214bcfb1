"""Inverse problems, the full run of nbs/31_inverse: every method against the exact posterior.

Writes benchmarks/results/inverse_gmm.json (the Gaussian-mixture benchmark of Cardoso et al. 2024,
sliced Wasserstein distance to exact posterior draws) and benchmarks/results/inverse_digits.json
(the digit inpainting / super-resolution table); each records the command, date and machine.

    OMP_NUM_THREADS=1 python benchmarks/bench_inverse.py            # both, default sizes
    python benchmarks/bench_inverse.py --only gmm --dims-x 8 80 --n-measurements 20
"""
import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from simple_diffusion import pretrained
from simple_diffusion.data import load_digits
from simple_diffusion.inverse import IMAGE_TASKS, METHODS, digits_benchmark, gmm_benchmark
from simple_diffusion.metrics import load_digits_classifier

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or platform.system()}, "
            f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}, CPU")


def header(args) -> dict:
    return dict(command="python benchmarks/bench_inverse.py " + " ".join(sys.argv[1:]),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                machine=machine(), settings=vars(args))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("gmm", "digits"), default=None)
    p.add_argument("--dims-x", type=int, nargs="+", default=[8, 80])
    p.add_argument("--dims-y", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--n-measurements", type=int, nargs="+", default=[6, 2],
                   help="problems per d_y, one value per --dims-x (the last repeats)")
    p.add_argument("--n-samples", type=int, nargs="+", default=[400, 200], help="per --dims-x")
    p.add_argument("--n-reference", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--particles", type=int, nargs="+", default=[16, 8], help="TDS's N, per --dims-x")
    p.add_argument("--n-images", type=int, default=64)
    p.add_argument("--calls", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    RESULTS.mkdir(exist_ok=True)
    if args.only in (None, "gmm"):
        rows = []
        for k, dx in enumerate(args.dims_x):
            per_dx = lambda v: v[min(k, len(v) - 1)]
            t0 = time.perf_counter()
            rows += gmm_benchmark(dx, tuple(args.dims_y), per_dx(args.n_measurements),
                                  per_dx(args.n_samples), args.n_reference, args.steps, METHODS,
                                  particles=per_dx(args.particles))
            print(f"d_x={dx}: {time.perf_counter() - t0:.0f} s", flush=True)
        out = dict(header(args), rows=rows)
        (RESULTS / "inverse_gmm.json").write_text(json.dumps(out, indent=1) + "\n")
    if args.only in (None, "digits"):
        model, schedule, _ = pretrained.load("digits")
        clf = load_digits_classifier()
        train_x, _ = load_digits("train")
        test_x, test_y = load_digits("test")
        pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(0))[:args.n_images]
        t0 = time.perf_counter()
        rows = digits_benchmark(model, schedule, test_x[pick], test_y[pick], clf, train_x.mean(0),
                                IMAGE_TASKS, METHODS, calls=args.calls, mean_of=8)
        print(f"digits: {time.perf_counter() - t0:.0f} s", flush=True)
        out = dict(header(args), rows=rows)
        (RESULTS / "inverse_digits.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
