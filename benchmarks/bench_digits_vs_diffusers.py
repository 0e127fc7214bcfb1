"""Our samplers against diffusers' on a trained model: the shipped digits ε-model, every setting at its default.

The mixtures of bench_sampler_error.py rank samplers against an exact oracle; this is the check on a trained
network. For DDIM, DPM-Solver++(2M), 3M and UniPC at --nfe steps: the FID (shipped classifier, against the
training digits; samples clamped to [-1, 1] as `evaluate_samples` does) of

- ours with every argument of `sample` at its default ("ours"), with `clip_denoised=True`, the setting
  chapters 13 and 20 use for this model ("ours, clipped"), and clipped on diffusers' DDIM steps,
  `spacing="leading"` ("ours, clipped, leading": from t = T - T/S down to t = 0), and clipped on the default
  spacing with the last step ending at σ = 0, `end="zero"` ("ours, clipped, end zero": where the default ends at
  code t = 0, below 20 steps, the former default), and clipped with 3M's last three steps at up to third order
  ("ours, clipped, tail=3": TAIL_ORDER2_FROM set out of reach, the former 3M on 10 to 14 steps);
- diffusers' DDIMScheduler, DPMSolverMultistepScheduler (2M, 3M), UniPCMultistepScheduler and
  DEISMultistepScheduler at their defaults (DDIM's default clips x̂_0 to [-1, 1]; the others do not clip),
  given the model's own betas, and the multistep ones also with timestep_spacing="leading" (", leading"):
  their default 'linspace' starts at t = T, where this cosine schedule's ᾱ is 2.4e-9;

all from the same x_T, paired over --seeds seeds of --n samples. Also the share of pixels beyond ±1.5 before
the clamp (a run that went numerically wrong shows there first).

    python benchmarks/bench_digits_vs_diffusers.py [--n 1000] [--seeds 3] [--nfe 5 10 20 50] [--out FILE]
    in parts: [--ours default clipped clipped-leading clipped-zero clipped-tail3] [--samplers ddim ...] [--no-diffusers] --out PART.json,
    then --merge PART.json ... --out FILE (the same --n, --seeds and --nfe in every part; a later part's
    keys replace an earlier one's)
"""
import argparse
import datetime
import json
import platform
import sys
import time
import warnings

import numpy as np
import torch

from simple_diffusion import pretrained
from simple_diffusion.data import load_digits
from simple_diffusion.metrics import evaluate_samples, load_digits_classifier
from simple_diffusion.sampling import SamplingWarning, sample

from bench_sampler_error import full_tail  # 3M's last three steps at up to third order (beside this script)

OURS = ("ddim", "dpmpp2m", "dpmpp3m", "unipc")
VARIANTS = {"default": ("ours", False, None, None), "clipped": ("ours, clipped", True, None, None),
            "clipped-leading": ("ours, clipped, leading", True, "leading", None),
            "clipped-zero": ("ours, clipped, end zero", True, None, "zero"),  # label, clip_denoised, spacing, end
            "clipped-tail3": ("ours, clipped, tail=3", True, None, None)}  # and TAIL_ORDER2_FROM out of reach


COUNTERPART = {"ddim": "ddim", "dpmpp2m": "dpm++2m", "dpmpp3m": "dpm++3m", "unipc": "unipc"}


def diffusers_schedulers(betas) -> dict:
    """diffusers' schedulers at their defaults, on the model's betas; the multistep ones also with
    timestep_spacing='leading' (DDIM's default), which starts below the last step t = T."""
    import diffusers as d
    multi = {"dpm++2m": lambda **kw: d.DPMSolverMultistepScheduler(trained_betas=betas, solver_order=2, **kw),
             "dpm++3m": lambda **kw: d.DPMSolverMultistepScheduler(trained_betas=betas, solver_order=3, **kw),
             "unipc": lambda **kw: d.UniPCMultistepScheduler(trained_betas=betas, **kw),
             "deis": lambda **kw: d.DEISMultistepScheduler(trained_betas=betas, **kw)}
    out = {"ddim": lambda: d.DDIMScheduler(trained_betas=betas)}
    for name, make in multi.items():
        out[name] = make
        out[f"{name}, leading"] = lambda make=make: make(timestep_spacing="leading")
    return out


@torch.no_grad()
def diffusers_run(scheduler, net, x_T, steps, batch=500):
    "The plain diffusers loop (set_timesteps, then model + step per timestep), in chunks of `batch`."
    out = []
    for x in x_T.split(batch):
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t.expand(len(x)).long()), t, x).prev_sample
        out.append(x)
    return torch.cat(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--ours", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--samplers", nargs="+", default=list(OURS), choices=list(OURS), help="ours to run")
    p.add_argument("--merge", nargs="+", default=None, help="merge the results files of parts into --out")
    p.add_argument("--note", default=None, help="with --merge: a remark on how the parts were made")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.merge:
        parts = [json.load(open(f)) for f in args.merge]
        out = dict(parts[0], fid={}, over={})
        for part in parts:
            assert (part["n"], part["seeds"], part["nfe"]) == (out["n"], out["seeds"], out["nfe"]), "parts differ"
            out["fid"].update(part["fid"])
            out["over"].update(part["over"])
        out["command"] = " ; ".join(part["command"] for part in parts) + " ; then python " + " ".join(sys.argv)
        if args.note:
            out["note"] = args.note
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        return
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", SamplingWarning)  # a bad run is scored, not stopped
    net, sched, cfg = pretrained.load("digits", device="cpu")
    if cfg.prediction != "eps":
        raise SystemExit(f"this benchmark assumes an ε-model, the digits model predicts {cfg.prediction}")
    xtr, clf = load_digits("train")[0], load_digits_classifier()
    theirs = {} if args.no_diffusers else diffusers_schedulers(sched.betas.double().numpy())
    import diffusers
    out = {"command": "python " + " ".join(sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "machine": f"{platform.node()} {platform.machine()}, torch {torch.__version__}, "
                      f"diffusers {diffusers.__version__}, 1 thread",
           "n": args.n, "seeds": args.seeds, "nfe": args.nfe, "counterpart": COUNTERPART,
           "fid": {}, "over": {}}

    def score(key, x):
        out["over"].setdefault(key, []).append(float((x.abs() > 1.5).float().mean()))
        x = torch.nan_to_num(x, nan=0.0).clamp(-1, 1)
        out["fid"].setdefault(key, []).append(evaluate_samples(x, xtr, classifier=clf, kid_subsets=2)["fid"])

    t0 = time.perf_counter()
    for seed in range(args.seeds):
        x_T = torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        for nfe in args.nfe:
            for s in args.samplers:
                for v in args.ours:
                    tag, clip, sp, end = VARIANTS[v]
                    with full_tail(v == "clipped-tail3"):
                        score(f"{tag} {s} {nfe}", sample(net, sched, x_T.shape, s, nfe, noise=x_T, clip_denoised=clip,
                                                         spacing=sp, end=end, batch_size=500))
            for name, make in theirs.items():
                score(f"diffusers {name} {nfe}", diffusers_run(make(), net, x_T, nfe))
        print(f"seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    for k, v in out["fid"].items():
        print(f"FID {k:28s} {np.mean(v):8.3f}  per seed {np.round(v, 3).tolist()}  "
              f"beyond ±1.5: {100 * np.mean(out['over'][k]):.2f} %")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
