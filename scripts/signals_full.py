"""The full run of nbs/41_signals: train the DiffWave-style denoiser longer and wider, sample with
every sampler of the chapter, and write the metrics to results/signals_full.json.

    OMP_NUM_THREADS=1 python scripts/signals_full.py --steps 2000 --channels 32 --layers 8 --samples 512

The file records the command, the date, the machine and the time taken; the chapter reads it.
"""
import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from scipy.stats import wasserstein_distance

from simple_diffusion.sampling import sample
from simple_diffusion.schedules import NoiseSchedule, linear_betas
from simple_diffusion.signals import (SignalDenoiser, TimestepAligned, dominant_frequency, inpaint_replacement,
                                      make_signals, psd_error_db)
from simple_diffusion.training import Trainer, TrainConfig

OUT = Path(__file__).resolve().parents[1] / "results" / "signals_full.json"
FAST_BETAS = [1e-4, 1e-3, 0.01, 0.05, 0.2, 0.5]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--channels", type=int, default=32)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--train", type=int, default=8000, help="training signals")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    L, n = args.length, args.samples
    x_train, _ = make_signals(args.train, L, seed=0)
    x_test, _ = make_signals(512, L, seed=1)
    ref, _ = make_signals(n, L, seed=7)
    schedule = NoiseSchedule(linear_betas(50, 1e-4, 0.05))
    fast = NoiseSchedule(torch.tensor(FAST_BETAS, dtype=torch.float64))
    net = SignalDenoiser(channels=args.channels, layers=args.layers)
    cfg = TrainConfig(data="signals", steps=args.steps, batch_size=32, lr=2e-3, warmup=50, schedule="linear",
                      num_timesteps=50, ema_decay=0.99, seed=0, log_every=50)
    trainer = Trainer(cfg, model=net, data=(x_train, None))
    trainer.schedule = schedule                     # DiffWave's betas (see the chapter)
    trainer.fit(progress=False)
    model = trainer.ema.module.eval()
    x_T = torch.randn(n, 1, L, generator=torch.Generator().manual_seed(4))
    runs = {"DDPM, 50 steps": (model, schedule, "ddpm", None), "DDIM, 25 steps": (model, schedule, "ddim", 25),
            "DDIM, 10 steps": (model, schedule, "ddim", 10), "DDIM, 6 steps": (model, schedule, "ddim", 6),
            "DDPM, fast 6-step schedule": (TimestepAligned(model, schedule, fast), fast, "ddpm", None)}
    gen = {k: sample(m, s, x_T.shape, smp, st, noise=x_T, generator=torch.Generator().manual_seed(5))
           for k, (m, s, smp, st) in runs.items()}
    gen["real (held out)"] = x_test[:n]
    f_ref = dominant_frequency(ref)[0]
    metrics = {}
    for k, xs in gen.items():
        f, pf = dominant_frequency(xs)
        metrics[k] = dict(psd_db=psd_error_db(xs, ref), w1=float(wasserstein_distance(f, f_ref)),
                          peak_fraction=float(pf.mean()))
    gap = slice(L // 2 - 24, L // 2 + 24)
    x_obs = x_test[:128]
    mask = torch.ones(1, 1, L)
    mask[..., gap] = 0
    filled = inpaint_replacement(model, schedule, x_obs, mask, generator=torch.Generator().manual_seed(8))
    rmse = float((filled[..., gap] - x_obs[..., gap]).pow(2).mean().sqrt())
    res = dict(command="OMP_NUM_THREADS=1 python scripts/signals_full.py " + " ".join(sys.argv[1:] if argv is None else argv),
               date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               machine=f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} thread(s), "
                       f"torch {torch.__version__}".replace("  ", " "),
               seconds=round(time.perf_counter() - t_start, 1), settings=vars(args) | {"out": None},
               final_loss=sum(trainer.history[-50:]) / 50, metrics=metrics, inpaint_gap_rmse=rmse)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
