#!/usr/bin/env bash
# GPU check, in at most 9 minutes (GPU_CHECK_SECONDS) on an H100/H200 machine (PyTorch 2.11, Triton 3.6, Python 3.12,
# no DeepSpeed, no network). Run from the repository root:
#   bash bench/gpu_check.sh                 # every section, sharing one budget (later steps get what is left)
#   bash bench/gpu_check.sh kernels         # the fused vocabulary path alone
#   GPU_CHECK_SECONDS=560 bash bench/gpu_check.sh train     # the training step alone (fits one 10-minute device call)
#   GPU_CHECK_SECONDS=450 bash bench/gpu_check.sh quality   # pretraining quality alone
#
# It carries its Python packages in .whl/ (made here, on a machine with a registry):
#   ../shared/tools/gpu-wheels.sh --peers .whl   # DeepSpeed and its dependencies; transformers (the ELECTRA peer),
#                                                # Liger-Kernel and Cut Cross-Entropy (kernel benchmark rows)
#   python3 -m pip download -q --no-deps -d .whl pytest pluggy iniconfig packaging   # if the GPU machine lacks pytest
# Section "kernels" (each step bounded by what is left of the time):
#   1. kernel and noise tests on CUDA (fp32 and bf16, both layouts): tests/test_kernels_*.py, tests/test_ops.py
#   2. tile sweep of both layouts of the fused path, with registers and spills per kernel:
#      python -m amos_kernels.bench_tiles (N 16384, V 32768; each layout's default first, then the chunked_logits
#      variants, then the stacked_slots ones)
#   3. microbenchmark: python -m amos_kernels.bench (N 16384/4096, V 32768/64000, H 768, K 3, bf16; both layouts
#      against eager, torch.compile, Liger's CE and the matmul floor; the goal shape N 16384, V 32768 first, so that
#      a timeout still leaves it)
# Section "train":
#   4. which attention kernel takes the relative bias with its gradient (bench/bench_attention.py, base shapes)
#   5. the model-step tests on CUDA (FlexAttention's gradient, compiled layers): tests/test_model_step.py
#   6. base, bf16, ZeRO-1, 32 x 512, accumulation 8, sdpa and flex attention, against Hugging Face ELECTRA, with the
#      profile breakdown (bench/bench_train.py); 7. base_plus_plus the same, sdpa, without the peer
#   8. what held-out evaluation and the probe cost: bench/bench_eval_cost.py --budget gpu (`small`, bf16, the same
#      short run with and without them; whatever time the steps before left, up to 90 s)
# Section "quality":
#   9. bench/quality.py --budget gpu (AMOS, ELECTRA-style, Hugging Face ELECTRA, random init on MR; up to 7 minutes).
#      It reads $AMOS_SHARED_DATA, else ../shared/data, else .data (bring it with `cp -r ../shared/data .data`).
# and prints one table. Logs go to $OUT (or /tmp/amos_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

SECTIONS=${*:-kernels train quality}
TOTAL_S=${GPU_CHECK_SECONDS:-540}
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
# amos_ds is linked too, rather than putting this folder on PYTHONPATH: its kernels/ would shadow PyPI's `kernels`,
# which transformers imports for the Hugging Face peer.
ln -sfn "$PWD/kernels" "$SITE/amos_kernels"
ln -sfn "$PWD/amos_ds" "$SITE/amos_ds"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

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

HAVE_PYTEST=0
python3 -c "import pytest" 2>/dev/null && HAVE_PYTEST=1

if [[ " $SECTIONS " == *" kernels "* ]]; then
  if ((HAVE_PYTEST)); then
    # Each test shape is a new kernel specialisation to compile: four workers compile in parallel when xdist is there.
    PARALLEL=()
    python3 -c "import xdist" 2>/dev/null && PARALLEL=(-n 4)
    run_step "kernel tests (CUDA, fp32 + bf16)" 170 "$LOG_DIR/tests.log" \
      python3 -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" tests/test_kernels_vocab_path.py tests/test_ops.py \
      tests/test_kernels_bench.py
  else
    ROWS+=("| kernel tests | skipped: no pytest (carry its wheels, see the header) | 0 | |")
  fi
  run_step "tile sweep" 120 "$LOG_DIR/tiles.log" python3 -m amos_kernels.bench_tiles
  run_step "microbenchmark" 220 "$LOG_DIR/bench.log" \
    python3 -m amos_kernels.bench --rows 16384 4096 --vocab 32768 64000 --warmup 1 --repeats 5
fi

if [[ " $SECTIONS " == *" train "* ]]; then
  run_step "attention kernels (base shapes)" 45 "$LOG_DIR/attention.log" python3 bench/bench_attention.py
  if ((HAVE_PYTEST)); then
    run_step "model-step tests (CUDA)" 100 "$LOG_DIR/step_tests.log" \
      python3 -m pytest -q -p no:cacheprovider tests/test_model_step.py
  else
    ROWS+=("| model-step tests | skipped: no pytest (carry its wheels, see the header) | 0 | |")
  fi
  run_step "train base vs HF ELECTRA" 270 "$LOG_DIR/train_base.log" \
    python3 bench/bench_train.py --preset base --attention sdpa flex --profile
  run_step "train base_plus_plus" 120 "$LOG_DIR/train_base_plus_plus.log" \
    python3 bench/bench_train.py --preset base_plus_plus --attention sdpa --deepspeed-config base_plus_plus.json \
    --no-peer --profile
  run_step "evaluation cost (bench_eval_cost.py)" 90 "$LOG_DIR/eval_cost.log" \
    python3 bench/bench_eval_cost.py --budget gpu --work "$LOG_DIR/eval_cost"
fi

if [[ " $SECTIONS " == *" quality "* ]]; then
  DATA=${AMOS_SHARED_DATA:-../shared/data}
  [[ -d $DATA ]] || DATA=.data
  if [[ -d $DATA/eval/mr ]]; then
    run_step "quality (bench/quality.py --budget gpu)" 420 "$LOG_DIR/quality.log" \
      python3 bench/quality.py --budget gpu --data "$DATA" --work "$LOG_DIR/quality"
  else
    ROWS+=("| quality | skipped: no data (set AMOS_SHARED_DATA or bring .data, see the header) | 0 | |")
  fi
fi

{
  echo "## amos-ds GPU check: $(cat "$LOG_DIR/env.log"), $((SECONDS - START)) s"
  echo
  echo "| step | status | seconds | last line of output |"
  echo "| --- | --- | ---: | --- |"
  printf '%s\n' "${ROWS[@]}"
  echo
  for log in tiles bench attention train_base train_base_plus_plus eval_cost; do
    if [[ -f "$LOG_DIR/$log.log" ]]; then
      echo "### $log.log"
      grep -E '^(device:|\||Where)' "$LOG_DIR/$log.log"
      # A run cut short by its time limit prints no breakdown table: show the rows' profile lines instead.
      grep -q '^Where' "$LOG_DIR/$log.log" || grep -E '^profile' "$LOG_DIR/$log.log"
      echo
    fi
  done
  if [[ -f "$LOG_DIR/quality.log" ]]; then
    echo "### bench/quality.py --budget gpu (plots in $LOG_DIR/quality/plots)"
    sed -n '/^AMOS quality/,$p' "$LOG_DIR/quality.log"
    echo
  fi
  for log in tests step_tests; do
    if grep -qE '(failed|error)' "$LOG_DIR/$log.log" 2>/dev/null; then
      echo "### $log.log failures"
      grep -E '^(FAILED|ERROR)' "$LOG_DIR/$log.log"
    fi
  done
} | tee "$LOG_DIR/summary.md"
