#!/usr/bin/env bash
# GPU check of the fused vocabulary path and of pretraining quality, in at most 9.5 minutes on an H100/H200 machine (PyTorch 2.11, Triton 3.6,
# Python 3.12, no DeepSpeed, no network). Run from the repository root: bash bench/gpu_check.sh
#
# It carries its Python packages in .whl/ (made here, on a machine with a registry):
#   ../shared/tools/gpu-wheels.sh .whl                                         # DeepSpeed and its dependencies
#   python3 -m pip download -q --no-deps -d .whl pytest pluggy iniconfig packaging   # if the GPU machine lacks pytest
#   python3 -m pip download -q --no-deps -d .whl liger-kernel                         # optional: the Liger CE row
# Steps (each bounded by what is left of the 8 minutes):
#   1. kernel and noise tests on CUDA (fp32 and bf16): tests/test_kernels_*.py, tests/test_ops.py
#   2. tile sweep of the fused path: python -m amos_kernels.bench_tiles (N 16384, V 32768)
#   3. microbenchmark: python -m amos_kernels.bench (N 16384/4096, V 32768/64000, H 768, K 3, bf16; the goal
#      shape N 16384, V 32768 first, so that a timeout still leaves it)
#   4. base-preset training throughput with the torch and the triton vocabulary path (bench/bench_train.py, if present)
#   5. pretraining quality: bench/quality.py --budget gpu (AMOS, ELECTRA-style, random init on MR; up to 5 minutes).
#      It reads $AMOS_SHARED_DATA, else ../shared/data, else .data (bring it with `cp -r ../shared/data .data`).
# and prints one table. Logs go to $OUT (or /tmp/amos_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

TOTAL_S=${GPU_CHECK_SECONDS:-570}
LOG_DIR=${OUT:-/tmp/amos_gpu_check}
SITE=/tmp/site
START=$SECONDS
mkdir -p "$LOG_DIR" "$SITE"

# Seconds a step may take: at most $1, and never past the overall deadline (keeps 5 s for the report).
budget() {
  local left=$((TOTAL_S - (SECONDS - START) - 5))
  ((left > $1)) && left=$1
  ((left < 1)) && left=1
  echo "$left"
}

# Carried wheels; amos_kernels is the kernels/ folder (setup.cfg package_dir), linked under its import name.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >"$LOG_DIR/install.log" 2>&1 \
    || echo "wheel install failed: see $LOG_DIR/install.log"
else
  echo "no .whl/ wheels: DeepSpeed (training step) and pytest may be missing"
fi
ln -sfn "$PWD/kernels" "$SITE/amos_kernels"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"

ROWS=()
# run_step NAME MAX_SECONDS LOG COMMAND...: runs with a timeout, records status, seconds and the output's last line.
run_step() {
  local name=$1 max=$2 log=$3
  shift 3
  local t0=$SECONDS limit status
  limit=$(budget "$max")
  timeout -k 5 "$limit" "$@" >"$log" 2>&1
  case $? in
    0) status=ok ;;
    124 | 137) status="timeout ${limit}s" ;;
    *) status=failed ;;
  esac
  local last
  last=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | tr '|' '/' | cut -c1-150)
  ROWS+=("| $name | $status | $((SECONDS - t0)) | $last |")
  echo "[$((SECONDS - START))s] $name: $status"
}

python3 - >"$LOG_DIR/env.log" 2>&1 <<'EOF'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE'}")
EOF
cat "$LOG_DIR/env.log"

if python3 -c "import pytest" 2>/dev/null; then
  # Each test shape is a new kernel specialisation to compile: four workers compile in parallel when xdist is there.
  PARALLEL=()
  python3 -c "import xdist" 2>/dev/null && PARALLEL=(-n 4)
  run_step "kernel tests (CUDA, fp32 + bf16)" 150 "$LOG_DIR/tests.log" \
    python3 -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" tests/test_kernels_vocab_path.py tests/test_ops.py \
    tests/test_kernels_bench.py
else
  ROWS+=("| kernel tests | skipped: no pytest (carry its wheels, see the header) | 0 | |")
fi

run_step "tile sweep" 90 "$LOG_DIR/tiles.log" python3 -m amos_kernels.bench_tiles

run_step "microbenchmark" 220 "$LOG_DIR/bench.log" \
  python3 -m amos_kernels.bench --rows 16384 4096 --vocab 32768 64000 --warmup 1 --repeats 5

if [[ -f bench/bench_train.py ]]; then
  for impl in torch triton; do
    run_step "train base --impl $impl" 55 "$LOG_DIR/train_$impl.log" \
      python3 bench/bench_train.py --preset base --impl "$impl"
  done
else
  ROWS+=("| train base | skipped: bench/bench_train.py not present | 0 | |")
fi

DATA=${AMOS_SHARED_DATA:-../shared/data}
[[ -d $DATA ]] || DATA=.data
if [[ -d $DATA/eval/mr ]]; then
  run_step "quality (bench/quality.py --budget gpu)" 300 "$LOG_DIR/quality.log" \
    python3 bench/quality.py --budget gpu --data "$DATA" --work "$LOG_DIR/quality"
else
  ROWS+=("| quality | skipped: no data (set AMOS_SHARED_DATA or bring .data, see the header) | 0 | |")
fi

{
  echo "## amos-ds GPU check: $(cat "$LOG_DIR/env.log"), $((SECONDS - START)) s"
  echo
  echo "| step | status | seconds | last line of output |"
  echo "| --- | --- | ---: | --- |"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "### Tile sweep of the fused path"
  grep -E '^(device:|\|)' "$LOG_DIR/tiles.log"
  echo
  echo "### Microbenchmark (fused path vs PyTorch; logs in $LOG_DIR)"
  grep -E '^(device:|\|)' "$LOG_DIR/bench.log"
  for impl in torch triton; do
    if [[ -f "$LOG_DIR/train_$impl.log" ]]; then
      echo
      echo "### bench_train.py --preset base --impl $impl (last lines)"
      tail -n 5 "$LOG_DIR/train_$impl.log"
    fi
  done
  if [[ -f "$LOG_DIR/quality.log" ]]; then
    echo
    echo "### bench/quality.py --budget gpu (plots in $LOG_DIR/quality/plots)"
    sed -n '/^AMOS quality/,$p' "$LOG_DIR/quality.log"
  fi
  if grep -qE '(failed|error)' "$LOG_DIR/tests.log" 2>/dev/null; then
    echo
    echo "### Kernel test failures"
    grep -E '^(FAILED|ERROR)' "$LOG_DIR/tests.log"
  fi
} | tee "$LOG_DIR/summary.md"
