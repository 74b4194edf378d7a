#!/usr/bin/env bash
# The GPU check in one command (oisd_lab/bench/gpu.py; benchmarks/README.md, section "GPU check").
#   bash benchmarks/gpu/run.sh                # Qwen3-0.6B, the sharded runs on every GPU, Qwen3-4B, then pytest -m gpu
#   bash benchmarks/gpu/run.sh --cpu          # the same code on a tiny Qwen3 on CPU, in seconds
# Needs no network. Python packages the machine lacks are installed from the wheels in
# benchmarks/gpu/wheels/ when that folder exists (see the README for how to fill it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
if [ -d benchmarks/gpu/wheels ] && ls benchmarks/gpu/wheels/*.whl >/dev/null 2>&1; then
    target=${TMPDIR:-/tmp}/oisd_gpu_packages
    "$PY" -m pip install -q --no-index --no-deps --target "$target" benchmarks/gpu/wheels/*.whl
    export PYTHONPATH="$PWD:$target${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "$PY" -m oisd_lab.bench.gpu "$@"
