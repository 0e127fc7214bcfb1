"""The k-shot augmentation grid of chapter 32: does training a classifier on diffusion samples help?

    OMP_NUM_THREADS=1 python scripts/augment_grid.py [--ks 1 2 5 10 20] [--seeds 0 1 2 3 4]

For every (k, seed): k digits per class drawn from the training split, a class-conditional generator trained on
those k*10 images only (the guidance weight chosen on a validation split of them), and identical classifiers trained
on real, real + classic augmentation, real + m*k synthetic per class, synthetic only and real + SDEdit variations,
all scored on the untouched test split (augment.kshot_experiment). Writes nbs/results/augment.json after every cell
(the command, the date, the machine and the settings are recorded in it); nbs/32_augmentation.ipynb reads it.
"""
import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch

from simple_diffusion.augment import kshot_experiment
from simple_diffusion.data import load_digits

OUT = Path(__file__).resolve().parents[1] / "nbs" / "results" / "augment.json"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10, 20], help="images per class")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--gen-steps", type=int, default=600, help="generator optimiser steps")
    ap.add_argument("--clf-steps", type=int, default=200, help="classifier optimiser steps")
    ap.add_argument("--sample-steps", type=int, default=20, help="DDIM steps per sample")
    ap.add_argument("--note", default="", help="recorded in the file, e.g. why a grid was reduced")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--resume", action="store_true",
                    help="keep the cells of --out that belong to this grid (same settings); compute the rest")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    train, test = load_digits("train"), load_digits("test")
    settings = dict(gen_steps=a.gen_steps, clf_steps=a.clf_steps, sample_steps=a.sample_steps)
    command = "OMP_NUM_THREADS=1 python scripts/augment_grid.py " + " ".join(
        ["--ks " + " ".join(map(str, a.ks)), "--seeds " + " ".join(map(str, a.seeds)),
         f"--gen-steps {a.gen_steps}", f"--clf-steps {a.clf_steps}", f"--sample-steps {a.sample_steps}"]
        + ([f"--note {a.note!r}"] if a.note else []) + (["--resume"] if a.resume else []))
    result = dict(command=command, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
                  ks=a.ks, seeds=a.seeds, settings=settings, note=a.note, complete=False, cells=[])
    done = {}
    if a.resume and a.out.exists():
        old = json.loads(a.out.read_text())
        if old["settings"] == settings:
            done = {(c["k"], c["seed"]): c for c in old["cells"]}
            result["date_started"] = old.get("date_started", old["date"])
    t0 = time.perf_counter()
    for seed in a.seeds:  # seeds outer: a grid cut short still covers every k
        for k in a.ks:
            cell = done.get((k, seed)) or kshot_experiment(k, seed, train, test, **settings)
            result["cells"].append(cell)
            result["seconds"] = round(time.perf_counter() - t0, 1)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(dict(k=k, seed=seed, guidance=cell["guidance"], seconds=cell["seconds"],
                                  **cell["accuracy"])), flush=True)
    result["complete"] = True
    a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
