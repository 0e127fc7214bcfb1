"""Time discretisations optimised for a budget against the exact oracle, and how they transfer.

For each sampler and NFE: `optimise_timesteps` on ONE mixture and schedule (the 8-Gaussian ring, cosine,
T = 1000; --n-opt draws of x_T, --iters sweeps), then, on held-out x_T, the default discretisation (what
`sample` uses with spacing=None) and the 'logsnr' rule (the optimiser's first start) against the optimised one on every mixture of benchmarks/bench_sampler_error.py (ring, grid, narrow, 10-D) and both
schedules (linear, cosine): (a) the RMS distance of the solver's x_0 to the probability-flow ODE's from the
same x_T (`discretisation_error`, Eq. eq-sampling-steps-objective), (b) SW1 and MMD² to fresh mixture draws
(the benchmark's metric functions), with diffusers' best solver at the same NFE. On the linear schedule the
optimised knots are carried over in normalised log-SNR between the linear default's own two ends. Then the
trained digits model (cosine, eps): FID (shipped digits classifier, against the train split) of the default
and of the ring-optimised timesteps, same code t.

The optimiser starts from the 'logsnr' rule (ends at code t = 0 and the σ/α cap), from the default
discretisation where it has the same noisiest knot (its lowest knot then stays where the default puts it), and,
for UniPC and DDIM, also from the DPM-Solver++(2M) optimum at the same NFE where that has the same two ends (a second start: the objective has local minima).

    python scripts/optimise_steps.py [--n-opt 512] [--iters 8] [--n 1000] [--seeds 2] [--nfe 5 7 10]
        [--samplers dpmpp2m unipc ddim] [--digits-n 2000] [--digits-seeds 3] [--out FILE]
    in three processes: --parts optimise digits --out A.json; once A.json exists (written after the
    optimisation), --parts transfer --knots-from A.json --out B.json; --parts self --out C.json (each mixture's
    own optimum, NFE 5, cosine); --parts digits_self --out D.json (steps optimised on the digits network's own
    ODE, NFE 5); then --merge A.json B.json C.json D.json --out FILE
"""
import argparse
import datetime
import json
import math
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_sampler_error import diffusers_sample, diffusers_solvers, mixtures, sliced_w1  # noqa: E402

from simple_diffusion.data import load_digits  # noqa: E402
from simple_diffusion.metrics import extract_features, fid_from_features, load_digits_classifier, mmd2_rbf  # noqa: E402
from simple_diffusion.oracle import GaussianMixtureOracle  # noqa: E402
from simple_diffusion.pretrained import load  # noqa: E402
from simple_diffusion.sampling import (SamplingWarning, default_discretisation, discretisation_error,  # noqa: E402
                                       ode_reference, optimise_timesteps, respace, sample)
from simple_diffusion.schedules import NoiseSchedule  # noqa: E402


VARIANTS = ("default", "logsnr", "optimised", "optimised_gap")  # optimised_gap: no step below --min-gap of the uniform one


def half_log_snr(schedule) -> np.ndarray:
    "λ = ½ log SNR per code step, from the schedule's own float64 table."
    return 0.5 * schedule.log_snr.double().numpy()


def logsnr_steps(schedule, sampler, nfe, prediction="eps") -> list:
    "The 'logsnr' rule from code t = 0 to the default's σ/α cap: the optimiser's first start (the default until 2026-12-01)."
    smax = default_discretisation(schedule, sampler, nfe, prediction)[1]
    return respace(schedule, nfe, "logsnr", smax).timesteps.tolist()


def shipped_steps(schedule, sampler, nfe, prediction="eps") -> list:
    "The code timesteps `sample` uses with spacing=None: the default discretisation."
    return respace(schedule, nfe, *default_discretisation(schedule, sampler, nfe, prediction)).timesteps.tolist()


def starts_for(schedule, sampler, nfe, prediction="eps") -> list:
    "The optimiser's starts: the logsnr rule, and the shipped default where it has the same noisiest knot."
    ts0 = logsnr_steps(schedule, sampler, nfe, prediction)
    ts1 = shipped_steps(schedule, sampler, nfe, prediction)
    return [ts0] + ([ts1] if ts1[-1] == ts0[-1] and ts1 != ts0 else [])


