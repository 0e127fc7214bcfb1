"""Sampler error isolated from model error: every sampler driven by the exact denoiser of a Gaussian mixture.

Ours at their defaults (only `sampler` and `steps` given) and with every spacing, against diffusers'
DPMSolverMultistepScheduler (DPM-Solver++ 2M and 3M), UniPCMultistepScheduler, DEISMultistepScheduler and
DDIMScheduler at their defaults (trained_betas = our betas; DDIM needs clip_sample=False, since its
default clips x̂_0 to [-1, 1], which is not the data range here), all run in this process on the same
oracle and the same x_T (float32). Mixtures: the 8-Gaussian ring, the 5x5 grid, a five-component 2-D
mixture with components as narrow as σ = 0.05, and a 10-D mixture; the DDPM linear and the cosine
schedules (T = 1000). Metrics, each the mean (and sd) over --seeds runs of --n samples: the sliced
Wasserstein-1 distance (--projections directions) to fresh true samples, MMD² (Gaussian kernel, h = half
the smallest component sd, on the first 2000 samples) and the mean exact log-likelihood (vs −H(p)). The
noise floors (true vs true) are reported with them.

Goals (issue 11): our best sampler at its defaults <= 0.8x diffusers' best at 10 NFE and within 10 % of
the floor at 20 NFE; no sampler of ours at its defaults worse than 1.2x its diffusers counterpart.

    python benchmarks/bench_sampler_error.py [--n 4000] [--seeds 3] [--nfe 5 10 20 50] [--out FILE]
    in parallel: one process per --mixtures M (--out part_M.json), then --merge part_*.json --out FILE
    FULL: --n 8000 --seeds 5 --projections 1000
Writes a JSON results file (the command, the date and the machine included) when --out is given.
"""
import argparse
import datetime
import json
import math
import platform
import sys
import time

import numpy as np
import torch

from simple_diffusion.data import GaussianMixture, toy_mixture
from simple_diffusion.metrics import mmd2_rbf
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.sampling import SAMPLERS, SPACINGS, sample
from simple_diffusion.schedules import NoiseSchedule


def mixtures() -> dict:
    "The benchmark's exact data distributions."
    g = torch.Generator().manual_seed(0)
    narrow = GaussianMixture(torch.tensor([[0.0, 0.0], [1.2, 0.3], [-0.9, 1.0], [-0.4, -1.3], [1.0, -1.1]]),
                             torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3]),
                             torch.tensor([0.3, 0.2, 0.2, 0.15, 0.15], dtype=torch.float64))
    means10 = torch.randn(6, 10, generator=g, dtype=torch.float64) * 0.7
    high = GaussianMixture(means10, torch.full((6,), 0.1, dtype=torch.float64))
    return {"ring": toy_mixture("gmm8"), "grid": toy_mixture("gmm25"), "narrow": narrow, "10-D": high}


def sliced_w1(x, y, projections=500, seed=0) -> float:
    "Sliced Wasserstein-1 distance between two equal-size sets [N, D] (random unit directions, sorted projections)."
    x, y = x.double().reshape(len(x), -1), y.double().reshape(len(y), -1)
    d = torch.randn(x.shape[1], projections, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    d = d / d.norm(dim=0)
    return float(((x @ d).sort(0).values - (y @ d).sort(0).values).abs().mean())


@torch.no_grad()
def diffusers_sample(scheduler, model, x_T, steps):
    "The plain diffusers loop: set_timesteps, then model + step per timestep."
    scheduler.set_timesteps(steps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(len(x)).long()), t, x).prev_sample
    return x


def diffusers_solvers(betas) -> dict:
    "diffusers' multistep solvers at their defaults (and DDIM without its [-1, 1] clipping)."
    import diffusers as d
    return {"dpm++2m": lambda: d.DPMSolverMultistepScheduler(trained_betas=betas, solver_order=2),
            "dpm++3m": lambda: d.DPMSolverMultistepScheduler(trained_betas=betas, solver_order=3),
            "unipc": lambda: d.UniPCMultistepScheduler(trained_betas=betas),
            "deis": lambda: d.DEISMultistepScheduler(trained_betas=betas),
            "ddim": lambda: d.DDIMScheduler(trained_betas=betas, clip_sample=False)}


def metrics(x, mix, ref, bandwidth, projections):
    "(SW1, MMD², mean log p) of samples x against the true set ref."
    x = x.double()
    return (sliced_w1(x, ref, projections), mmd2_rbf(x[:2000], ref[:2000], bandwidth),
            float(mix.log_prob(x.reshape(len(x), -1)).mean()))


