"""Sampler error isolated from model error: every sampler driven by the exact denoiser of a Gaussian mixture.

Ours at their defaults (only `sampler` and `steps` given) and with every spacing, against diffusers'
DPMSolverMultistepScheduler (DPM-Solver++ 2M and 3M), UniPCMultistepScheduler, DEISMultistepScheduler and
DDIMScheduler at their defaults (trained_betas = our betas; DDIM needs clip_sample=False, since its
default clips x̂_0 to [-1, 1], which is not the data range here), all run in this process on the same
oracle and the same x_T (float32). Mixtures: the 8-Gaussian ring, the 5x5 grid, a five-component 2-D
mixture with components as narrow as σ = 0.05, and a 10-D mixture; the DDPM linear and the cosine
schedules (T = 1000). Metrics, each the mean (and sd) over --seeds runs of --n samples: the sliced
Wasserstein-1 distance (--projections directions) to fresh true samples, MMD² (Gaussian kernel, h = half
the smallest component sd, on the first 2000 samples) and the mean exact log-likelihood (vs −H(p)), and
the pathwise RMS distance to the exact probability-flow ODE's x_0 from the same x_T and the same start
(`ode_reference` over every code step from the solver's first timestep; a deterministic solver's own
discretisation error, free of sampling noise; meaningless for DDPM), and its median over the samples (the RMS is
dominated by the rare samples whose path ends in another mode, which a step rule hardly controls).

Two noise floors: true vs true (two independent sets), and the paired floor, the same metrics for the
exact ODE's x_0 from the same x_T against the same reference set. The sampling noise of SW1 is large
(component counts vary multinomially), so the summary also reports each sampler's excess over the paired
floor, seed by seed (mean ± standard error over seeds), which cancels most of that noise.

Goals (issue 11): our best sampler at its defaults <= 0.8x diffusers' best at 10 NFE and within 10 % of
the floor at 20 NFE; no sampler of ours at its defaults worse than 1.2x its diffusers counterpart. The
summary prints the ratios both of the raw metric and of the excess over the paired floor.

    python benchmarks/bench_sampler_error.py [--n 4000] [--seeds 3] [--nfe 5 10 20 50] [--out FILE]
    python benchmarks/bench_sampler_error.py --mmd-widths --n 2000 --seeds 2 --out FILE
    python benchmarks/bench_sampler_error.py --ends --n 1000 --seeds 2 --projections 200 --out FILE
        (every deterministic sampler on its default spacing ending at σ = 0 and at code t = 0)
    python benchmarks/bench_sampler_error.py --tail --n 1000 --seeds 2 --projections 200 --out FILE
        (3M at its default, and with its last three steps at up to third order: TAIL_ORDER2_FROM out of reach)
        (why MMD² ranks solvers differently: it against a closed form from each component's measured width)
    in parallel: one process per --mixtures M (--out part_M.json), then --merge part_*.json --out FILE
    FULL: --n 8000 --seeds 5 --projections 1000
Writes a JSON results file (the command, the date and the machine included) when --out is given.
"""
import argparse
import contextlib
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
from simple_diffusion.sampling import (ENDS, SAMPLERS, SIGMA_MAX_EPS, SPACINGS, default_discretisation, ode_reference,
                                       sample, space_timesteps)
from simple_diffusion.schedules import NoiseSchedule
import simple_diffusion.sampling as sampling


def mixtures(heldout=False) -> dict:
    """The benchmark's exact data distributions; heldout=True: three others, used to check the default
    spacings on data they were not chosen on (a 2-D mixture with one σ = 0.02 component, a 4-D and a 16-D one)."""
    if heldout:
        g = torch.Generator().manual_seed(7)
        wide = GaussianMixture(torch.tensor([[0.0, 0.0], [1.0, 0.5], [-1.0, 1.0], [0.5, -1.5]], dtype=torch.float64),
                               torch.tensor([0.3, 0.02, 0.15, 0.5], dtype=torch.float64),
                               torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64))
        d4 = GaussianMixture(torch.randn(12, 4, generator=g, dtype=torch.float64), torch.full((12,), 0.2, dtype=torch.float64))
        d16 = GaussianMixture(torch.randn(4, 16, generator=g, dtype=torch.float64) * 0.5,
                              torch.full((4,), 0.05, dtype=torch.float64))
        return {"wide": wide, "4-D": d4, "16-D": d16}
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