def transfer(ts, src, dst, dst_ends) -> list:
    "Knots ts of schedule src carried to dst at the same normalised log-SNR between dst's ends (t_lo, t_hi)."
    ls, ld = half_log_snr(src), half_log_snr(dst)
    u = (ls[ts] - ls[ts[-1]]) / (ls[ts[0]] - ls[ts[-1]])
    lo, hi = dst_ends
    target = ld[hi] + u * (ld[lo] - ld[hi])
    t = np.interp(target, ld[::-1], np.arange(len(ld))[::-1]).round().astype(int)
    t[0], t[-1] = lo, hi
    for i in range(1, len(t) - 1):
        t[i] = min(max(t[i], t[i - 1] + 1), hi - (len(t) - 1 - i))
    return t.tolist()


def metrics(x, ref, h, projections):
    x = x.double()
    return sliced_w1(x, ref, projections), mmd2_rbf(x[:1000], ref[:1000], h)


def digits_fids(model, dsched, cfg, clf, f_train, sampler, ts, args) -> list:
    "FID of args.digits_n digits sampled on the code timesteps ts, one value per seed."
    fids = []
    for seed in range(args.digits_seeds):
        x = sample(model, dsched, (args.digits_n, 1, 8, 8), sampler, spacing=ts,
                   prediction=cfg.prediction, generator=torch.Generator().manual_seed(seed),
                   batch_size=500)
        fids.append(fid_from_features(extract_features(x.clamp(-1, 1), clf)[0], f_train))
    return fids


