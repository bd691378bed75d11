#!/usr/bin/env bash
# The GPU check: everything a lent GPU machine should run, unattended, in ONE call of at most 8 minutes.
#
#   scripts/gpu-check.sh --prepare          # here, where ../shared/data is: .gpu-check/data/imagenet.beton, the
#                                           # 1000-image ImageNet sample at max side 256 / q90 (~18 MiB, no ffcv
#                                           # needed); name .gpu-check in the device tool's carry
#   scripts/gpu-check.sh OUT_DIR            # on the GPU machine
#   scripts/gpu-check.sh --quick OUT_DIR    # the same steps on the CPU at toy sizes, no .gpu-check needed: a smoke
#                                           # test of this script (tests/test_gpu_check.py)
#   scripts/gpu-check.sh --plan             # the steps in order, each with its limit in seconds
#
# The steps, in this order, each under `timeout` with the limit in seconds after its name (480 s in all; the machine
# start is not in it). GPU_CHECK_LIMITS="step=s ..." overrides limits, to test what a timed-out step leaves.
#   data 15                 the cuda tests' tiny .beton files, made here in a second (imagenet.beton is carried)
#   doctor 55               nvidia-smi; deit3-fast doctor --json (versions, GPU, bf16, matmul TFLOP/s, nvJPEG, a
#                           short ViT-S@224 profile on the ImageNet sample)
#   cuda_tests 120          pytest -m "cuda and not compiles": every CUDA-only path that needs no torch.compile
#   bench_s224 60           benchmarks/compute_bound.py, ViT-S@224 bf16 batch 256 on the ImageNet sample, eager:
#   bench_b192 60           the nvjpeg engine alone img/s (and CPU cores), model-alone img/s and MFU, end to end,
#                           end to end / model alone; the same for ViT-B@192
#   lamb 30                 benchmarks/lamb.py --no-compile: our LAMB step vs timm's Lamb on ViT-B's parameters
#   parity 30               benchmarks/nvjpeg_crop.py --parity: nvJPEG + GPU crops vs the CPU path on the sample
#   cuda_compile_tests 110  pytest -m "cuda and compiles": the tests that compile, last (cold Inductor/Triton caches
#                           make them the slowest; what finishes in the limit is in the XML)
# A step past its limit gets SIGINT (pytest then writes its JUnit XML), SIGKILL 5 s later; the next step runs. A
# failing step does not stop the others. Exit status: the number of steps not ok.
#
# OUT_DIR gets 5 files (the device tool brings back 8 at most):
#   summary.json            each step's status (pending, running, ok, failed, timeout), exit, seconds, limit and its
#                           numbers (the benchmarks' JSON, the doctor report, each test's outcome); rewritten
#                           atomically at every change, so it is whole wherever a call stops
#   gpu-check.log           every step's output, unbuffered
#   doctor.json, cuda-tests.xml, cuda-compile-tests.xml   (JUnit)
#
# Needs only python3 with torch, torchvision, timm, numba, numpy, pillow and pytest (+ hypothesis, which conftest
# imports); ffcv, DALI and submitit are optional. No network; this checkout as the working directory (PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then PYTHON="$REPO/.venv/bin/python"; fi
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
CARRIED=${DEIT3_GPU_CHECK_DATA:-$REPO/.gpu-check/data}

LIMITS="data=15 doctor=55 cuda_tests=120 bench_s224=60 bench_b192=60 lamb=30 parity=30 cuda_compile_tests=110"
for item in ${GPU_CHECK_LIMITS:-}; do LIMITS="$LIMITS ${item}"; done  # later entries win (the `limit` lookup)
limit() { local v; for item in $LIMITS; do [ "${item%%=*}" = "$1" ] && v=${item#*=}; done; echo "$v"; }
STEPS="data doctor cuda_tests bench_s224 bench_b192 lamb parity cuda_compile_tests"

case "${1:-}" in
  --prepare) exec "$PYTHON" scripts/gpu_check.py prepare "$CARRIED" ;;
  --plan) for s in $STEPS; do echo "$s $(limit "$s")"; done; exit 0 ;;  # the steps in order, each with its limit
esac
QUICK=${GPU_CHECK_QUICK:-}
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
OUT=${1:?usage: scripts/gpu-check.sh [--quick] OUT_DIR | --prepare | --plan}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu-check.log"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")  # the steps' own JSON, read into summary.json: not in OUT
trap 'rm -rf "$WORK"' EXIT

if [ -n "$QUICK" ]; then
  # fp32: this CPU kind emulates bf16 matmuls (~1 GFLOP/s), which would make a toy row take a minute
  MODE=quick; DEVICE=cpu; IMAGENET=-; DOCTOR_STEPS=1; ROW_S="deit3_nano@32"; ROW_B="deit3_nano@48"; AMP=fp32
  BATCH=4; STEPS_N=1; LAMB_MODEL=deit3_nano; LAMB_STEPS=1; PARITY="--batch-sizes 4 --size 32 --parity 1"
