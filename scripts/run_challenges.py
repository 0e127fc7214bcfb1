"""The full measurements of the chapter "Frontiers: the three challenges measured" (nbs/40_challenges.ipynb).

Writes benchmarks/results/challenges.json and challenges_efficiency.json (each with the command, the date and the
machine), which the chapter reads:
mode coverage of a DDPM, a GAN and PacGAN4 on the 25-Gaussian grid and the 8-Gaussian ring (VEEGAN/PacGAN
protocol, several seeds), where diffusion loses modes (NFE, training length, tiny data), sampling efficiency
(oracle error and digits FID vs NFE and wall time, progressive distillation 64 -> 4 of the digits U-Net),
and computational cost (parameters, FLOPs per call, training throughput and activation memory, fitted exponents).

    OMP_NUM_THREADS=1 python scripts/run_challenges.py --only cost,coverage,failure --out challenges.json
    OMP_NUM_THREADS=1 python scripts/run_challenges.py --only efficiency --out challenges_efficiency.json

Together they take about 15 CPU-minutes (longer on a loaded machine); --quick runs every code path in a few minutes
(not for the book). The two commands may run at the same time: they write different files.
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
from simple_diffusion.challenges import (activation_bytes, compare_coverage, fit_power_law, flops_per_call, grid25,
                                         mode_coverage, progressive_distillation, ring8, standardise, summarise,
                                         train_ddpm, train_images_per_s)
from simple_diffusion.data import GaussianMixture, load_digits
from simple_diffusion.metrics import evaluate_samples, load_digits_classifier
from simple_diffusion.nets import MLPDenoiser, count_parameters, make_unet
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.sampling import SpacedSchedule, sample
from simple_diffusion.schedules import NoiseSchedule

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
OUT = RESULTS / "challenges.json"


def write(res):
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(OUT)


def log(*a): print(time.strftime("%H:%M:%S"), *a, flush=True)


def cost(res, quick):
    t = lambda b: torch.zeros(b, dtype=torch.long)
    c = res["cost"] = {}
    net = make_unet("cifar").eval()
    c["cifar"] = dict(params=count_parameters(net), flops=flops_per_call(net, torch.randn(1, 3, 32, 32), t(1)))
    digits, _, _ = pretrained.load("digits")
    c["digits"] = dict(params=count_parameters(digits, trainable_only=False), flops=flops_per_call(digits, torch.randn(1, 1, 8, 8), t(1)))
    mlp = MLPDenoiser(2, hidden=128, depth=3)
    c["mlp"] = dict(params=count_parameters(mlp), flops=flops_per_call(mlp, torch.randn(1, 2), t(1)))
    res_list = [8, 16, 32] if quick else [8, 16, 32, 64]
    c["resolution"] = [dict(res=r, flops=flops_per_call(make_unet("digits", base_channels=16).eval(), torch.randn(1, 1, r, r), t(1)))
                       for r in res_list]
    c["width"] = [dict(base_channels=w, params=count_parameters(make_unet("digits", base_channels=w)),
                       flops=flops_per_call(make_unet("digits", base_channels=w).eval(), torch.randn(1, 1, 8, 8), t(1)))
                  for w in (8, 16, 32, 64)]
    c["flops_vs_res_exponent"] = fit_power_law([d["res"] for d in c["resolution"]], [d["flops"] for d in c["resolution"]])[0]
    c["flops_vs_width_exponent"] = fit_power_law([d["base_channels"] for d in c["width"]], [d["flops"] for d in c["width"]])[0]
    sched = NoiseSchedule.from_name("cosine", 1000)
    steps = 2 if quick else 8
    thr = []
    for r, bs in [(8, 16), (8, 64), (8, 256), (16, 64), (32, 64)]:
        x = load_digits("train", size=r)[0]
        torch.manual_seed(0)
        net = make_unet("digits", base_channels=16)
        ips = train_images_per_s(net, sched, x, batch_size=bs, steps=steps, warmup=1)
        act = activation_bytes(net.train(), x[:bs], t(bs))
        thr.append(dict(res=r, batch_size=bs, images_per_s=ips, activation_mb=act / 2**20))
        log("throughput", r, bs, round(ips, 1))
    c["throughput"] = thr
    at64 = [d for d in thr if d["batch_size"] == 64]
    c["time_per_image_vs_res_exponent"] = fit_power_law([d["res"] for d in at64], [1 / d["images_per_s"] for d in at64])[0]
    c["activation_vs_res_exponent"] = fit_power_law([d["res"] for d in at64], [d["activation_mb"] for d in at64])[0]


def coverage(res, seeds, steps, hidden, quick):
    res["coverage"] = {}
    for name, mix in (("grid25", grid25()), ("ring8", ring8())):
        samplers = (("ddpm", 1000), ("ddim", 50), ("dpmpp2m", 20), ("ddim", 10)) if not quick else (("ddim", 20),)
        rows = compare_coverage(mix, seeds, steps=steps, batch_size=256, hidden=hidden, depth=3, samplers=samplers)
        res["coverage"][name] = dict(rows=rows, summary=summarise(rows))
        log("coverage", name, {k: round(v["modes"][0], 1) for k, v in res["coverage"][name]["summary"].items()})
        write(res)


def failure_modes(res, seeds, steps, hidden, quick):
    mix = grid25()
    f = res["failure"] = dict(nfe=[], training=[], tiny=[])
    nfes = (1, 2, 5, 10, 20, 50, 100) if not quick else (2, 10)
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        z, mean, scale = standardise(mix.sample(20000, g)[0])
        model, sched = train_ddpm(z, steps=steps, hidden=hidden, seed=seed)
        for smp in ("ddim", "ddpm", "dpmpp2m"):
            for n in nfes:
                y = sample(model, sched, (2500, 2), smp, steps=n, generator=g).double() * scale + mean
                f["nfe"].append(dict(sampler=smp, nfe=n, seed=seed, **mode_coverage(y, mix)))
        for s in ((100, 300, 1000, 3000) if not quick else (50, 100)):
            m, sc = train_ddpm(z, steps=s, hidden=hidden, seed=seed)
            y = sample(m, sc, (2500, 2), "ddim", steps=50, generator=g).double() * scale + mean
            f["training"].append(dict(steps=s, seed=seed, **mode_coverage(y, mix)))
        for n in ((5, 25, 100, 1000) if not quick else (5, 100)):
            xt, comp = mix.sample(n, g)
            zt = ((xt - mean) / scale).float()
            m, sc = train_ddpm(zt, steps=steps, hidden=hidden, seed=seed)
            y = sample(m, sc, (2500, 2), "ddim", steps=50, generator=g).double() * scale + mean
            r = mode_coverage(y, mix)
            fresh = mix.sample(2500, g)[0]
            nn_ratio = lambda s: float((torch.cdist(s, xt).min(1).values / 0.05).median())
            f["tiny"].append(dict(n_train=n, seed=seed, modes_in_train=int(comp.unique().numel()),
                                  nn_over_sigma=nn_ratio(y), nn_over_sigma_fresh=nn_ratio(fresh), **r))
        log("failure modes, seed", seed)
        write(res)
    f["distill_2d"] = []
    g = torch.Generator().manual_seed(0)
    z, mean, scale = standardise(mix.sample(20000, g)[0])
    model, sched = train_ddpm(z, steps=steps, hidden=hidden, seed=0)
    students = progressive_distillation(model, sched, z, 32, 2, iters=100 if quick else 400, lr=1e-3)
    for n, (stu, grid) in students.items():
        sp = SpacedSchedule(sched, grid)
        for who, m in (("distilled", stu), ("DDIM", model)):
            y = sample(m, sp, (2500, 2), "ddim", generator=torch.Generator().manual_seed(1)).double() * scale + mean
            f["distill_2d"].append(dict(nfe=n, model=who, **mode_coverage(y, mix)))
    write(res)


def efficiency(res, quick):
    e = res["efficiency"] = dict(oracle=[], digits=[], distill_digits=[])
    mix = grid25()
    scale = float(mix.means.std() ** 2 + 0.05 ** 2) ** 0.5                   # the mixture's overall std, exactly
    smix = GaussianMixture(mix.means / scale, mix.stds / scale)
    sched = NoiseSchedule.from_name("cosine", 1000)
    oracle = GaussianMixtureOracle(smix, sched)
    grid = {"ddim": (5, 10, 20, 50, 100, 250), "dpmpp2m": (5, 10, 20, 50, 100), "ddpm": (10, 50, 100, 250, 1000)}
    if quick: grid = {k: v[:2] for k, v in grid.items()}
    for smp, nfes in grid.items():
        for n in nfes:
            t0 = time.perf_counter()
            y = sample(oracle, sched, (2500, 2), smp, steps=n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            wall = time.perf_counter() - t0
            e["oracle"].append(dict(sampler=smp, nfe=n, wall_s=wall, **mode_coverage(y * scale, mix)))
    log("oracle done")
    write(res)
    model, dsched, _ = pretrained.load("digits")
    ref = load_digits("train")[0]
    clf = load_digits_classifier()
    n = 250 if quick else 500
    grid = {"ddim": (5, 10, 20, 50), "dpmpp2m": (5, 10, 20), "ddpm": (50, 100)}
    if quick: grid = {k: v[:1] for k, v in grid.items()}
    for smp, nfes in grid.items():
        for s in nfes:
            t0 = time.perf_counter()
            y = sample(model, dsched, (n, 1, 8, 8), smp, steps=s, generator=torch.Generator().manual_seed(0))
            wall = time.perf_counter() - t0
            m = evaluate_samples(y.clamp(-1, 1), ref, classifier=clf, kid_subset_size=min(1000, n))
            e["digits"].append(dict(sampler=smp, nfe=s, n=n, wall_s=wall, ms_per_sample=1e3 * wall / n, fid=m["fid"], kid=m["kid"]))
        log("digits", smp)
        write(res)
    y = sample(model, dsched, (n, 1, 8, 8), "ddim", steps=64, generator=torch.Generator().manual_seed(0))
    e["digits_teacher_ddim64_fid"] = evaluate_samples(y.clamp(-1, 1), ref, classifier=clf, kid_subset_size=min(1000, n))["fid"]
    e["digits_real_vs_real_fid"] = evaluate_samples(load_digits("test")[0], ref, classifier=clf, kid_subset_size=300)["fid"]
    t0 = time.perf_counter()
    students = progressive_distillation(model.requires_grad_(True), dsched, ref, 64, 4 if not quick else 16,
                                        iters=60 if quick else 150, batch_size=64, lr=2e-4)
    e["distill_digits_seconds"] = time.perf_counter() - t0
    for s, (stu, grid_t) in students.items():
        sp = SpacedSchedule(dsched, grid_t)
        for who, m in (("distilled", stu), ("DDIM", model.eval())):
            y = sample(m, sp, (n, 1, 8, 8), "ddim", generator=torch.Generator().manual_seed(0))
            fid = evaluate_samples(y.clamp(-1, 1), ref, classifier=clf, kid_subset_size=min(1000, n))["fid"]
            e["distill_digits"].append(dict(nfe=s, model=who, n=n, fid=fid))
        log("distilled", s)
        write(res)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="cost,coverage,failure,efficiency")
    p.add_argument("--out", default="challenges.json", help="file name under benchmarks/results/")
    a = p.parse_args()
    global OUT
    OUT = RESULTS / a.out
    torch.set_num_threads(1)
    seeds = list(range(a.seeds))
    res = {}
    res["meta"] = dict(command="OMP_NUM_THREADS=1 python scripts/run_challenges.py " + " ".join(sys.argv[1:]),
                       date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       machine=f"{platform.platform()}; {platform.processor() or platform.machine()}; "
                               f"{os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
                       settings=dict(seeds=seeds, steps=a.steps, batch_size=256, hidden=a.hidden, depth=3, n_samples=2500,
                                     quick=a.quick), gpu="none: no GPU was available in this session")
    t0 = time.perf_counter()
    parts = a.only.split(",")
    if "cost" in parts: cost(res, a.quick); write(res)
    if "coverage" in parts: coverage(res, seeds, a.steps, a.hidden, a.quick)
    if "failure" in parts: failure_modes(res, seeds[:3], a.steps, a.hidden, a.quick)
    if "efficiency" in parts: efficiency(res, a.quick)
    res["meta"]["seconds"] = time.perf_counter() - t0
    write(res)
    log("wrote", OUT)


if __name__ == "__main__":
    main()
