#!/usr/bin/env bash
# GPU checks: the tests marked `gpu`, the training throughput benchmark, and a short CLI training run on CUDA.
# Takes well under 5 minutes on one GPU. Usage: bash benchmarks/gpu_check.sh   (PY=python to use another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}; [ -x "$PY" ] || PY=python
BIN=$(dirname "$(command -v "$PY")")
"$PY" -c "import sys, torch; sys.exit('gpu_check: no CUDA device here') if not torch.cuda.is_available() else print('GPU:', torch.cuda.get_device_name())"
echo "== pytest -m gpu"
"$PY" -m pytest -m gpu -q -p no:cacheprovider tests
echo "== training throughput (digits U-Net)"
"$PY" benchmarks/train_throughput.py --device cuda --steps 50
echo "== simple-diffusion train on CUDA, 300 steps"
OUT=$(mktemp -d)
"$BIN/simple-diffusion" train --data digits --steps 300 --out "$OUT/digits" --device cuda --class-conditional --log-every 100 --quiet
tail -n 1 "$OUT/digits/log.jsonl"
rm -rf "$OUT"
