"""The default spacings on a trained model: the shipped digits ε-model (`pretrained.load("digits")`).

For DPM-Solver++(2M), 3M and UniPC at 5, 10 and 20 steps, with 'trailing-capped' and 'blend': the FID of the
samples (shipped classifier, `evaluate_samples`, x̂_0 clipped as chapter 20 samples this model) against the
training digits, paired by x_T over --seeds seeds of --n samples, and the FID of the model's own
probability-flow ODE (2M over --converged steps); and the pathwise RMS distance to that ODE's x_0 from the
same x_T and the same start (`ode_reference`, unclipped, --n-rms samples). Both rules start at σ/α = 20, so
every run shares one reference. Each run is also scored with its first-order last step, x̂_0 of the last
step (the trajectory's last prediction), in place of the second-order one of Eq. (eq-sampling-final), which
the multistep solvers take where ς of the step before the last is <= FINAL_SIGMA ("... first-order" keys).

With --ddim: DDIM instead, with 'trailing-capped' and 'midpoint' (its default from MIDPOINT_FROM steps), at
--nfe steps (there: 5, 10, 20, 50), and at its default ("default": spacing=None, which below MIDPOINT_FROM
steps is 'trailing-capped' ending at code t = 0, end='t0', Eq. eq-sampling-end), scored the same way.

    python benchmarks/bench_digits_spacings.py [--n 1000] [--seeds 3] [--out FILE]
    python benchmarks/bench_digits_spacings.py --ddim --nfe 5 10 20 50 --out FILE
"""
import argparse
import datetime
import json
import platform
import sys
import time

import numpy as np
import torch

from simple_diffusion import pretrained
from simple_diffusion.data import load_digits
from simple_diffusion.metrics import evaluate_samples, load_digits_classifier
from simple_diffusion.sampling import SIGMA_MAX_EPS, ode_reference, sample, space_timesteps

RULES = ("trailing-capped", "blend")
SOLVERS = ("dpmpp2m", "dpmpp3m", "unipc")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-rms", type=int, default=500)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--converged", type=int, default=200)
    p.add_argument("--out", default=None)
    p.add_argument("--ddim", action="store_true", help="DDIM with 'trailing-capped' and 'midpoint' instead")
    args = p.parse_args()
    rules, solvers = (("trailing-capped", "midpoint", "default"), ("ddim",)) if args.ddim else (RULES, SOLVERS)
    spacing_of = lambda sp: None if sp == "default" else sp
    torch.set_num_threads(1)
    net, sched, cfg = pretrained.load("digits", device="cpu")
    xtr, clf = load_digits("train")[0], load_digits_classifier()
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}, 1 thread",
           "n": args.n, "seeds": args.seeds, "n_rms": args.n_rms, "nfe": args.nfe, "converged": args.converged,
           "fid": {}, "rms": {}}
    fid = lambda x: evaluate_samples(x, xtr, classifier=clf, kid_subsets=2)["fid"]
    kw = dict(prediction=cfg.prediction)
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        x_T = torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        out["fid"].setdefault("converged", []).append(
            fid(sample(net, sched, x_T.shape, "dpmpp2m", args.converged, spacing="blend", noise=x_T,
                       clip_denoised=True, **kw)))
        for s in solvers:
            for nfe in args.nfe:
                for sp in rules:
                    x, tr = sample(net, sched, x_T.shape, s, nfe, spacing=spacing_of(sp), noise=x_T, clip_denoised=True,
                                   return_trajectory=True, **kw)
                    out["fid"].setdefault(f"{s} {nfe} {sp}", []).append(fid(x))
                    out["fid"].setdefault(f"{s} {nfe} {sp} first-order", []).append(fid(tr.pred_x0[-1]))
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    x_T = torch.randn(args.n_rms, 1, 8, 8, generator=torch.Generator().manual_seed(100))
    top = int(space_timesteps(len(sched), 10, "blend", sched.alphas_cumprod, sigma_max=SIGMA_MAX_EPS)[-1])
    with torch.no_grad():
        ref = ode_reference(net, sched, x_T, top, **kw)
    for s in solvers:
        for nfe in args.nfe:
            for sp in rules:
                x, tr = sample(net, sched, x_T.shape, s, nfe, spacing=spacing_of(sp), noise=x_T, return_trajectory=True,
                               **kw)
                assert int(tr.timesteps[0]) == top
                for key, y in ((f"{s} {nfe} {sp}", x), (f"{s} {nfe} {sp} first-order", tr.pred_x0[-1])):
                    d = (y - ref).flatten(1).norm(dim=1)
                    out["rms"][key] = float(d.pow(2).mean().sqrt())
                    out.setdefault("median", {})[key] = float(d.median())
    for k, v in out["fid"].items():
        print(f"FID {k:28s} {np.mean(v):.3f}  per seed {np.round(v, 3).tolist()}")
    for k, v in out["rms"].items():
        print(f"RMS {k:28s} {v:.3f}")
    if args.out:
        with open(args.out, "w") as f: json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
