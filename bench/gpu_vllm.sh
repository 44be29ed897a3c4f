#!/usr/bin/env bash
# catlens's vLLM backend on a CUDA machine, as is: the GPU equivalence tests and the benchmark on the embedded model,
# then, when a checkpoint folder is given, on that model with tensor parallelism.
#
#   bash bench/gpu_vllm.sh                          # embedded model, one GPU
#   bash bench/gpu_vllm.sh /models/llama-3-8b 4     # a local checkpoint folder on 4 GPUs
#
# Uses the CUDA vLLM already installed in the active Python; without one it installs `vllm` (and catlens) where a
# package index is reachable. Results: runs/bench-vllm-gpu*/ and the test output.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=${1:-}
TP=${2:-1}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device visible to $PY: this script is for a GPU machine (the CPU suite is 'make test')" >&2
  exit 1
fi
"$PY" -c "import vllm" 2>/dev/null || "$PY" -m pip install vllm
"$PY" -c "import catlens" 2>/dev/null || "$PY" -m pip install -e ".[dev]"
"$PY" -m pytest -q -s -m gpu tests/engines/test_vllm_gpu.py
"$PY" bench/bench_vllm.py --device cuda --out runs/bench-vllm-gpu
if [ -n "$MODEL" ]; then
  CATLENS_GPU_MODEL="$MODEL" CATLENS_GPU_TP="$TP" "$PY" -m pytest -q -s -m gpu tests/engines/test_vllm_gpu.py
  "$PY" bench/bench_vllm.py --model "$MODEL" --tensor-parallel-size "$TP" --device cuda --layer 18 \
    --out "runs/bench-vllm-gpu-$(basename "$MODEL")-tp$TP"
fi
