#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a machine with CUDA torch, triton, transformers,
# peft, tokenizers, safetensors and pytest already installed and no network (nothing is
# installed: the package is put on PYTHONPATH from this checkout). Results land in $OUT
# (default benchmarks/results/gpu):
#   gpu_static.json  preflight: every kernel variant compiled for the GPU's own target with
#                  registers, spills, shared memory, occupancy, tensor cores (+ gpu_static.log;
#                  the same check `make test` runs for sm_80 and sm_90 on a CPU)
#   tests.log      `gpu`-marked tests: kernels at GPU shapes, Triton decode plans in persistent
#                  buffers, the engine capturing CUDA graphs by default (and eager) against
#                  transformers and PEFT, plus the engine on the Triton backend with mixed adapters
#   kernels.json   decode bandwidth vs copy bandwidth, grouped vs plain decode, prefill vs SDPA
#                  (+ bench.log with the tables)
#   e2e.json       an 8B-shaped bf16 model (Llama-3-8B's config, random weights): eager vs
#                  compiled vs compiled + CUDA graphs, 64 zipf adapters vs one, vs transformers
#                  (+ e2e.log with the table). E2E_LAYERS=8 runs a shorter model when time is short.
#   multiturn.json 32 conversations x 4 turns behind a 512-token system prompt on the default
#                  model in bf16, prefix caching on vs off (cached blocks read in place by the
#                  Triton kernels, shared runs grouped) (+ multiturn.log)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
shim=$(mktemp -d)
mkdir -p "$shim/prefixserve"
ln -s "$PWD"/serving/* "$shim/prefixserve/"
ln -s "$PWD/kernels" "$shim/prefixserve/kernels"
export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import prefixserve.kernels, torch, triton; print('prefixserve from', prefixserve.kernels.__file__, '| torch', torch.__version__, '| triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
sm=$(python3 -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability())")
python3 benchmarks/kernels/gpu_static.py --targets "$sm" --jobs 8 --cache-dir none --quiet \
  --json "$OUT/gpu_static.json" 2>&1 | tee "$OUT/gpu_static.log" \
  || echo "gpu_static preflight failed: see $OUT/gpu_static.log"
python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_triton_backend.py \
  tests/test_cuda_graphs.py 2>&1 | tee "$OUT/tests.log"
python3 benchmarks/kernels/bench_attention.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.log"
python3 benchmarks/bench_gpu_e2e.py ${E2E_LAYERS:+--layers "$E2E_LAYERS"} \
  --out "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.log"
python3 benchmarks/bench_multiturn.py --dtype bfloat16 --json "$OUT/multiturn.json" 2>&1 \
  | tee "$OUT/multiturn.log"