def our_start(sched, sampler, steps, spacing=None) -> int:
    "The code timestep `sample` starts from (the oracle is an ε-model)."
    sp, smax, _ = default_discretisation(sched, sampler, steps) if spacing is None else (spacing, SIGMA_MAX_EPS, None)
    return int(space_timesteps(len(sched), steps, sp, sched.alphas_cumprod, sigma_max=smax)[-1])


def diffusers_solvers(betas) -> dict:
    "diffusers' multistep solvers at their defaults (and DDIM without its [-1, 1] clipping)."
    import diffusers as d
    return {"dpm++2m": lambda: d.DPMSolverMultistepScheduler(trained_betas=betas, solver_order=2),
            "dpm++3m": lambda: d.DPMSolverMultistepScheduler(trained_betas=betas, solver_order=3),
            "unipc": lambda: d.UniPCMultistepScheduler(trained_betas=betas),
            "deis": lambda: d.DEISMultistepScheduler(trained_betas=betas),
            "ddim": lambda: d.DDIMScheduler(trained_betas=betas, clip_sample=False)}


METRICS = ["sw1", "mmd2", "loglik", "rms", "med"]
PATHWISE = ("rms", "med")  # distances to the exact ODE's x_0 from the same x_T: no floor


def metrics(x, mix, ref, bandwidth, projections, exact):
    """(SW1, MMD², mean log p, RMS and median distance to the exact ODE's x_0 `exact`) of samples x against the
    true set ref. The RMS is dominated by the rare samples whose path ends in another mode; the median is not."""
    x = x.double()
    d = (x - exact.double()).flatten(1).norm(dim=1)
    return (sliced_w1(x, ref, projections), mmd2_rbf(x[:2000], ref[:2000], bandwidth),
            float(mix.log_prob(x.reshape(len(x), -1)).mean()), float(d.pow(2).mean().sqrt()), float(d.median()))


def component_widths(x, mix, ref=None):
    """(the share of x nearest each component's mean, each component's width factor, each one's core density):
    the RMS distance to the mean of the samples within 4σ√D of it, and the share of those within σ√D/4 of the
    mean, each over the same statistic of true samples `ref` (the last two outputs of this function for them)."""
    x, mu = x.double().reshape(len(x), -1), mix.means.double()
    sd = mix.stds.double().reshape(len(mu), -1)[:, 0]
    near = torch.cdist(x, mu).argmin(1)
    share, stat, core = [], [], []
    for c in range(len(mu)):
        d2 = (x[near == c] - mu[c]).pow(2).sum(1)
        d2 = d2[d2 < 16 * sd[c] ** 2 * mix.dim]
        share.append(float((near == c).double().mean()))
        stat.append(float(d2.mean().sqrt()) if len(d2) else float("nan"))
        core.append(float((d2 < sd[c] ** 2 * mix.dim / 16).double().mean()) if len(d2) else float("nan"))
    if ref is None:
        return np.array(share), np.array(stat), np.array(core)
    return np.array(share), np.array(stat) / ref[0], np.array(core) / ref[1]


