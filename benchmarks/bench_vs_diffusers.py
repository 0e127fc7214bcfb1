"""Our DDPM and DDIM loops against diffusers' DDPMScheduler / DDIMScheduler loops.

1. Agreement: the same model, the same x_T (and, for DDPM, the same generator) must give the same samples.
   The model is the exact Gaussian-mixture denoiser (8-Gaussian ring, cosine schedule, T = 1000), so the
   trajectories are meaningful; diffusers is configured to match: trained_betas = our betas,
   prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True, the same timestep_spacing.
   Tolerance 1e-3 absolute on samples of size ~2 (0.05 %): diffusers keeps ᾱ in float32 (relative error
   ~6e-8), which the 1/√ᾱ ≈ 2e4 of the first steps amplifies; DDIM stays near 2e-5. The 1000-step DDPM chain
   differs by ~3e-4 on average: diffusers' β_t = 1 − ᾱ_t/ᾱ_{t−1} in float32 is off by up to 1e-3 in relative
   terms where β ≈ 4e-5 (ours is float64), and the chain accumulates that over 1000 steps.
2. Loop overhead (every sampler, DPM-Solver++ 2M/3M against DPMSolverMultistepScheduler of that order, UniPC
   against UniPCMultistepScheduler at its defaults):
   wall time of the whole sampling loop with a near-zero-cost model (one 2x2 linear layer on
   [64, 2]), so that the loop dominates; ours / diffusers, for 50 and 1000 steps; best of --repeats runs
   (ours and diffusers' alternating, so that both see the same load on a shared machine),
   one thread, under torch.no_grad() for both. Goal: ratio <= 0.7. Also the ratio with the digits U-Net,
   where the network dominates.

    python benchmarks/bench_vs_diffusers.py [--repeats 5] [--tiny-only]
"""
import argparse
import time
import warnings

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from simple_diffusion.data import toy_mixture
from simple_diffusion.nets import make_unet
from simple_diffusion.oracle import GaussianMixtureOracle
from simple_diffusion.sampling import SamplingWarning, sample, space_timesteps
from simple_diffusion.schedules import NoiseSchedule


def diffusers_loop(cls, schedule, model, x_T, steps, spacing, generator=None, order=None):
    extra = {"set_alpha_to_one": True} if cls is DDIMScheduler else {}
    if cls is DPMSolverMultistepScheduler: extra = {"solver_order": order}
    elif cls is UniPCMultistepScheduler: extra = {}
    elif cls is not UniPCMultistepScheduler: extra["clip_sample"] = False
    s = cls(num_train_timesteps=schedule.num_timesteps, trained_betas=schedule.betas.numpy(), prediction_type="epsilon",
            timestep_spacing=spacing, **extra)
    s.set_timesteps(steps)
    x = x_T
    for t in s.timesteps:
        out = model(x, t.expand(len(x)))
        if cls is DDPMScheduler: x = s.step(out, t, x, generator=generator).prev_sample
        elif cls is DDIMScheduler: x = s.step(out, t, x, eta=0.0).prev_sample
        else: x = s.step(out, t, x).prev_sample
    return x


def agreement():
    sched = NoiseSchedule.from_name("cosine", 1000)
    oracle = GaussianMixtureOracle(toy_mixture("gmm8"), sched)
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    print("== agreement (max and mean |ours - diffusers|, tolerance 1e-3 on the max)")
    worst = 0.0
    for sampler, cls in (("ddim", DDIMScheduler), ("ddpm", DDPMScheduler)):
        for spacing in ("leading", "trailing"):
            for steps in (10, 50, 1000):
                d = DDIMScheduler(timestep_spacing=spacing)
                d.set_timesteps(steps)
                assert torch.equal(d.timesteps.flip(0), space_timesteps(1000, steps, spacing))
                with torch.no_grad():
                    theirs = diffusers_loop(cls, sched, oracle, x_T, steps, spacing, torch.Generator().manual_seed(1))
                ours = sample(oracle, sched, x_T.shape, sampler, steps, spacing=spacing, noise=x_T, generator=torch.Generator().manual_seed(1))
                err = float((ours - theirs).abs().max())
                worst = max(worst, err)
                print(f"  {sampler:4s} {spacing:8s} {steps:5d} steps: max {err:.2e}, mean {float((ours - theirs).abs().mean()):.2e}")
    assert worst < 1e-3, worst
    print(f"  worst {worst:.2e}: OK")


def best_times(fs, repeats):
    "The best wall time of each function in fs over `repeats` rounds, the functions alternating."
    times = [[] for _ in fs]
    for _ in range(repeats):
        for f, ts in zip(fs, times):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
    return [min(ts) for ts in times]


def overhead(repeats, tiny_only=False):
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", SamplingWarning)     # untrained models from t = T-1: garbage by design
    sched = NoiseSchedule.from_name("cosine", 1000)
    lin = torch.nn.Linear(2, 2)
    tiny = lambda x, t: lin(x)
    cases = [("tiny linear, [64, 2]", tiny, (64, 2), (50, 1000))]
    if not tiny_only:
        cases.append(("digits U-Net (16 ch), [16, 1, 8, 8]", make_unet("digits", base_channels=16).eval(), (16, 1, 8, 8), (50,)))
    print(f"== wall time, best of {repeats}, 1 thread, torch {torch.__version__}")
    ratios = {}
    for name, model, shape, step_counts in cases:
        x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for steps in step_counts:
            for sampler, cls, order in (("ddpm", DDPMScheduler, None), ("ddim", DDIMScheduler, None),
                                        ("dpmpp2m", DPMSolverMultistepScheduler, 2), ("dpmpp3m", DPMSolverMultistepScheduler, 3),
                                        ("unipc", UniPCMultistepScheduler, None)):
                theirs = lambda: diffusers_loop(cls, sched, model, x_T, steps, "trailing", torch.Generator().manual_seed(1), order)
                ours = lambda: sample(model, sched, shape, sampler, steps, spacing="trailing", noise=x_T, generator=torch.Generator().manual_seed(1))
                with torch.no_grad():                    # sample() is under no_grad itself
                    td, to = best_times([theirs, ours], repeats)
                ratios[name, sampler, steps] = to / td
                print(f"  {name:36s} {sampler:7s} {steps:5d} steps: ours {to * 1e3:8.1f} ms  diffusers {td * 1e3:8.1f} ms  ratio {to / td:.2f}")
    loop = [r for (name, _, _), r in ratios.items() if name.startswith("tiny")]
    print(f"loop-overhead ratio ours/diffusers (tiny model): max {max(loop):.2f} (goal <= 0.7: {'met' if max(loop) <= 0.7 else 'MISSED'})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny-only", action="store_true", help="skip the digits U-Net rows (the loop-overhead goal needs only the tiny model)")
    a = p.parse_args()
    agreement()
    overhead(a.repeats, a.tiny_only)
