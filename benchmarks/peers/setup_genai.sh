#!/usr/bin/env bash
# Creates the venv onnxruntime-genai runs in, apart from the project's: onnxruntime-genai requires the CPU
# `onnxruntime` package, whose module name collides with the project's onnxruntime-gpu (see /work/shared/PEERS.md).
# Its model builder needs torch (the CPU wheel, not the CUDA build), transformers, onnx, onnx_ir and safetensors,
# which the package does not install.
#
#     benchmarks/peers/setup_genai.sh VENV_DIR        # e.g. /work/genai-venv (outside the repo, or a git-ignored path)
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: $0 VENV_DIR" >&2
    exit 2
fi
venv="$1"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# A CPU torch wheel: one from pip's configured find-links if there is one (no download; its dependencies come from
# the index below), else PyTorch's CPU index.
"$venv/bin/python" -m pip install --quiet --no-index --no-deps torch 2>/dev/null \
    || "$venv/bin/python" -m pip install --quiet --index-url https://download.pytorch.org/whl/cpu torch
"$venv/bin/python" -m pip install --quiet torch onnxruntime-genai==0.18.0 transformers onnx onnx_ir safetensors numpy
"$venv/bin/python" -c "import onnxruntime_genai as og, onnxruntime, torch, transformers; \
print('onnxruntime-genai', og.__version__, 'onnxruntime', onnxruntime.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)"
