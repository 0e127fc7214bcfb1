"""Training throughput of the digits U-Net on the current device: images per second for batch sizes 64 and 256,
float32 against bf16 autocast (AMP) where the device is CUDA; on the CPU also 1 intra-op thread against 2 for the
small models (the toy MLP and the digits U-Net at batch 64), measured in this one process, alternating, so that a
loaded machine affects both alike. Prints a table and the ratios; asserts nothing about time.

    python benchmarks/train_throughput.py [--device auto] [--steps 30] [--warmup 5] [--compile] [--rounds 3]
"""
import argparse
import time

import torch

from simple_diffusion.data import load_digits
from simple_diffusion.nets import count_parameters
from simple_diffusion.training import TrainConfig, Trainer


def images_per_second(data, batch_size, amp, device, steps, warmup, compile):
    cfg = TrainConfig(data="digits", batch_size=batch_size, amp=amp, device=device, compile=compile,
                      steps=steps + warmup, log_every=10**6)
    tr = Trainer(cfg, data=data)
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    for _ in range(warmup): tr.train_step()                              # allocator, cuDNN autotuning, compilation
    sync(); t0 = time.perf_counter()
    for _ in range(steps): loss = tr.train_step()
    float(loss); sync()
    return steps * batch_size / (time.perf_counter() - t0), tr


def threads_ratio(data_by_name, steps, warmup, rounds):
    "Steps per second with 1 and 2 intra-op threads, per model, alternating 1, 2, 1, 2... (CPU only)."
    before, out = torch.get_num_threads(), {}
    for name, (cfg_kw, data) in data_by_name.items():
        tr = Trainer(TrainConfig(**cfg_kw, device="cpu", steps=10**6, log_every=10**6), data=data)
        rates = {1: [], 2: []}
        for _ in range(rounds):
            for n in (1, 2):
                torch.set_num_threads(n)
                for _ in range(warmup): tr.train_step()
                t0 = time.perf_counter()
                for _ in range(steps): tr.train_step()
                rates[n].append(steps / (time.perf_counter() - t0))
        out[name] = {n: sorted(r)[len(r) // 2] for n, r in rates.items()}      # the median round
    torch.set_num_threads(before)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto"); p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5); p.add_argument("--compile", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the 1-vs-2-threads comparison")
    a = p.parse_args()
    data = load_digits("train")
    probe = Trainer(TrainConfig(data="digits", device=a.device, steps=0), data=data)
    dev = probe.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {dev} ({name}); digits U-Net, {count_parameters(probe.model):,} parameters; torch {torch.__version__}")
    precisions = [False, True] if dev.type == "cuda" else [False]           # AMP (bf16 autocast) only on CUDA
    rates = {}
    for bs in (64, 256):
        for amp in precisions:
            rates[bs, amp], _ = images_per_second(data, bs, amp, a.device, a.steps, a.warmup, a.compile)
            print(f"batch {bs:4d}  {'bf16 AMP' if amp else 'fp32    '}  {rates[bs, amp]:10.0f} images/s"
                  f"  {rates[bs, amp] / bs:8.1f} steps/s")
    for bs in (64, 256):
        if (bs, True) in rates: print(f"AMP / fp32 at batch {bs}: {rates[bs, True] / rates[bs, False]:.2f}x")
    print(f"batch 256 / batch 64 (fp32): {rates[256, False] / rates[64, False]:.2f}x images/s")
    if dev.type == "cpu":
        from simple_diffusion.data import make_toy
        models = {"moons MLP (batch 128)": (dict(data="moons", batch_size=128), (make_toy("moons", 2000), None)),
                  "digits U-Net (batch 64)": (dict(data="digits", batch_size=64), data)}
        for name, r in threads_ratio(models, a.steps, a.warmup, a.rounds).items():
            print(f"{name}: 1 thread {r[1]:.1f} steps/s, 2 threads {r[2]:.1f} steps/s; 1 / 2 threads: "
                  f"{r[1] / r[2]:.2f}x (the CLI's default --threads is 1)")


if __name__ == "__main__":
    main()
