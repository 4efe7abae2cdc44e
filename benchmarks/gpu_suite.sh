#!/usr/bin/env bash
# The GPU checks and benchmarks of docs/benchmarks.md in one go, on one CUDA machine, each step
# under its own time limit (a slow step cannot starve the rest).  Tables are appended to
# docs/benchmarks.md (--doc); the log, a copy of that file and nvidia-smi's utilisation samples
# (every 0.5 s) go to LOGDIR.
#
#   bash benchmarks/gpu_suite.sh [LOGDIR]                       # every step: ~30 minutes of limits
#   STEPS=quick BUDGET_S=540 bash benchmarks/gpu_suite.sh LOGDIR  # what one 10-minute device call fits
#   STEPS="test e2e" IMAGES=5000 bash benchmarks/gpu_suite.sh
#   WHEELS=wheels STEPS="test engines" bash benchmarks/gpu_suite.sh   # with the [gpu] extra
#
# BUDGET_S: the whole run's seconds.  Each step gets the smaller of its own limit and what is left,
# and a step with less than 30 s left is skipped (said in the log), so the run ends inside a device
# call's limit with every table written so far.  STEPS=quick: the issue-13 essentials (gpu tests,
# model-only, per-layer profile, end to end, decode engines, compile), run in this file's order.
#
# The [gpu] extra (nvImageCodec: the hw engine, the card's hardware JPEG decoder), which the GPU
# machine cannot download: pack it with Ray, `DEVICE_EXTRA_WHEELS="nvidia-nvimgcodec-cu13
# nvidia-nvjpeg" bash ../shared/hooks/device-ray-pack.sh`, and `source .devicepkgs/activate.sh`
# installs it; or fetch the wheels into a folder with `pip download --no-deps` and pass WHEELS.
#
# Steps: test (pytest -m gpu), model (bf16 batch sweep), e2e (pipeline vs model-only, shard size
# SHARD), e2e1000 (the same at shard size 1000), gpuonly (runtime.decode=gpu: nvJPEG alone),
# cpudecode (runtime.decode=cpu), baselines (Ray Data, DataLoader), dataloader (DataLoader alone),
# decode (nvJPEG vs PIL, no model), engines (each decode engine alone and all of them balanced, no
# model; then end to end with each), precisions (fp16, fp32), layers (per-layer time, TFLOP/s and
# share of a measured bf16 matmul peak: where the model's time goes), compile (torch.compile in the
# pipeline's mode), cudagraphs (mode reduce-overhead), autotune (mode max-autotune-no-cudagraphs:
# minutes of autotuning, so not in the default list), ceiling (the CPU decode processes' input
# ceiling on this node's cores, stand-in model).
# The model-speed steps alone (issue 13 item 3; time limits 12.7 minutes in all, the torch.compile
# builds are the unknown: each step prints its seconds):
#   STEPS="model layers compile cudagraphs autotune" bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
logdir=${1:-/tmp/vgg-gpu-suite}
mkdir -p "$logdir"
images=${IMAGES:-20000}
batch=${BATCH:-256}
threads=${THREADS:-$(nproc)}
steps=${STEPS:-test model layers e2e gpuonly decode engines e2e1000 cpudecode baselines precisions compile cudagraphs ceiling}
[[ $steps == quick ]] && steps="test model e2e engines compile layers"
budget=${BUDGET_S:-0}  # 0: no overall budget
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

wanted() { [[ " $steps " == *" $1 "* ]]; }
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  wanted "$name" || return 0
  if (( budget > 0 )); then
    local left=$((budget - SECONDS))
    if (( left < 30 )); then echo "=== $name: skipped, ${left} s of BUDGET_S left"; return 0; fi
    (( limit > left )) && limit=$left
  fi
  echo "=== $name: $* ($(date +%T), limit ${limit} s)"
  timeout -k 10 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  cp docs/benchmarks.md "$logdir/benchmarks.md"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [[ -n "${WHEELS:-}" ]]; then
  "$py" -m pip install --no-index --find-links "$WHEELS" "nvidia-nvimgcodec-cu13[nvjpeg]" || echo "=== [gpu] extra not installed"
fi
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -lms 500 >"$logdir/gpu_util.csv" &
smi=$!
trap 'kill $smi 2>/dev/null' EXIT

e2e=(--device cuda --precision bf16 --batch-size "$batch" --images "$images")
shard=(--shard-size "${SHARD:-4000}")
step test 240 "$py" -m pytest -q -m gpu tests/test_gpu.py tests/test_decode_engines.py tests/test_precision.py \
  tests/test_descriptor.py tests/test_compile.py -p no:cacheprovider
step model 100 "$py" benchmarks/model_only.py --device cuda --precision bf16 --batch-size 64,128,256,512 \
  --images 8192 --repeat 3 --doc
step layers 60 "$py" benchmarks/layer_profile.py --device cuda --precision bf16 --batch-size "$batch" --doc
step e2e 120 "$py" benchmarks/end_to_end.py "${e2e[@]}" "${shard[@]}" --compare-model-only --model-images 8192 \
  --repeat "${REPEAT:-1}" --doc
step gpuonly 90 "$py" benchmarks/end_to_end.py "${e2e[@]}" "${shard[@]}" --set runtime.decode=gpu --doc
step decode 60 "$py" benchmarks/decode.py --device cuda --images 4096 --cpu-images 2048 --batch-size "$batch" \
  --threads "$threads" --doc
step engines 120 "$py" benchmarks/decode.py --device cuda --images 4096 --cpu-images 1024 --batch-size "$batch" \
  --threads "$threads" --processes "$threads" --engines cuda,hw,cpu,hw+cuda,all --repeat 2 --doc
for engines in cuda cuda,cpu; do  # end to end without hw, and without the decode processes (e2e: all of them)
  step engines 90 "$py" benchmarks/end_to_end.py "${e2e[@]}" "${shard[@]}" --set "runtime.decode_engines=$engines" --doc
done
step e2e1000 90 "$py" benchmarks/end_to_end.py "${e2e[@]}" --shard-size 1000 --doc
step dataloader 90 "$py" benchmarks/baselines.py "${e2e[@]}" --modes dataloader --num-workers 8 --doc
step cpudecode 100 "$py" benchmarks/end_to_end.py "${e2e[@]}" "${shard[@]}" --set runtime.decode=cpu --doc
step baselines 170 "$py" benchmarks/baselines.py "${e2e[@]}" "${shard[@]}" --num-workers 8 --doc
step precisions 80 "$py" benchmarks/model_only.py --device cuda --precision fp16,fp32 --batch-size "$batch" \
  --images 4096 --repeat 3 --doc
step compile 150 "$py" benchmarks/model_only.py --device cuda --precision bf16 --batch-size "$batch" \
  --images 8192 --repeat 3 --compile --doc
step cudagraphs 150 "$py" benchmarks/model_only.py --device cuda --precision bf16 --batch-size "$batch" \
  --images 8192 --repeat 3 --compile-mode reduce-overhead --doc
step autotune 300 "$py" benchmarks/model_only.py --device cuda --precision bf16 --batch-size "$batch" \
  --images 8192 --repeat 3 --compile-mode max-autotune-no-cudagraphs --doc
step ceiling 150 "$py" benchmarks/input_ceiling.py --repeat 1 --doc
