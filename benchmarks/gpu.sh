#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a machine with CUDA torch, triton, transformers,
# peft and pytest already installed and no network (nothing is installed: the package is put on
# PYTHONPATH from this checkout). Results land in $OUT (default benchmarks/results/gpu):
#   tests.log      kernel tests at GPU shapes (the `gpu` marker) and the engine on the Triton
#                  backend with mixed adapters, against transformers and PEFT
#   kernels.json   decode bandwidth vs copy bandwidth, grouped vs plain decode, prefill vs SDPA
#                  (+ bench.log with the tables)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
shim=$(mktemp -d)
mkdir -p "$shim/prefixserve"
ln -s "$PWD"/serving/*.py "$shim/prefixserve/"
ln -s "$PWD/kernels" "$shim/prefixserve/kernels"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import prefixserve.kernels, torch, triton; print('prefixserve from', prefixserve.kernels.__file__, '| torch', torch.__version__, '| triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_triton_backend.py 2>&1 | tee "$OUT/tests.log"
python3 benchmarks/kernels/bench_attention.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.log"
