"""Full run of the discrete-diffusion chapter (nbs/42_discrete): a masked-diffusion transformer, an
autoregressive transformer of the same size trained on the same windows for the same steps, and a
Witten-Bell character n-gram, all measured in bits per character on the held-out docstrings.

    python scripts/run_discrete.py                      # the full run; writes benchmarks/results/discrete.json
    python scripts/run_discrete.py --steps 50 --out /tmp/x.json   # a smoke test
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from simple_diffusion.discrete import (CharNGram, TextTransformer, autoregressive_nll, bits_per_char,
                                       decode, docstring_corpus, masked_elbo, sample_unmask,
                                       split_sequences, train_text_model)

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--repeats", type=int, default=16, help="bound draws per held-out row")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/discrete.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    train, heldout_tokens = docstring_corpus("train"), docstring_corpus("heldout")
    heldout = split_sequences(heldout_tokens, a.length)
    cut = int(0.9 * len(train))
    valid = split_sequences(train[cut:], a.length)
    val = {n: bits_per_char(lambda x, lm=CharNGram(n).fit(train[:cut]): -lm.log_prob(x), valid).mean
           for n in range(1, 8)}
    order = min(val, key=val.get)
    ngram = CharNGram(order).fit(train)
    res_ngram = bits_per_char(lambda x: -ngram.log_prob(x), heldout)
    print(f"n-gram order {order}: {res_ngram.mean:.4f} bpc", flush=True)

    cfg = dict(length=a.length, width=a.width, depth=a.depth, heads=a.heads)
    models, curves, t0 = {}, {}, time.time()
    for objective in ("masked", "autoregressive"):
        torch.manual_seed(a.seed)
        m = TextTransformer(**cfg, causal=objective == "autoregressive")
        curves[objective] = train_text_model(m, train, objective, a.steps, a.batch_size, a.lr,
                                             generator=torch.Generator().manual_seed(a.seed + 1))
        models[objective] = m
        print(f"{objective}: trained, last-100 loss {sum(curves[objective][-100:]) / len(curves[objective][-100:]):.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)
    train_seconds = time.time() - t0
    gen = torch.Generator().manual_seed(a.seed + 2)
    res_masked = bits_per_char(lambda x: masked_elbo(models["masked"], x, gen), heldout, repeats=a.repeats)
    res_ar = bits_per_char(lambda x: autoregressive_nll(models["autoregressive"], x), heldout)
    print(f"masked <= {res_masked.mean:.4f}, AR {res_ar.mean:.4f}", flush=True)
    samples = []
    for S in (1, 8, a.length, 4 * a.length):
        xs = sample_unmask(models["masked"], 2, a.length, S, generator=torch.Generator().manual_seed(a.seed + 3))
        samples += [{"steps": S, "text": t} for t in decode(xs)]
    ar_texts = []   # the AR model's own samples, left to right, for comparison
    with torch.no_grad():
        x = torch.full((2, 1), 27, dtype=torch.long)
        g = torch.Generator().manual_seed(a.seed + 4)
        for _ in range(a.length):
            p = torch.softmax(models["autoregressive"](x)[:, -1].double(), -1)
            x = torch.cat([x, torch.multinomial(p, 1, generator=g)], 1)
        ar_texts = decode(x[:, 1:])
    stat = lambda r: {"bpc": r.mean, "stderr": r.stderr}
    out = {
        "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, {a.threads} thread), "
                   f"Python {platform.python_version()}, torch {torch.__version__}",
        "corpus": {"train_chars": len(train), "heldout_chars": len(heldout_tokens)},
        "heldout_rows": len(heldout),
        "config": {**cfg, "steps": a.steps, "batch_size": a.batch_size, "lr": a.lr,
                   "repeats": a.repeats, "seed": a.seed},
        "params": sum(p.numel() for p in models["masked"].parameters()),
        "train_seconds": train_seconds,
        "results": {"masked": stat(res_masked), "autoregressive": stat(res_ar),
                    "ngram": {**stat(res_ngram), "order": order, "validation_bpc": val}},
        "train_loss_last100": {k: sum(v[-100:]) / len(v[-100:]) for k, v in curves.items()},
        "samples": samples,
        "ar_samples": ar_texts,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
