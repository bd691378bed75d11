#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one command, with its results under OUT_DIR:
#   doctor.json            deit3-fast doctor --json (versions, GPU, bf16, matmul TFLOP/s, nvJPEG/DALI, throughput)
#   pytest-cuda.log/.xml   pytest -m cuda (every CUDA-only path of the product)
#   compute_bound.json/.log  model-alone img/s and MFU for ViT-S@224, B@192, L@192, H@160 (bf16, batch 256), the
#                          nvjpeg engine's img/s and CPU cores busy at those sizes, end-to-end / model-alone
#   lamb.log               our LAMB (eager, compiled) vs timm's on ViT-B's parameters
#   randaugment.json/.log  the device RandAugment (CPU and GPU, eager and compiled) vs timm's PIL RandAugment
#   summary.json           each step's exit status and seconds
#
#   scripts/gpu-check.sh --prepare      # write .gpu-check/data: the test .beton files and the ImageNet sample's
#                                       # (~30 MB; needs ../shared/data, not ffcv); carry it to the GPU machine
#   scripts/gpu-check.sh OUT_DIR [check|bench|all]   # on the GPU machine; `all` (default) is about 7 minutes on
#                                       # one H200. A lent machine's calls are limited to 10 minutes each: there,
#                                       # run `check` (doctor + pytest, <= 9 min) and `bench` (<= 10 min) as two calls
#   GPU_CHECK_QUICK=1 scripts/gpu-check.sh OUT_DIR   # the same steps at toy sizes: a CPU smoke test of this script
#
# Designed for a bare machine: python3 with torch/torchvision/timm/numba/pytest; ffcv, DALI and submitit optional;
# no network; this checkout as the working directory (PYTHONPATH, no install). A failing step does not stop the
# others; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DATA=${DEIT3_GPU_CHECK_DATA:-$REPO/.gpu-check/data}
if [ -x "$REPO/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then PYTHON="$REPO/.venv/bin/python"; fi
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p "$DATA"
  "$PYTHON" - "$DATA" <<'PY' || exit 1
import sys, tarfile, tempfile
from pathlib import Path
from tests.conftest import SHARED_DATA, make_tiny_data
from dataset_tools.convert import convert

data = Path(sys.argv[1])
make_tiny_data(data, page_size=2 << 20)
for folder in [p for p in data.iterdir() if p.is_dir()]:  # the generated sources: not needed on the GPU machine
    import shutil
    shutil.rmtree(folder)
tar = SHARED_DATA / "imagenet-sample-1000.tar"
if not tar.exists():
    sys.exit(f"{tar} is absent: the engine benchmark needs the real ImageNet sample")
with tempfile.TemporaryDirectory() as tmp, tarfile.open(tar) as t:
    t.extractall(tmp, filter="data")
    convert(f"{tmp}/imagenet-sample-1000", str(data / "imagenet.beton"), max_resolution=256, jpeg_quality=90,
            show_progress=False, page_size=2 << 20)
total = sum(p.stat().st_size for p in data.glob("*.beton"))
print(f"wrote {data}: {', '.join(sorted(p.name for p in data.glob('*.beton')))} ({total / 2**20:.1f} MiB)")
PY
  exit 0
fi

OUT=${1:?usage: scripts/gpu-check.sh OUT_DIR [check|bench|all] | --prepare}
GROUP=${2:-all}
case "$GROUP" in check) RUN_STEPS="doctor pytest_cuda" ;; bench) RUN_STEPS="compute_bound lamb randaugment" ;;
  all) RUN_STEPS="doctor pytest_cuda compute_bound lamb randaugment" ;;
  *) echo "gpu-check: unknown step group '$GROUP' (check, bench or all)" >&2; exit 2 ;; esac
mkdir -p "$OUT"
for f in train.beton val.beton raw.beton imagenet.beton; do
  [ -f "$DATA/$f" ] || { echo "gpu-check: $DATA/$f is missing: run scripts/gpu-check.sh --prepare where" \
                              "../shared/data is (deit3-convert needs no ffcv) and bring .gpu-check/ along" >&2; exit 2; }
done
if [ -n "${GPU_CHECK_QUICK:-}" ]; then
  DOCTOR_STEPS=2; ROWS="deit3_nano@32"; BATCH=16; STEPS=2; LAMB_MODEL=deit3_micro; LAMB_STEPS=2; DEVICE=cpu
  RA_SIZE=64
else
  DOCTOR_STEPS=10; ROWS="deit3_small@224,deit3_base@192,deit3_large@192,deit3_huge@160"; BATCH=256; STEPS=10
  LAMB_MODEL=deit3_base; LAMB_STEPS=20; DEVICE=cuda; RA_SIZE=224
fi

failed=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, log, record exit status and seconds in summary.json at once
  local name=$1 limit=$2; shift 2
  case " $RUN_STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/gpu-check.log"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  [ $rc -eq 0 ] || failed=$((failed + 1))
  echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT/gpu-check.log"
  # summary.json is rewritten after every step, so a call cut short still says how far it got.
  "$PYTHON" - "$OUT/summary.json" "$name" "$rc" "$((SECONDS - t0))" <<'PY'
import json, sys
from pathlib import Path
path, name, rc, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
summary = json.loads(path.read_text()) if path.exists() else {}
summary[name] = {"exit": rc, "seconds": seconds}
path.write_text(json.dumps(summary, indent=1) + "\n")
PY
}

{ nvidia-smi || true; "$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda)'; } \
  > "$OUT/machine.txt" 2>&1
step doctor 100 bash -c "'$PYTHON' -m deit3_fast doctor --json --data-train '$DATA/imagenet.beton' --engine nvjpeg \
  --steps $DOCTOR_STEPS > '$OUT/doctor.json' 2> '$OUT/doctor.err'"
step pytest_cuda 420 bash -c "DEIT3_GPU_CHECK_DATA='$DATA' '$PYTHON' -m pytest -m cuda tests/test_cuda.py tests/pipelines/test_reference_engine.py -q \
  -p no:cacheprovider --durations=0 --junitxml '$OUT/pytest-cuda.xml' > '$OUT/pytest-cuda.log' 2>&1"
step compute_bound 330 bash -c "'$PYTHON' benchmarks/compute_bound.py --device $DEVICE --data-train \
  '$DATA/imagenet.beton' --engines nvjpeg --no-official --no-compile --rows $ROWS --batch $BATCH --steps $STEPS \
  --workers $(nproc) --json '$OUT/compute_bound.json' > '$OUT/compute_bound.log' 2>&1"
step lamb 120 bash -c "'$PYTHON' benchmarks/lamb.py --device $DEVICE --model $LAMB_MODEL --steps $LAMB_STEPS \
  > '$OUT/lamb.log' 2>&1"
step randaugment 150 bash -c "'$PYTHON' benchmarks/randaugment.py --workers $(nproc) --batch $BATCH --batches 4 \
  --beton '$DATA/imagenet.beton' --size $RA_SIZE --json '$OUT/randaugment.json' > '$OUT/randaugment.log' 2>&1"

cat "$OUT/summary.json"
tail -n 3 "$OUT/pytest-cuda.log" 2>/dev/null
exit $failed
