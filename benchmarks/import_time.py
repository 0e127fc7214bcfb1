"""Import time of `simple_diffusion` (lazy top level) against `torch` itself, in fresh processes.

    python benchmarks/import_time.py [--repeats 5]

Prints the median seconds and the ratio; `import simple_diffusion` should cost a small fraction of
`import torch`, since the top level imports nothing heavy until a name is used.
"""
import argparse
import statistics
import subprocess
import sys


def timed(stmt: str, repeats: int) -> float:
    code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True).stdout) for _ in range(repeats)]
    return statistics.median(runs)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    n = ap.parse_args().repeats
    pkg, torch_ = timed("import simple_diffusion", n), timed("import torch", n)
    full = timed("import simple_diffusion as sd; sd.sample", n)
    print(f"import simple_diffusion: {pkg * 1e3:.1f} ms; import torch: {torch_ * 1e3:.0f} ms "
          f"(ratio {pkg / torch_:.3f}); first use of sd.sample (imports torch): {full * 1e3:.0f} ms")
