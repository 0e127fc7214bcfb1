"""Sampler error isolated from model error: every sampler driven by the exact denoiser of the 8-Gaussian ring.

Ours (DDPM, DDIM η=0, DPM-Solver++(2M), each with the three spacings) and diffusers' DPMSolverMultistepScheduler
(algorithm_type="dpmsolver++", solver_order=2, its defaults otherwise: timestep_spacing="linspace",
final_sigmas_type="zero", lower_order_final=True; and the same with timestep_spacing="trailing") and
DDIMScheduler (η = 0, leading and trailing), all with trained_betas = our cosine betas (T = 1000) and the same
oracle as the model. For each NFE: MMD² (Gaussian kernel, h = 0.05) to a fixed set of true samples and the
mean exact log-likelihood, each the mean over --seeds runs of --n samples (float32 everywhere); the noise floor
(MMD² between independent true sets) and −H(p) are printed for reference.
Goal: our best sampler at 10 NFE at least as accurate (MMD²) as diffusers' DPM-Solver++ at 10 NFE.

    python benchmarks/bench_sampler_error.py [--n 4000] [--seeds 3] [--nfe 5 10 20 50 100]
"""
import argparse

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from simple_diffusion.data import toy_mixture
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.sampling import SAMPLERS, SPACINGS, mmd2_rbf, sample
from simple_diffusion.schedules import NoiseSchedule


@torch.no_grad()
def diffusers_sample(scheduler, model, x_T, steps):
    scheduler.set_timesteps(steps)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(len(x))), t, x).prev_sample
    return x


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4000); p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    a = p.parse_args()
    torch.set_num_threads(1)
    sched = NoiseSchedule.from_name("cosine", 1000)
    mix = toy_mixture("gmm8")
    oracle = GaussianMixtureOracle(mix, sched)
    g = torch.Generator().manual_seed(123)
    ref = mix.sample(a.n, g)[0]
    floor = [mmd2_rbf(mix.sample(a.n, g)[0], ref) for _ in range(8)]
    negH = float(mix.log_prob(mix.sample(200_000, g)[0]).mean())
    betas = sched.betas.numpy()
    theirs = {
        "diffusers DPM++(2M) linspace": lambda: DPMSolverMultistepScheduler(trained_betas=betas, algorithm_type="dpmsolver++", solver_order=2),
        "diffusers DPM++(2M) trailing": lambda: DPMSolverMultistepScheduler(trained_betas=betas, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"),
        "diffusers DDIM leading": lambda: DDIMScheduler(trained_betas=betas, clip_sample=False, set_alpha_to_one=True),
        "diffusers DDIM trailing": lambda: DDIMScheduler(trained_betas=betas, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"),
    }
    rows = {}
    for nfe in a.nfe:
        for seed in range(a.seeds):
            x_T = torch.randn(a.n, 2, generator=torch.Generator().manual_seed(seed))
            runs = {f"ours {s} {sp}": (lambda s=s, sp=sp: sample(oracle, sched, x_T.shape, s, nfe, spacing=sp, noise=x_T,
                                                                 generator=torch.Generator().manual_seed(seed)))
                    for s in SAMPLERS for sp in SPACINGS}
            runs.update({name: (lambda make=make: diffusers_sample(make(), oracle, x_T, nfe)) for name, make in theirs.items()})
            for name, run in runs.items():
                x = run()
                rows.setdefault((name, nfe), []).append((mmd2_rbf(x, ref), float(mix.log_prob(x.double()).mean())))
    names = list(dict.fromkeys(n for n, _ in rows))
    print(f"MMD² (h = 0.05) / mean log p, mean of {a.seeds} runs of {a.n} samples; noise floor {np.mean(floor):.2e} ± {np.std(floor):.1e} (sd); "
          f"−H(p) = {negH:.3f}")
    print(f"{'sampler':32s}" + "".join(f"{f'NFE {n}':>20s}" for n in a.nfe))
    for name in names:
        cells = [np.mean(rows[name, n], 0) for n in a.nfe]
        print(f"{name:32s}" + "".join(f"{m:>11.2e} /{l:>6.2f}" for m, l in cells))
    if 10 in a.nfe:
        mmd10 = {name: np.mean(rows[name, 10], 0)[0] for name in names}
        ours = min((n for n in names if n.startswith("ours")), key=mmd10.get)
        ref_name = "diffusers DPM++(2M) linspace"
        print(f"at 10 NFE: our best is '{ours}' with MMD² {mmd10[ours]:.2e}; {ref_name} (diffusers' defaults): {mmd10[ref_name]:.2e}; "
              f"ratio {mmd10[ours] / mmd10[ref_name]:.2f} (goal <= 1: {'met' if mmd10[ours] <= mmd10[ref_name] else 'MISSED'})")
        same = "ours dpmpp2m trailing"
        print(f"like for like (DPM++(2M), trailing): ours {mmd10[same]:.2e}, diffusers {mmd10['diffusers DPM++(2M) trailing']:.2e}")


if __name__ == "__main__":
    main()
