#!/usr/bin/env bash
# fastdpo's whole GPU benchmark in one command of at most 8 minutes, on a machine with an NVIDIA GPU and no network:
#
#   bash benchmarks/fetch_wheels.sh      # once, where there is network: the competitors' wheels into .wheels/
#   OUT=results-dir bash benchmarks/device_run.sh
#
# Needs python3 with torch and triton (transformers for TRL); the competitors (TRL, Liger-Kernel, Cut Cross-Entropy)
# install from .wheels/ (--no-deps, --no-index). Every step runs under `timeout`, with unbuffered output, and writes
# its results into $OUT as soon as it has them, so a run cut off anywhere still leaves what it measured. The overall
# budget (FASTDPO_DEVICE_BUDGET_S, default 470 s) caps every step's timeout by the time left. Steps, in order of
# value:
#   env      GPU, driver, versions                                      -> $OUT/env.txt
#   install  competitors' wheels (--no-deps, --no-index) and fastdpo     -> $OUT/install.json
#   cublas   the card's bf16 matmul rate at the head's shapes           -> $OUT/cublas.json
#   tune     the fused kernels' autotuning at the compared shapes        -> $OUT/tuning/autotune-<card>-....json
#   checks   correctness of the compiled kernels, lean and fast modes   -> $OUT/gpu_checks.md
#   compare  llama3-8b: every engine in lean and fast mode and auto       -> $OUT/compare-llama3-8b.{json,md}
#            (fastdpo-fused[-fast], fastdpo-chunked[-fast], fastdpo[-fast]) beside TRL, Liger, CCE and naive;
#            ref/noref, extras off/on
#   profile  per-kernel time of one llama3-8b step (torch.profiler)     -> $OUT/profile.{md,json}
#   compare  llama3-8b-1x512, gemma2-2b, qwen2.5-7b (ref, no extras)    -> $OUT/compare-<shape>.{json,md}
#   record   all rows in one file, a markdown table naming the card     -> $OUT/results.json, $OUT/RESULTS-run.md
# The autotuning cache lives in $OUT/tuning (FASTDPO_CACHE_DIR), so the run records the configs it chose and their
# trials; each compare report lists them too. FASTDPO_AUTOTUNE_BUDGET_S (default here 25 s) bounds each shape's
# tuning. Then, to keep the run: python3 benchmarks/record_results.py --from $OUT --record (see README).
#
# FASTDPO_DEVICE_TINY=1 runs the same flow on CPU at toy sizes through the Triton interpreter (the tests use it);
# FASTDPO_DEVICE_SKIP_STEPS="checks profile" leaves steps out (a rerun, or a test that covers them elsewhere);
# FASTDPO_DEVICE_SHAPES="gemma2-2b" replaces the shapes compared after llama3-8b ("" for none).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} PIP_DISABLE_PIP_VERSION_CHECK=1
OUT=${OUT:-$PWD/device-out}
export OUT
mkdir -p "$OUT"
export FASTDPO_CACHE_DIR=${FASTDPO_CACHE_DIR:-$OUT/tuning} FASTDPO_AUTOTUNE_BUDGET_S=${FASTDPO_AUTOTUNE_BUDGET_S:-25}
BUDGET=${FASTDPO_DEVICE_BUDGET_S:-470}
END=$((SECONDS + BUDGET))
TINY=${FASTDPO_DEVICE_TINY:-0}
if [ "$TINY" = 1 ]; then
  export TRITON_INTERPRET=1
  DEV=(--device cpu --tiny)
  # With a reference only: the interpreter runs every row's kernels in numpy (gpu_compare's tests cover noref).
  COMPARE=(--device cpu --tiny --dtype fp32 --repeats 1 --warmup 0 --cases ref)
  SHAPES_REST=${FASTDPO_DEVICE_SHAPES-gemma2-2b}
else
  DEV=()
  COMPARE=()
  SHAPES_REST=${FASTDPO_DEVICE_SHAPES-llama3-8b-1x512 gemma2-2b qwen2.5-7b}
fi
LOG="$OUT/device_run.log"
: > "$OUT/steps.tsv"

log() { echo "[device_run $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: run CMD under `timeout` (capped by the budget left), log its output, record its status.
step() {
  local name=$1 limit=$2
  shift 2
  case " ${FASTDPO_DEVICE_SKIP_STEPS:-} " in *" $name "*)
    log "skip $name: FASTDPO_DEVICE_SKIP_STEPS"
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
    return 0;;
  esac
  local left=$((END - SECONDS - 5))
  if [ "$left" -lt 10 ]; then
    log "skip $name: budget spent"
    printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  log "step $name (timeout ${limit}s): $*"
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  log "step $name: exit $rc after $((SECONDS - t0))s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
  return 0
}

log "env"
{
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
  timeout 60 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
  timeout 60 "$PY" -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "${FASTDPO_DEVICE_SKIP_INSTALL:-0}" = 1 ]; then
  log "install skipped (FASTDPO_DEVICE_SKIP_INSTALL=1)"
else
  step install 150 "$PY" -u benchmarks/install_wheels.py --env-file "$OUT/install.env" --json "$OUT/install.json"
  # shellcheck disable=SC1091
  [ -s "$OUT/install.env" ] && . "$OUT/install.env"
fi

step cublas 60 "$PY" -u benchmarks/cublas_rate.py ${DEV[@]+"${DEV[@]}"}
if [ "$TINY" != 1 ]; then
  # Ahead of the timings (which would otherwise tune in their warm-up): the compared shapes' policy heads.
  TUNE_SHAPES=(--shape llama3-8b)
  for shape in $SHAPES_REST; do TUNE_SHAPES+=(--shape "$shape"); done
  step tune 150 "$PY" -u -m fastdpo tune "${TUNE_SHAPES[@]}"
  step tune-extras 40 "$PY" -u -m fastdpo tune --shape llama3-8b --extras
fi
step checks 120 "$PY" -u benchmarks/gpu_checks.py ${DEV[@]+"${DEV[@]}"}
step compare-llama3-8b 200 "$PY" -u benchmarks/gpu_compare.py --skip-checks --shapes llama3-8b \
  --name compare-llama3-8b --repeats 5 --warmup 2 ${COMPARE[@]+"${COMPARE[@]}"}
step profile 90 "$PY" -u benchmarks/profile_step.py ${DEV[@]+"${DEV[@]}"}
for shape in $SHAPES_REST; do
  # The targets at these shapes are with a reference head, like with like without the extras.
  step "compare-$shape" 120 "$PY" -u benchmarks/gpu_compare.py --skip-checks --shapes "$shape" --cases ref \
    --extras off --name "compare-$shape" --repeats 5 --warmup 2 ${COMPARE[@]+"${COMPARE[@]}"}
done
END=$((END + 15))  # the record step always gets its few seconds
step record 15 "$PY" -u benchmarks/record_results.py --from "$OUT" --out "$OUT"
log "done"
