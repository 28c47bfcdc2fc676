#!/usr/bin/env bash
# The benchmarks on a CUDA device, unchanged: run it on a machine with a GPU.
#   bash bench/gpu.sh            (after `make install`)
# Prints the same tables and JSON lines as `make bench`, with images/s on the GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: torch finds no CUDA device')"
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
"$PY" bench/loop_overhead.py --device cuda --samples 60000 --epochs 4
"$PY" bench/loop_overhead.py --device cuda --samples 60000 --epochs 4 --precision bf16
"$PY" bench/data_pipeline.py --device cuda
"$PY" bench/end_to_end.py --device cuda
# NCCL data parallel on two GPUs, where there are two (not yet run: no multi-GPU machine so far)
if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  "$PY" bench/ddp_overhead.py --device cuda --processes 2 --samples 60000 --epochs 4
fi