def mmd2_widths(mix, share, width, bandwidth, n) -> float:
    """Closed-form MMD² (the V-statistic's 2/n bias added) between the mixture and the same mixture with weights
    `share` and each component's sd scaled by `width`: E exp(-|X-Y|²/2h²) for X ~ N(a, s²I), Y ~ N(b, r²I) is
    (h²/v)^{D/2} exp(-|a-b|²/2v), v = h² + s² + r²."""
    mu, D, h2 = mix.means.double(), mix.dim, bandwidth ** 2
    sd, w = mix.stds.double().reshape(len(mu), -1)[:, 0].numpy(), mix.weights.double().numpy()
    d2 = torch.cdist(mu, mu).pow(2).numpy()
    def ek(wa, sa, wb, sb):
        v = h2 + sa[:, None] ** 2 + sb[None] ** 2
        return float((wa[:, None] * wb[None] * (h2 / v) ** (D / 2) * np.exp(-d2 / (2 * v))).sum())
    sq = sd * width
    return ek(share, sq, share, sq) + ek(w, sd, w, sd) - 2 * ek(share, sq, w, sd) + 2.0 / n


def run_mmd_widths(args) -> dict:
    """The narrow mixture, both schedules: every solver's measured MMD², its closed form from the measured
    component shares and widths, and the widths, per seed and NFE."""
    torch.set_num_threads(1)
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} thread(s)", "n": args.n, "seeds": args.seeds, "nfe": args.nfe,
           "fields": ["mmd2", "mmd2 closed form", "widths", "cores"], "results": {}}
    mix = mixtures()["narrow"]
    h = 0.5 * float(mix.stds.min())
    ref_stat = component_widths(mix.sample(50_000, torch.Generator().manual_seed(5))[0], mix)[1:]
    out["stds"] = mix.stds.double().reshape(len(mix.means), -1)[:, 0].tolist()
    for sname in args.schedules:
        sched = NoiseSchedule.from_name(sname, 1000)
        oracle = GaussianMixtureOracle(mix, sched)
        theirs = diffusers_solvers(sched.betas.numpy())
        res = out["results"].setdefault(f"narrow/{sname}", {})
        for seed in range(args.seeds):
            x_T = torch.randn(args.n, mix.dim, generator=torch.Generator().manual_seed(seed))
            ref = mix.sample(args.n, torch.Generator().manual_seed(1000 + seed))[0]
            runs = {"exact ODE": {"-": lambda: ode_reference(oracle, sched, x_T, len(sched) - 1)}}
            for nfe in args.nfe:
                for s in SAMPLERS:
                    if s != "ddpm":
                        runs.setdefault(f"ours {s}", {})[str(nfe)] = (
                            lambda s=s, nfe=nfe: sample(oracle, sched, x_T.shape, steps=nfe, noise=x_T, sampler=s))
                for name, m in theirs.items():
                    runs.setdefault(f"diffusers {name}", {})[str(nfe)] = (
                        lambda m=m, nfe=nfe: diffusers_sample(m(), oracle, x_T, nfe))
            for name, per in runs.items():
                for nfe, fn in per.items():
                    x = fn()
                    share, width, core = component_widths(x, mix, ref_stat)
                    res.setdefault(name, {}).setdefault(nfe, []).append(
                        [mmd2_rbf(x, ref, h), mmd2_widths(mix, share, width, h, args.n), width.tolist(),
                         core.tolist()])
        print(f"narrow/{sname}: done", file=sys.stderr)
    return out


def summarise_mmd_widths(out) -> str:
    "Measured MMD² against its closed form from the component widths, and the rank correlation of the two."
    from scipy.stats import spearmanr
    lines, meas, pred = [], [], []
    for key, res in out["results"].items():
        lines.append(f"\n{key}: MMD² measured / closed form from the widths; widths and core densities of the σ = "
                     f"{min(out['stds']):.2f} components (mean over seeds)")
        narrow = [i for i, s in enumerate(out["stds"]) if s == min(out["stds"])]
        for name, per in res.items():
            cells = []
            for nfe, runs in per.items():
                m, p = np.mean([r[0] for r in runs]), np.mean([r[1] for r in runs])
                meas += [r[0] for r in runs]; pred += [r[1] for r in runs]
                w = np.mean([[r[2][i] for i in narrow] for r in runs], 0)
                k = np.mean([[r[3][i] for i in narrow] for r in runs], 0)
                cells.append(f"{nfe}: {m:.4f}/{p:.4f} w " + "/".join(f"{v:.2f}" for v in w)
                             + " core " + "/".join(f"{v:.1f}" for v in k))
            lines.append(f"{name:20s} " + "  ".join(cells))
    rho = spearmanr(meas, pred).statistic
    lines.append(f"\nrank correlation of measured and closed-form MMD² over {len(meas)} runs: {rho:.2f}")
    return "\n".join(lines)