def run(args) -> dict:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", SamplingWarning)
    out = {"command": "python " + " ".join(sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": f"{platform.node()} {platform.machine()}, {torch.get_num_threads()} thread(s), "
                      f"torch {torch.__version__}",
           "settings": vars(args), "optimised_on": "ring/cosine", "optimised": {}, "transfer": {}, "digits": {},
           "self": {}}
    mixes = mixtures()
    t0 = time.perf_counter()
    # 1. optimise on the ring, cosine
    cos = NoiseSchedule.from_name("cosine", 1000)
    ring = GaussianMixtureOracle(mixes["ring"], cos)
    if args.knots_from:
        out["optimised"] = json.load(open(args.knots_from))["optimised"]
    for sampler in args.samplers if "optimise" in args.parts else ():
        for nfe in args.nfe:
            ts0 = logsnr_steps(cos, sampler, nfe)
            starts = starts_for(cos, sampler, nfe)
            warm = out["optimised"].get(f"dpmpp2m/{nfe}", {}).get("optimised")
            if sampler != "dpmpp2m" and warm and warm[-1] == ts0[-1]:
                starts.append(warm)
            g = torch.Generator().manual_seed(0)
            t1 = time.perf_counter()
            ts = optimise_timesteps(ring, cos, nfe, sampler, n=args.n_opt, iters=args.iters, generator=g,
                                    init=starts)
            t2 = time.perf_counter()
            warm_gap = out["optimised"].get(f"dpmpp2m/{nfe}", {}).get("optimised_gap")
            starts_gap = [*starts, ts.tolist()] + ([warm_gap] if sampler != "dpmpp2m" and warm_gap
                                               and warm_gap[-1] == ts0[-1] else [])
            ts_gap = optimise_timesteps(ring, cos, nfe, sampler, n=args.n_opt, iters=args.iters,
                                        generator=torch.Generator().manual_seed(0), init=starts_gap,
                                        min_gap=args.min_gap)
            x_T = torch.randn(args.n_opt, 2, generator=torch.Generator().manual_seed(0))
            ref = ode_reference(ring, cos, x_T, ts0[-1])
            ts_def = shipped_steps(cos, sampler, nfe)
            e0, e1, e2, e3 = (discretisation_error(ring, cos, t, sampler, noise=x_T, reference=ref)
                              for t in (ts_def, ts0, ts, ts_gap))
            out["optimised"][f"{sampler}/{nfe}"] = {
                "default": ts_def, "logsnr": ts0, "optimised": ts.tolist(), "optimised_gap": ts_gap.tolist(),
                "starts": starts, "starts_gap": starts_gap, "seconds": t2 - t1,
                "seconds_gap": time.perf_counter() - t2, "rms_train_default": e0 ** 0.5,
                "rms_train_logsnr": e1 ** 0.5, "rms_train_optimised": e2 ** 0.5, "rms_train_optimised_gap": e3 ** 0.5}
            print(f"optimised {sampler} {nfe}: {ts_def} (default) -> {ts.tolist()} / gap {ts_gap.tolist()}, "
                  f"train RMS {e0 ** 0.5:.4f} (logsnr {e1 ** 0.5:.4f}) -> {e2 ** 0.5:.4f} / {e3 ** 0.5:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if args.out and "optimise" in args.parts:
        with open(args.out, "w") as f:                      # the knots, for a --parts transfer process
            json.dump(out, f, indent=1)
    # 2. held-out x_T on every mixture and schedule
    for sname in ("cosine", "linear") if "transfer" in args.parts else ():
        sched = NoiseSchedule.from_name(sname, 1000)
        theirs = diffusers_solvers(sched.betas.numpy()) if not args.no_diffusers else {}
        for mname, mix in mixes.items():
            oracle = GaussianMixtureOracle(mix, sched)
            h = 0.5 * float(mix.stds.min())
            key = f"{mname}/{sname}"
            res = out["transfer"][key] = {}
            for seed in range(args.seeds):
                x_T = torch.randn(args.n, mix.dim, generator=torch.Generator().manual_seed(100 + seed))
                fresh = mix.sample(args.n, torch.Generator().manual_seed(5000 + seed))[0]
                refs = {}
                for sampler in args.samplers:
                    for nfe in args.nfe:
                        ts0 = logsnr_steps(sched, sampler, nfe)
                        variants = {"default": shipped_steps(sched, sampler, nfe), "logsnr": ts0}
                        for v in VARIANTS[2:]:
                            ts1 = out["optimised"][f"{sampler}/{nfe}"][v]
                            variants[v] = ts1 if sname == "cosine" else transfer(ts1, cos, sched, (ts0[0], ts0[-1]))
                        if ts0[-1] not in refs:
                            refs[ts0[-1]] = ode_reference(oracle, sched, x_T, ts0[-1])
                        for variant, ts in variants.items():
                            x = sample(oracle, sched, x_T.shape, sampler, spacing=ts, noise=x_T)
                            rms = float((x - refs[ts0[-1]]).double().pow(2).sum(1).mean().sqrt())
                            r = res.setdefault(f"{sampler}/{nfe}/{variant}", {"timesteps": ts, "runs": []})
                            r["runs"].append([rms, *metrics(x, fresh, h, args.projections)])
                for nfe in [n for n in args.diffusers_nfe if n in args.nfe]:
                    for name, make in theirs.items():
                        x = diffusers_sample(make(), oracle, x_T, nfe)
                        r = res.setdefault(f"diffusers {name}/{nfe}", {"runs": []})
                        r["runs"].append([None, *metrics(x, fresh, h, args.projections)])
            print(f"{key}: done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    # 3. the trained digits model: same schedule (cosine), same code timesteps
    if args.digits_seeds and "digits" in args.parts:
        model, dsched, cfg = load("digits")
        out["digits"]["schedule"] = cfg.schedule
        clf = load_digits_classifier()
        f_train = extract_features(load_digits("train")[0], clf)[0]
        for sampler in args.samplers:
            for nfe in [n for n in args.digits_nfe if n in args.nfe]:
                for variant in VARIANTS:
                    ts = out["optimised"][f"{sampler}/{nfe}"][variant]
                    fids = digits_fids(model, dsched, cfg, clf, f_train, sampler, ts, args)
                    out["digits"][f"{sampler}/{nfe}/{variant}"] = {"timesteps": ts, "fid": fids}
                    print(f"digits {sampler} {nfe} {variant}: FID {np.mean(fids):.3f} ± "
                          f"{np.std(fids, ddof=1) / math.sqrt(len(fids)):.3f} ({time.perf_counter() - t0:.0f} s)",
                          file=sys.stderr, flush=True)
    # 4. each mixture's own optimum (cosine): does optimising help where the steps are optimised?
    for mname in args.self_mixtures if "self" in args.parts else ():
        mix = mixes[mname]
        oracle = GaussianMixtureOracle(mix, cos)
        h = 0.5 * float(mix.stds.min())
        res = out["self"].setdefault(f"{mname}/cosine", {})
        for sampler in args.self_samplers:
            for nfe in args.self_nfe:
                ts0 = logsnr_steps(cos, sampler, nfe)
                t1 = time.perf_counter()
                ts = optimise_timesteps(oracle, cos, nfe, sampler, n=args.n_opt, iters=args.iters,
                                        init=starts_for(cos, sampler, nfe),
                                        generator=torch.Generator().manual_seed(0)).tolist()
                r = res[f"{sampler}/{nfe}"] = {"timesteps": ts, "seconds": time.perf_counter() - t1, "runs": []}
                for seed in range(args.seeds):                      # the held-out draws of part 2
                    x_T = torch.randn(args.n, mix.dim, generator=torch.Generator().manual_seed(100 + seed))
                    fresh = mix.sample(args.n, torch.Generator().manual_seed(5000 + seed))[0]
                    ref = ode_reference(oracle, cos, x_T, ts0[-1])
                    x = sample(oracle, cos, x_T.shape, sampler, spacing=ts, noise=x_T)
                    rms = float((x - ref).double().pow(2).sum(1).mean().sqrt())
                    r["runs"].append([rms, *metrics(x, fresh, h, args.projections)])
                print(f"self {mname} {sampler} {nfe}: {shipped_steps(cos, sampler, nfe)} (default) -> {ts} ({time.perf_counter() - t0:.0f} s)",
                      file=sys.stderr, flush=True)
    # 5. steps optimised against the digits network's own probability-flow ODE (no oracle), then FID
    if "digits_self" in args.parts:
        model, dsched, cfg = load("digits")
        clf = load_digits_classifier()
        f_train = extract_features(load_digits("train")[0], clf)[0]
        for sampler in args.self_samplers:
            for nfe in args.self_nfe:
                t1 = time.perf_counter()
                ts = optimise_timesteps(model, dsched, nfe, sampler, shape=(1, 8, 8), prediction=cfg.prediction,
                                        n=args.digits_self_n, iters=args.digits_self_iters, candidates=8,
                                        init=starts_for(dsched, sampler, nfe, cfg.prediction), generator=torch.Generator().manual_seed(0)).tolist()
                fids = digits_fids(model, dsched, cfg, clf, f_train, sampler, ts, args)
                out["digits"][f"{sampler}/{nfe}/self"] = {"timesteps": ts, "fid": fids,
                                                         "seconds": time.perf_counter() - t1}
                print(f"digits self {sampler} {nfe}: {ts}, FID {np.mean(fids):.3f} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    out["seconds"] = time.perf_counter() - t0
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-opt", type=int, default=512, help="draws of x_T the optimiser uses")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--min-gap", type=float, default=0.5, help="min_gap of the constrained variant")
    p.add_argument("--n", type=int, default=1000, help="held-out samples per seed")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--projections", type=int, default=200)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 7, 10])
    p.add_argument("--samplers", nargs="+", default=["dpmpp2m", "unipc", "ddim"])
    p.add_argument("--digits-n", type=int, default=2000)
    p.add_argument("--digits-seeds", type=int, default=3)
    p.add_argument("--digits-nfe", type=int, nargs="+", default=[5, 10])
    p.add_argument("--diffusers-nfe", type=int, nargs="+", default=[5, 10])
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--parts", nargs="+", default=["optimise", "transfer", "digits", "self", "digits_self"])
    p.add_argument("--self-mixtures", nargs="+", default=["grid", "narrow", "10-D"])
    p.add_argument("--self-samplers", nargs="+", default=["dpmpp2m", "unipc"])
    p.add_argument("--self-nfe", type=int, nargs="+", default=[5])
    p.add_argument("--digits-self-n", type=int, default=256, help="draws for optimising on the digits network")
    p.add_argument("--digits-self-iters", type=int, default=2)
    p.add_argument("--knots-from", default=None, help="take the optimised knots from this results file")
    p.add_argument("--merge", nargs="+", default=None, help="merge the results files of --parts runs into --out")
    p.add_argument("--note", default=None, help="a remark on how the merged runs were made")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.merge:
        parts = [json.load(open(f)) for f in args.merge]
        out = dict(parts[0])
        for part in parts[1:]:
            for k, v in part["optimised"].items():
                assert v == out["optimised"][k], k                             # the same knots everywhere
            out["transfer"].update(part["transfer"])
            out["digits"].update(part["digits"])
            out.setdefault("self", {}).update(part.get("self", {}))
            for k, v in part["settings"].items():                  # options added after the first run
                out["settings"].setdefault(k, v)
        out["command"] = " ; ".join(part["command"] for part in parts) + " ; then " + "python " + " ".join(sys.argv)
        out["seconds"] = max(part.get("seconds", 0) for part in parts)
        if args.note:
            out["note"] = args.note
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        return
    out = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
