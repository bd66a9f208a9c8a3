#!/bin/bash
# Issue 6's device check in one call on the lent H200 (read ../shared/gpu/NOTES.md first).
#
# Here, before any device time:
#   pip wheel --no-deps -w .gpu/ . && cp ../shared/gpu/baselines/*.py .gpu/ && ../shared/gpu/prepare
# On the device: one `run` per chunk as `prepare` says, all in one batch of tool calls, the last one
#   carry [".gpu/pK", ".gpu/assemble.sh", ".gpu/meta", ".gpu/refformer-VERSION-py3-none-any.whl",
#          ".gpu/hf_generate.py", ".gpu/torch_graph_step.py"]
#   command: bash .gpu/assemble.sh && bash benchmarks/device_run.sh
#
# Writes under $OUT: env.txt (GPU, driver, onnxruntime), generate_gpu.json and generate_gpu.txt (the
# benchmark table and agreement checks), verify.txt (the bundled model exported once, then `refformer verify` on CUDA, fp32 and
# fp16, every variant), generate.txt (`refformer generate` on CUDA through the auto variant),
# generate_imported_gpu.json and generate_imported_gpu.txt (issue 16: SmolLM-135M's shape imported from a
# transformers folder, refformer fp16 B=1 and B=64 beside HF generate, and the fp32/fp16 checks against HF; meant
# to take under 3 minutes on the H200, not run there yet). Each part runs even when an earlier one fails.
# A smoke test of this script on the CPU, here: DEVICE=cpu QUICK=1 bash benchmarks/device_run.sh
set -u
OUT=${OUT:-/tmp/refformer-out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-index --target /tmp/site .gpu/refformer-*.whl
refformer() { python3 -c "from refformer.runtime.cli import main; main()" "$@"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import onnxruntime as o, numpy, onnx; print('onnxruntime', o.__version__, o.get_available_providers()); print('numpy', numpy.__version__, 'onnx', onnx.__version__)"
  python3 -m pip show safetensors tokenizers click 2>&1 | grep -E "^(Name|Version)"
} > "$OUT/env.txt" 2>&1

# the bundled model exported once: generate_gpu.py's bundled checks (--bundled-onnx) and refformer verify use it
bundled=$(python3 -c "from refformer.runtime.generator import default_model_dir; print(default_model_dir())")
for dtype in fp32 fp16; do
  { refformer export --model "$bundled" --dtype "$dtype" --out "/tmp/refformer-bundled-$dtype" --static-length 128 \
      --fused-attention; echo "export exit $?"; } >> "$OUT/verify.txt" 2>&1
done

timeout 300 python3 benchmarks/generate_gpu.py --device "$DEVICE" $QUICK --baselines .gpu --out "$OUT" \
  --bundled-onnx /tmp/refformer-bundled- 2>&1 | tee "$OUT/generate_gpu.txt" | tail -40

timeout 300 python3 benchmarks/generate_imported_gpu.py --device "$DEVICE" $QUICK --out "$OUT" 2>&1 \
  | tee "$OUT/generate_imported_gpu.txt" | tail -30

for dtype in fp32 fp16; do
  { refformer verify --model "$bundled" --onnx-dir "/tmp/refformer-bundled-$dtype" --provider "$DEVICE"; echo "exit $?"; } \
    >> "$OUT/verify.txt" 2>&1
done
tail -30 "$OUT/verify.txt"

for dtype in fp32 fp16; do
  { echo "--- $dtype"; time refformer generate "Wo ist der Bahnhof?" "Das Wetter ist heute schön." --provider "$DEVICE" --dtype "$dtype"; } \
    >> "$OUT/generate.txt" 2>&1
done
cat "$OUT/generate.txt"
