#!/usr/bin/env bash
# Every benchmark on CUDA, unattended, in about 4-5 minutes on one H100/H200; prints every table.
#
#   bash bench/gpu_all.sh                 # from anywhere; uses ./.venv/bin/python if present, else python
#   PYTHON=/path/to/python bash bench/gpu_all.sh
#   OUT=/some/dir bash bench/gpu_all.sh   # also keep the tables and JSON there (default: print only)
#
# Creates its own data in a temp dir (synthetic 1024x1024 8-bit PNGs; real X-rays are not needed), uses
# weights="none" (speed does not depend on the weights; no download), and removes the temp dir at the end.
# Knobs (environment): DEVICE (default cuda), N_TRAIN (512), TP_SECONDS (3), TP_IMAGES (256), CALLS (50),
# and extra arguments per script: TP_EXTRA, FC_EXTRA, IL_EXTRA (e.g. TP_EXTRA="--archs resnet18").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
DEVICE=${DEVICE:-cuda}
N_TRAIN=${N_TRAIN:-512}
TP_SECONDS=${TP_SECONDS:-3}
TP_IMAGES=${TP_IMAGES:-256}
CALLS=${CALLS:-50}
TMP=$(mktemp -d /tmp/cc-gpu-all-XXXXXX)
OUT=${OUT:-$TMP/out}
mkdir -p "$OUT"
trap 'rm -rf "$TMP"' EXIT
export COVID_CLS_OFFLINE=1 COVID_CLS_CACHE="$TMP/decoded" GRADIO_ANALYTICS_ENABLED=False

T0=$(date +%s)
echo "# covid_cls benchmarks on $DEVICE — $(date -u '+%Y-%m-%d %H:%M UTC') — $(hostname)"
if [ "$DEVICE" = cuda ]; then
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
fi
"$PY" -c "import torch, os; print('torch', torch.__version__, '| cpu cores', os.cpu_count())"
"$PY" -c "import covid_cls" 2>/dev/null || { echo "covid_cls is not installed in $PY: pip install -e ."; exit 1; }

step() {  # step NAME TIMEOUT CMD...: run one benchmark, keep its output, never stop the others
  local name=$1 limit=$2; shift 2
  echo; echo "=== $name ($(($(date +%s) - T0)) s elapsed) ==="
  timeout "$limit" "$@" > >(tee "$OUT/$name.txt") 2> "$OUT/$name.err"
  local rc=$?
  if [ $rc -ne 0 ]; then echo "!!! $name failed or timed out (rc $rc); last lines of stderr:"; tail -n 15 "$OUT/$name.err"; fi
}

if [ "$DEVICE" = cuda ] && [ "${SKIP_TESTS:-0}" != 1 ]; then   # issue 14: the CUDA tests first, then the figures
  echo; echo "=== pytest -m gpu ($(($(date +%s) - T0)) s elapsed) ==="
  for mod in safetensors gradio pydicom pytorch_grad_cam pytest; do
    "$PY" -c "import $mod" 2>/dev/null || echo "note: python package '$mod' is missing here; tests needing it skip or fail"
  done
  timeout 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -n 25 | tee "$OUT/pytest_gpu.txt"
fi

echo "generating $N_TRAIN + $((N_TRAIN / 4)) + $((N_TRAIN / 4)) synthetic 1024x1024 PNGs ..."
PYTHONPATH=bench "$PY" - "$TMP/png" "$N_TRAIN" <<'EOF'
import sys
import _common as C
n = int(sys.argv[2])
C.make_png_dataset(sys.argv[1], {"train": n, "validation": n // 4, "test": n // 4}, size=1024)
EOF
echo "data ready after $(($(date +%s) - T0)) s"

step train_throughput 200 "$PY" bench/train_throughput.py --data "$TMP/png" --n-images "$TP_IMAGES" \
  --device "$DEVICE" --seconds "$TP_SECONDS" --rounds 2 --cache-repeats 1 --json "$OUT/train_throughput.json" \
  ${TP_EXTRA:-}
step fc_level 100 "$PY" bench/fc_level.py --data "$TMP/png" --device "$DEVICE" --epochs-2020 1 \
  --json "$OUT/fc_level.json" ${FC_EXTRA:-}
step precision 60 "$PY" bench/precision.py --device "$DEVICE" --batch-size 64 --calls 5 \
  --json "$OUT/precision.json"
step scale 300 "$PY" bench/scale.py --device "$DEVICE" --procs 1,2,4,8 --rounds 1 --json "$OUT/scale.json" \
  ${SC_EXTRA:-}   # issue 13: 1 vs N GPUs (DDP); only the counts that fit the GPUs present
step infer_latency 120 "$PY" bench/infer_latency.py --device "$DEVICE" --calls "$CALLS" --app --app-calls 30 \
  --per-client 8 --json "$OUT/infer_latency.json" ${IL_EXTRA:-}

echo; echo "=== done in $(($(date +%s) - T0)) s; tables and JSON in $OUT $( [ "$OUT" = "$TMP/out" ] && echo '(temp, removed now: set OUT=dir to keep them)') ==="