def run(args) -> dict:
    torch.set_num_threads(1)
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} thread(s)", "n": args.n, "seeds": args.seeds, "nfe": args.nfe,
           "metrics": ["sw1", "mmd2", "loglik"], "results": {}, "floor": {}, "neg_entropy": {}}
    ours = {f"ours {s}": dict(sampler=s) for s in SAMPLERS}
    if args.spacings:
        ours.update({f"ours {s} {sp}": dict(sampler=s, spacing=sp) for s in SAMPLERS for sp in SPACINGS})
    t0 = time.perf_counter()
    for mname, mix in mixtures().items():
        if args.mixtures and mname not in args.mixtures: continue
        h = 0.5 * float(mix.stds.min())
        for sname in args.schedules:
            sched = NoiseSchedule.from_name(sname, 1000)
            oracle = GaussianMixtureOracle(mix, sched)
            theirs = diffusers_solvers(sched.betas.numpy()) if not args.no_diffusers else {}
            key = f"{mname}/{sname}"
            g = torch.Generator().manual_seed(123)
            floors = []
            for seed in range(args.seeds):
                a, b = mix.sample(args.n, g)[0], mix.sample(args.n, g)[0]
                floors.append(metrics(a, mix, b, h, args.projections))
            out["floor"][key] = np.mean(floors, 0).tolist()
            out["neg_entropy"][key] = float(mix.log_prob(mix.sample(100_000, g)[0]).mean())
            res = out["results"].setdefault(key, {})
            for nfe in args.nfe:
                for seed in range(args.seeds):
                    ref = mix.sample(args.n, torch.Generator().manual_seed(1000 + seed))[0]
                    x_T = torch.randn(args.n, mix.dim, generator=torch.Generator().manual_seed(seed))
                    runs = {name: (lambda kw=kw: sample(oracle, sched, x_T.shape, steps=nfe, noise=x_T,
                                                        generator=torch.Generator().manual_seed(seed), **kw))
                            for name, kw in ours.items()}
                    runs.update({f"diffusers {n}": (lambda m=m: diffusers_sample(m(), oracle, x_T, nfe))
                                 for n, m in theirs.items()})
                    for name, fn in runs.items():
                        try: x = fn()
                        except ValueError: continue                         # a combination we refuse
                        res.setdefault(name, {}).setdefault(str(nfe), []).append(metrics(x, mix, ref, h, args.projections))
            print(f"{key}: done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def summarise(out, metric="sw1") -> str:
    "A text table of mean ± sd per sampler and NFE, and the goal ratios."
    m = out["metrics"].index(metric)
    lines = []
    for key, res in out["results"].items():
        negH = out["neg_entropy"][key]
        # the log-likelihood is not a distance: rank by its gap to -H(p)
        err = (lambda r: abs(r[m] - negH)) if metric == "loglik" else (lambda r: r[m])
        floor = err(out["floor"][key])
        lines.append(f"\n{key}: {metric}, floor {floor:.4f}" + (f" (ranked by |mean log p + H(p)|, −H(p) = {negH:.3f})"
                                                                 if metric == "loglik" else ""))
        lines.append(f"{'sampler':28s}" + "".join(f"{'NFE ' + n:>17s}" for n in map(str, out["nfe"])))
        for name, per in res.items():
            cells = [per.get(str(n)) for n in out["nfe"]]
            lines.append(f"{name:28s}" + "".join(f"{np.mean([r[m] for r in c]):>10.4f} ±{np.std([r[m] for r in c]):.4f}"
                                                 if c else f"{'–':>17s}" for c in cells))
        for nfe in (10, 20):
            if str(nfe) not in map(str, out["nfe"]): continue
            mean = lambda name: np.mean([err(r) for r in res[name][str(nfe)]])
            mine = [n for n in res if n.startswith("ours") and len(n.split()) == 2]
            theirs = [n for n in res if n.startswith("diffusers")]
            if not mine: continue
            best = min(mine, key=mean)
            line = f"NFE {nfe}: our best at defaults {best} {mean(best):.4f}"
            if theirs:
                tb = min(theirs, key=mean)
                line += f"; diffusers' best {tb} {mean(tb):.4f}; ratio {mean(best) / mean(tb):.2f}"
            line += f"; / floor {mean(best) / floor:.2f}"
            for a, b in (("ours ddim", "diffusers ddim"), ("ours dpmpp2m", "diffusers dpm++2m"),
                         ("ours dpmpp3m", "diffusers dpm++3m"), ("ours unipc", "diffusers unipc")):
                if a in res and b in res: line += f"; {a.split()[1]} vs diffusers {mean(a) / mean(b):.2f}"
            lines.append(line)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--projections", type=int, default=500)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--mixtures", nargs="*", default=None, help="subset of ring, grid, narrow, 10-D")
    p.add_argument("--schedules", nargs="+", default=["linear", "cosine"])
    p.add_argument("--spacings", action="store_true", help="also run every sampler with every spacing")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--summarise", default=None, help="only print the tables of an existing results file")
    p.add_argument("--merge", nargs="+", default=None,
                   help="merge results files of runs on disjoint --mixtures (one process each) into --out")
    args = p.parse_args()
    if args.merge:
        parts = [json.load(open(f)) for f in args.merge]
        out = dict(parts[0])
        for key in ("results", "floor", "neg_entropy"):
            out[key] = {k: v for part in parts for k, v in part[key].items()}
        out["command"] = " ; ".join(part["command"] for part in parts) + " ; then --merge"
        out["date"] = min(part["date"] for part in parts)
        for metric in out["metrics"]: print(summarise(out, metric))
        if args.out:
            with open(args.out, "w") as f: json.dump(out, f, indent=1)
        return
    if args.summarise:
        out = json.load(open(args.summarise))
        for metric in out["metrics"]: print(summarise(out, metric))
        return
    out = run(args)
    for metric in out["metrics"]: print(summarise(out, metric))
    if args.out:
        with open(args.out, "w") as f: json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
