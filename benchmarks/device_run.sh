#!/bin/bash
# Issue 16's device check in one call on the lent H200 (read ../shared/gpu/NOTES.md first).
#
# Here, before any device time, in the session's own checkout (the device tool sends only that one; ../shared lies
# beside it), the project's venv active (. .venv/bin/activate); about 5 minutes on 2 cores. Rerun the first line
# after any commit: the device runs the wheel, not the tree, and env.txt names the commit the wheel was built from.
#   rm -f .gpu/refformer-*.whl && pip wheel -q --no-deps -w .gpu/ . && git describe --always --dirty > .gpu/commit \
#     && cp -f ../shared/gpu/baselines/*.py .gpu/
#   ../shared/gpu/prepare          # prints N, the number of onnxruntime-gpu chunks (5 on 2026-11-30)
#   DEVICE=cpu QUICK=1 bash benchmarks/device_run.sh    # the smoke test: every part runs on the CPU, tiny shapes
# On the device, in ONE batch of tool calls (the machine stays warm between them), one `run` per chunk K = 0..N-2:
#   carry [".gpu/pK", ".gpu/assemble.sh", ".gpu/meta"]   command: bash .gpu/assemble.sh   timeout_s 120
# and the last chunk's call runs this script:
#   carry [".gpu/pN-1", ".gpu/assemble.sh", ".gpu/meta", ".gpu/refformer-0.1.0-py3-none-any.whl",
#          ".gpu/hf_generate.py", ".gpu/torch_graph_step.py", ".gpu/commit"]
#   command: bash .gpu/assemble.sh && bash benchmarks/device_run.sh     timeout_s 600
# then give_back unless a second run (with one change: see issue 16's levers) follows at once. Device time is 15
# minutes in all (the start, the chunk calls and this run counted): a second run fits only with a smaller BUDGET_S
# (e.g. `BUDGET_S=240 bash benchmarks/device_run.sh` runs the parts that fit, most important first).
#
# Parts, most important first, each bounded so that the whole script ends within BUDGET_S seconds (default 540 on
# CUDA: one call's 600 s limit less assemble.sh's unpacking) and what is done comes back under $OUT even when a later
# part is cut. Eight files, the most one call brings back: a new part must write into one of them.
#   env.txt                     GPU, driver, onnxruntime and its providers, versions
#   generate_gpu.json / .txt    the Marian-base benchmark table (issue 16's targets), the CUDA agreement checks
#                               (fp32 TF32 off vs the CPU graph, fp16 agreement and logits error) and the baselines
#                               (HF generate, the torch CUDA-graph step)
#   verify.txt                  the bundled model exported once (static 128, fused), `refformer verify` on CUDA,
#                               fp32 and fp16, every variant
#   generate.txt                `refformer generate` on CUDA through the auto variant, fp32 and fp16, timed
#   generate_imported_gpu.json / .txt  SmolLM-135M's shape imported from a transformers folder: refformer fp16 B=1
#                               and B=64 beside HF generate, fp32/fp16 checks against HF fp32
#   cuda_tests.txt              tests/runtime/test_cuda_paths_on_cpu.py -k on_cuda: auto and every variant of its
#                               chain on tiny imported llama/qwen2/t5/marian, ids against transformers, on CUDA
# Each part runs even when an earlier one fails; a part with under 20 s left is skipped with a line saying so.
set -u
OUT=${OUT:-/tmp/refformer-out}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:+--quick}
# on the CPU (the smoke test) each part may take 3x its CUDA limit: the HF baselines are slow there
if [ "$DEVICE" = cuda ]; then BUDGET_S=${BUDGET_S:-540} SCALE=1; else BUDGET_S=${BUDGET_S:-1800} SCALE=3; fi
END=$(( $(date +%s) + BUDGET_S ))
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-index --upgrade --target /tmp/site .gpu/refformer-*.whl \
  || { echo "error: could not install .gpu/refformer-*.whl (build it first: see this script's header)"; exit 1; }
REFFORMER=(python3 -c "from refformer.runtime.cli import main; main()")

# bounded LIMIT COMMAND...: COMMAND under timeout, at most LIMIT (x SCALE) seconds and never past the budget's end
bounded() {
  local limit=$(( $1 * SCALE )) left=$(( END - $(date +%s) - 5 ))
  shift
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "skipped (${left}s of the ${BUDGET_S}s budget left): $*"; return 124; fi
  timeout "$limit" "$@"
}

{
  echo "refformer wheel built from $(cat .gpu/commit 2>/dev/null || echo 'an unknown commit (.gpu/commit missing)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import onnxruntime as o, numpy, onnx; print('onnxruntime', o.__version__, o.get_available_providers()); print('numpy', numpy.__version__, 'onnx', onnx.__version__)"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
  python3 -m pip show safetensors tokenizers click 2>&1 | grep -E "^(Name|Version)"
} > "$OUT/env.txt" 2>&1

# the bundled model exported once: generate_gpu.py's bundled checks (--bundled-onnx) and refformer verify use it
bundled=$(python3 -c "from refformer.runtime.generator import default_model_dir; print(default_model_dir())")
for dtype in fp32 fp16; do
  { bounded 120 "${REFFORMER[@]}" export --model "$bundled" --dtype "$dtype" --out "/tmp/refformer-bundled-$dtype" \
      --static-length 128 --fused-attention; echo "export exit $?"; } >> "$OUT/verify.txt" 2>&1
done

bounded 300 python3 benchmarks/generate_gpu.py --device "$DEVICE" $QUICK --baselines .gpu --out "$OUT" \
  --bundled-onnx /tmp/refformer-bundled- > "$OUT/generate_gpu.txt" 2>&1
echo "generate_gpu.py exit $?" >> "$OUT/generate_gpu.txt"
tail -40 "$OUT/generate_gpu.txt"

for dtype in fp32 fp16; do
  { bounded 90 "${REFFORMER[@]}" verify --model "$bundled" --onnx-dir "/tmp/refformer-bundled-$dtype" \
      --provider "$DEVICE"; echo "exit $?"; } >> "$OUT/verify.txt" 2>&1
done
grep -E "exit|error|within|beyond|skipped" "$OUT/verify.txt"

for dtype in fp32 fp16; do
  { echo "--- $dtype"; start=$(date +%s%N)
    bounded 90 "${REFFORMER[@]}" generate "Wo ist der Bahnhof?" "Das Wetter ist heute schön." --provider "$DEVICE" \
      --dtype "$dtype"; echo "exit $? after $(( ($(date +%s%N) - start) / 1000000 )) ms"; } >> "$OUT/generate.txt" 2>&1
done
cat "$OUT/generate.txt"

bounded 240 python3 benchmarks/generate_imported_gpu.py --device "$DEVICE" $QUICK --out "$OUT" \
  > "$OUT/generate_imported_gpu.txt" 2>&1
echo "generate_imported_gpu.py exit $?" >> "$OUT/generate_imported_gpu.txt"
tail -30 "$OUT/generate_imported_gpu.txt"

bounded 180 env PYTHONPATH=/tmp/site:. python3 -m pytest -q -p no:cacheprovider -rs -s \
  tests/runtime/test_cuda_paths_on_cpu.py -k on_cuda > "$OUT/cuda_tests.txt" 2>&1
echo "pytest exit $?" >> "$OUT/cuda_tests.txt"
tail -15 "$OUT/cuda_tests.txt"