@contextlib.contextmanager
def full_tail(on=True):
    """With on=True: 3M's last three steps at up to third order, as before TAIL_ORDER2_FROM (the module constant
    set out of reach inside the block; also used by bench_digits_vs_diffusers.py)."""
    saved = sampling.TAIL_ORDER2_FROM
    sampling.TAIL_ORDER2_FROM = math.inf if on else saved
    try:
        yield
    finally:
        sampling.TAIL_ORDER2_FROM = saved


def ours_sample(oracle, sched, x_T, nfe, seed, kw):
    "`sample` at these settings; kw tail3=True: inside full_tail()."
    kw = dict(kw)
    with full_tail(kw.pop("tail3", False)):
        return sample(oracle, sched, x_T.shape, steps=nfe, noise=x_T, generator=torch.Generator().manual_seed(seed), **kw)


def run(args) -> dict:
    torch.set_num_threads(1)
    out = {"command": "python " + " ".join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} thread(s)", "n": args.n, "seeds": args.seeds, "nfe": args.nfe,
           "metrics": METRICS, "results": {}, "floor": {}, "paired_floor": {}, "neg_entropy": {}}
    ours = {f"ours {s}": dict(sampler=s) for s in SAMPLERS}
    if args.spacings is not None:
        ours.update({f"ours {s} {sp}": dict(sampler=s, spacing=sp) for s in SAMPLERS if s != "ddpm"
                     for sp in (args.spacings or SPACINGS)})
    if args.tail:                                      # 3M at its default, with and without TAIL_ORDER2_FROM
        ours = {"ours dpmpp3m": dict(sampler="dpmpp3m"), "ours dpmpp3m tail=3": dict(sampler="dpmpp3m", tail3=True)}
    if args.ends:                                                  # the default discretisation, either end
        ours.update({f"ours {s} end={e}": dict(sampler=s, end=e) for s in SAMPLERS if s != "ddpm" for e in ENDS})
    t0 = time.perf_counter()
    for mname, mix in mixtures(args.heldout).items():
        if args.mixtures and mname not in args.mixtures: continue
        h = 0.5 * float(mix.stds.min())
        for sname in args.schedules:
            sched = NoiseSchedule.from_name(sname, 1000)
            oracle = GaussianMixtureOracle(mix, sched)
            theirs = diffusers_solvers(sched.betas.numpy()) if not args.no_diffusers else {}
            if args.tail:
                theirs = {k: v for k, v in theirs.items() if k == "dpm++3m"}
            key = f"{mname}/{sname}"
            g = torch.Generator().manual_seed(123)
            floors = []
            for seed in range(args.seeds):
                a, b = mix.sample(args.n, g)[0], mix.sample(args.n, g)[0]
                floors.append(metrics(a, mix, b, h, args.projections, a))
            out["floor"][key] = np.mean(floors, 0).tolist()
            out["neg_entropy"][key] = float(mix.log_prob(mix.sample(100_000, g)[0]).mean())
            res = out["results"].setdefault(key, {})
            refs = [mix.sample(args.n, torch.Generator().manual_seed(1000 + seed))[0] for seed in range(args.seeds)]
            x_Ts = [torch.randn(args.n, mix.dim, generator=torch.Generator().manual_seed(seed))
                    for seed in range(args.seeds)]
            exact = {}                                                       # (seed, start) -> the ODE's x_0
            def ode(seed, start):
                if (seed, start) not in exact:
                    exact[seed, start] = ode_reference(oracle, sched, x_Ts[seed], start)
                return exact[seed, start]
            T = len(sched)
            out["paired_floor"][key] = [metrics(ode(s, T - 1), mix, refs[s], h, args.projections, ode(s, T - 1))
                                        for s in range(args.seeds)]
            for nfe in args.nfe:
                for seed in range(args.seeds):
                    x_T = x_Ts[seed]
                    runs = {name: (lambda kw=kw: (ours_sample(oracle, sched, x_T, nfe, seed, kw),
                                                  our_start(sched, kw["sampler"], nfe, kw.get("spacing"))))
                            for name, kw in ours.items()}
                    runs.update({f"diffusers {n}": (lambda m=m: (diffusers_sample(s := m(), oracle, x_T, nfe),
                                                                 int(s.timesteps[0])))
                                 for n, m in theirs.items()})
                    for name, fn in runs.items():
                        try: x, start = fn()
                        except ValueError: continue                         # a combination we refuse
                        res.setdefault(name, {}).setdefault(str(nfe), []).append(
                            metrics(x, mix, refs[seed], h, args.projections, ode(seed, start)))
            print(f"{key}: done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def _se(v) -> float:
    "Standard error of the mean of v (0 for a single value)."
    return float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0


PAIRS = (("ours ddim", "diffusers ddim"), ("ours dpmpp2m", "diffusers dpm++2m"),
         ("ours dpmpp3m", "diffusers dpm++3m"), ("ours unipc", "diffusers unipc"))


def errors(out, key, metric, excess=False) -> dict:
    """{sampler: {nfe: [error per seed]}}: the metric (the log-likelihood as |mean log p + H(p)|), or with
    excess=True its excess over the paired floor of the same seed (the log-likelihood as
    |mean log p - mean log p of the exact ODE's samples|)."""
    m = out["metrics"].index(metric)
    negH, paired = out["neg_entropy"][key], out.get("paired_floor", {}).get(key)
    def err(r, seed):
        if metric == "loglik":
            return abs(r[m] - paired[seed][m]) if excess else abs(r[m] - negH)
        return r[m] - paired[seed][m] if excess else r[m]
    return {name: {nfe: [err(r, i) for i, r in enumerate(runs)] for nfe, runs in per.items()}
            for name, per in out["results"][key].items()}


def goal_ratios(out, key, nfe, metric="sw1", excess=False):
    """(our best at defaults, its mean error, diffusers' best, its mean error, {ours: ratio to its
    diffusers counterpart}) at one NFE, or None where the NFE was not run."""
    e = errors(out, key, metric, excess)
    mean = lambda name: float(np.mean(e[name][str(nfe)]))
    mine = [n for n in e if n.startswith("ours") and len(n.split()) == 2 and str(nfe) in e[n]
            and not (metric in PATHWISE and n == "ours ddpm")]                 # a stochastic path has no ODE
    theirs = [n for n in e if n.startswith("diffusers") and str(nfe) in e[n]]
    if not mine or not theirs: return None
    best, tb = min(mine, key=mean), min(theirs, key=mean)
    pairs = {a: mean(a) / mean(b) for a, b in PAIRS if a in mine and b in theirs}
    return best, mean(best), tb, mean(tb), pairs


def rule_ratios(out, metric, nfe, spacing=None, excess=False):
    """Over every cell of `out`: ([our best deterministic sampler with `spacing` (None: at its defaults) over
    diffusers' best, per cell], {sampler: its worst ratio to the diffusers counterpart}), at one NFE."""
    best, worst = [], {}
    for key in out["results"]:
        e = errors(out, key, metric, excess)
        mean = lambda name: float(np.mean(e[name][str(nfe)]))
        name = lambda a: a if spacing is None else f"{a} {spacing}"
        mine = [name(a) for a, _ in PAIRS if str(nfe) in e.get(name(a), {})]
        theirs = [n for n in e if n.startswith("diffusers") and str(nfe) in e[n]]
        if not mine or not theirs: continue
        best.append(min(map(mean, mine)) / min(map(mean, theirs)))
        for a, b in PAIRS:
            if name(a) in mine and b in theirs:
                worst[a.split()[1]] = max(worst.get(a.split()[1], 0.0), mean(name(a)) / mean(b))
    return best, worst


def summarise_ends(out) -> str:
    """Per sampler, NFE and metric, over every cell: the geometric mean and the worst of the error ending at
    code t = 0 over the error ending at σ = 0 (both on the default spacing), and on how many cells t = 0 wins."""
    lines = ["ends (--ends): error with end='t0' over end='zero', geometric mean [worst] and cells where t0 wins"]
    for metric in out["metrics"]:
        for nfe in out["nfe"]:
            row = []
            for s in SAMPLERS[1:]:
                r = []
                for key in out["results"]:
                    e = errors(out, key, metric)
                    mean = lambda name: float(np.mean(e[name][str(nfe)]))
                    if f"ours {s} end=t0" in e: r.append(mean(f"ours {s} end=t0") / mean(f"ours {s} end=zero"))
                if r:
                    g = float(np.exp(np.mean(np.log(np.maximum(r, 1e-12)))))
                    row.append(f"{s} {g:.2f} [{max(r):.2f}] {sum(x < 1 for x in r)}/{len(r)}")
            lines.append(f"{metric:6s} NFE {nfe:3d}: " + "; ".join(row))
    return "\n".join(lines)


def summarise_rules(out, metric="rms", excess=False) -> str:
    "Per NFE and spacing: on how many cells our best is <= 0.8x diffusers' best, and the worst pairwise ratios."
    spacings = sorted({n.split()[2] for r in out["results"].values() for n in r
                       if n.startswith("ours") and len(n.split()) == 3})
    lines = [f"\nspacings, {metric}{' over the paired floor' if excess else ''}: cells with our best <= 0.8x diffusers' best | worst ratio to the counterpart"]
    for nfe in out["nfe"]:
        for sp in [None] + spacings:
            best, worst = rule_ratios(out, metric, nfe, sp, excess)
            if best:
                lines.append(f"NFE {nfe:3d} {sp or 'defaults':16s} {sum(b <= 0.8 for b in best):2d}/{len(best)}, max {max(best):.2f} | "
                             + ", ".join(f"{s} {w:.2f}" for s, w in worst.items()))
    return "\n".join(lines)


def summarise(out, metric="sw1") -> str:
    "Text tables of mean ± standard error per sampler and NFE (raw and over the paired floor) and the goal ratios."
    m = out["metrics"].index(metric)
    lines = []
    for key in out["results"]:
        negH, paired = out["neg_entropy"][key], out.get("paired_floor", {}).get(key)
        floor = abs(out["floor"][key][m] - negH) if metric == "loglik" else out["floor"][key][m]
        head = f"\n{key}: {metric}, floor (true vs true) {floor:.4f}"
        if paired and metric != "loglik":
            pf = [r[m] for r in paired]
            head += f", paired floor (exact ODE from the same x_T) {np.mean(pf):.4f} ±{_se(pf):.4f}"
        if metric == "loglik": head += f" (|mean log p + H(p)|, −H(p) = {negH:.3f})"
        lines.append(head)
        for excess in ((False, True) if paired and metric not in PATHWISE else (False,)):
            e = errors(out, key, metric, excess)
            lines.append(f"{'excess over the paired floor' if excess else 'sampler':28s}"
                         + "".join(f"{'NFE ' + n:>18s}" for n in map(str, out["nfe"])))
            for name, per in e.items():
                cells = [per.get(str(n)) for n in out["nfe"]]
                lines.append(f"{name:28s}" + "".join(f"{np.mean(c):>10.4f} ±{_se(c):.4f}" if c else f"{'–':>18s}"
                                                     for c in cells))
        for excess in ((False, True) if paired and metric not in PATHWISE else (False,)):
            for nfe in out["nfe"]:
                g = goal_ratios(out, key, nfe, metric, excess)
                if g is None: continue
                best, b, tb, t_, pairs = g
                line = (f"{'excess ' if excess else ''}NFE {nfe}: our best at defaults {best} {b:.4f}; "
                        f"diffusers' best {tb} {t_:.4f}; ratio {b / t_:.2f}" if t_ else "")
                if not excess and metric not in PATHWISE: line += f"; / floor {b / floor:.2f}"
                if not excess and paired and metric not in ("loglik", *PATHWISE):
                    line += f"; / paired floor {b / np.mean([r[m] for r in paired]):.2f}"
                line += "".join(f"; {a.split()[1]} vs diffusers {r:.2f}" for a, r in pairs.items())
                lines.append(line)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--projections", type=int, default=500)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--mixtures", nargs="*", default=None, help="subset of ring, grid, narrow, 10-D (or wide, 4-D, 16-D)")
    p.add_argument("--schedules", nargs="+", default=["linear", "cosine"])
    p.add_argument("--spacings", nargs="*", default=None,
                   help="also run every deterministic sampler with these spacings (none named: all of them)")
    p.add_argument("--heldout", action="store_true", help="the held-out mixtures (wide, 4-D, 16-D) instead")
    p.add_argument("--ends", action="store_true",
                   help="also every deterministic sampler on its default spacing with end='zero' and end='t0'")
    p.add_argument("--tail", action="store_true",
                   help="only 3M at its default, with and without TAIL_ORDER2_FROM (rows 'tail=3'), and diffusers' 3M")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--summarise", default=None, help="only print the tables of an existing results file")
    p.add_argument("--merge", nargs="+", default=None,
                   help="merge results files of runs on disjoint --mixtures (one process each) into --out")
    p.add_argument("--mmd-widths", action="store_true",
                   help="only the narrow mixture: MMD² against its closed form from each component's width")
    args = p.parse_args()
    if args.mmd_widths:
        out = run_mmd_widths(args)
        print(summarise_mmd_widths(out))
        if args.out:
            with open(args.out, "w") as f: json.dump(out, f, indent=1)
        return
    if args.merge:
        parts = [json.load(open(f)) for f in args.merge]
        out = dict(parts[0])
        for key in ("results", "floor", "paired_floor", "neg_entropy"):
            out[key] = {k: v for part in parts for k, v in part.get(key, {}).items()}
        out["command"] = " ; ".join(part["command"] for part in parts) + " ; then --merge"
        out["date"] = min(part["date"] for part in parts)
        for metric in out["metrics"]: print(summarise(out, metric))
        print(summarise_rules(out, "rms"), summarise_rules(out, "med"), summarise_rules(out, "sw1", excess=True))
        if any("end=" in n for r in out["results"].values() for n in r): print(summarise_ends(out))
        if args.out:
            with open(args.out, "w") as f: json.dump(out, f, indent=1)
        return
    if args.summarise:
        out = json.load(open(args.summarise))
        for metric in out["metrics"]: print(summarise(out, metric))
        print(summarise_rules(out, "rms"), summarise_rules(out, "med"), summarise_rules(out, "sw1", excess=True))
        return
    out = run(args)
    for metric in out["metrics"]: print(summarise(out, metric))
    if args.spacings is not None: print(summarise_rules(out, "rms"), summarise_rules(out, "med"), summarise_rules(out, "sw1", excess=True))
    if args.ends: print(summarise_ends(out))
    if args.out:
        with open(args.out, "w") as f: json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