else
  # profile times each rate 3 times (and once more where a pass is implausible): 6 steps a window keep the rows'
  # timed steps near the 10 x 1 they were sized for
  MODE=gpu; DEVICE=cuda; IMAGENET="$CARRIED/imagenet.beton"; DOCTOR_STEPS=6; ROW_S="deit3_small@224"
  ROW_B="deit3_base@192"; AMP=bf16; BATCH=256; STEPS_N=6; LAMB_MODEL=deit3_base; LAMB_STEPS=20
  PARITY="--batch-sizes 64 --size 224 --parity 4"
  if [ ! -f "$IMAGENET" ]; then
    echo "gpu-check: $IMAGENET is missing: run scripts/gpu-check.sh --prepare where ../shared/data is, and carry" \
         ".gpu-check (or: scripts/gpu-check.sh --quick OUT_DIR for the CPU smoke test)" | tee "$LOG" >&2
    exit 2
  fi
fi
DATA="$WORK/data"
# shellcheck disable=SC2046
"$PYTHON" scripts/gpu_check.py init "$OUT" "$MODE" $(for s in $STEPS; do echo "$s=$(limit "$s")"; done) || exit 2
# The caches compiled code goes to, one per machine run: the first step that compiles pays, the later ones reuse it.
export NUMBA_CACHE_DIR="$WORK/numba" TORCHINDUCTOR_CACHE_DIR="$WORK/inductor"

failed=0
step() {  # step NAME RESULT_FILE COMMAND...: run under the step's limit, append its output to the log, record it
  local name=$1 result=$2 lim t0 rc soft
  shift 2
  lim=$(limit "$name")
  soft=$((lim > 10 ? lim - 5 : lim))  # the interrupt 5 s before the limit, the kill at it
  "$PYTHON" scripts/gpu_check.py start "$OUT" "$name" "$lim"
  echo "== $name (limit ${lim}s): $*" | tee -a "$LOG"
  t0=$(date +%s.%N)
  timeout --signal=INT --kill-after=5 "$soft" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  "$PYTHON" scripts/gpu_check.py done "$OUT" "$name" "$rc" "$t0" ${result:+"$result"} | tee -a "$LOG"
}
pytest_step() {  # pytest_step NAME MARKERS XML: the cuda tests with these markers, a JUnit XML even when interrupted
  local per_test=60 opts=()
  # pytest-timeout (where installed) fails one stuck test and goes on; faulthandler (built in) dumps its stacks.
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && opts+=(--timeout="$per_test")
  step "$1" "$OUT/$3" env DEIT3_GPU_CHECK_DATA="$DATA" "$PYTHON" -u -m pytest -m "$2" tests/test_cuda.py \
    tests/pipelines/test_reference_engine.py -q -rA -p no:cacheprovider --durations=0 \
    -o faulthandler_timeout="$per_test" --junitxml "$OUT/$3" ${opts[@]+"${opts[@]}"}
}
bench_step() {  # bench_step NAME MODEL@RES
  step "$1" "$WORK/$1.json" "$PYTHON" -u benchmarks/compute_bound.py --device "$DEVICE" --data-train "$DATA/imagenet.beton" \
    --engines nvjpeg --no-official --no-compile --amp "$AMP" --rows "$2" --batch "$BATCH" --steps "$STEPS_N" --workers "$(nproc)" \
    --json "$WORK/$1.json"
}

step data "" "$PYTHON" -u scripts/gpu_check.py data "$DATA" "$IMAGENET"
step doctor "$OUT/doctor.json" bash -c "{ nvidia-smi || true; } >&2; '$PYTHON' -u -m deit3_fast doctor --json \
  --data-train '$DATA/imagenet.beton' --engine nvjpeg --steps $DOCTOR_STEPS > '$OUT/doctor.json'"
pytest_step cuda_tests "cuda and not compiles" cuda-tests.xml
bench_step bench_s224 "$ROW_S"
bench_step bench_b192 "$ROW_B"
step lamb "$WORK/lamb.json" "$PYTHON" -u benchmarks/lamb.py --device "$DEVICE" --model "$LAMB_MODEL" \
  --steps "$LAMB_STEPS" --no-compile --json "$WORK/lamb.json"
# shellcheck disable=SC2086
step parity "$WORK/parity.json" "$PYTHON" -u benchmarks/nvjpeg_crop.py --beton "$DATA/imagenet.beton" \
  --device "$DEVICE" $PARITY --json "$WORK/parity.json"
pytest_step cuda_compile_tests "cuda and compiles" cuda-compile-tests.xml

cat "$OUT/summary.json"
exit $failed
