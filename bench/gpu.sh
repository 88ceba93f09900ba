#!/usr/bin/env bash
# One prepared benchmark run on a lent GPU machine (an H200), finishing within BENCH_BUDGET_S
# (default 460 s, under 8 minutes) however its parts go: each part runs under `timeout`.
#
#   bash bench/gpu.sh OUTDIR          (from the repository root, or anywhere)
#
# 1. data      CIFAR-100 from $CIFAR100_DIR (a folder holding cifar-100-python/). Unset: the shared
#              copy's parts (cifar-100-python.tar.xz.part0..2) from $PARTS_DIR (default
#              shared/data/cifar100 or ../shared/data/cifar100 beside the repo), joined and unpacked
#              by bench/prepare_data.py (lzma + tarfile; shared/.../unpack.sh is not on that machine).
#              The parts are 131 MiB, more than the device tool carries (64 MiB in all), so carry the
#              data some other way or accept the fallback: without data the script makes synthetic
#              images of the right shapes. Speeds stay valid; the training run's accuracy is then
#              meaningless, and summary.md says so.
# 2. data bench   bench/augmentation.py on cuda: our augmentation against torchvision's (2 workers).
# 2b. syncs      bench/sync_check.py: a short eager train.py run under CUDA's sync debug mode, listing
#              every host synchronisation inside the epoch loop by source line.
# 3. step bench   bench/step.py for b0, b3, ex, exx at batch 256 and 512, modes eager-fp32 and all,
#              plus the refined step (teacher = its chain teacher) in all and eager-fp32; peak
#              memory of each model at batch 128 (eager-fp32, all-eager; ex also all). These run as
#              concurrent processes so their torch.compile work overlaps on the CPUs, while a lock
#              file lets only one of them time on the GPU at a time, pinned to CPUs 0-1 that the
#              others are kept off (see TimingLock in bench/common.py).
# 3b. compression bench/compression.py: the step dense, with pruning masks, with 8- and 4-bit QAT (ex, batch 256).
# 4. training     train.py --model efficientnet_ex on hard labels with the original entry's (uci) augmentation, for as
#              many epochs as the measured batch-128 speed fits into the time left (at most 240 s),
#              stopped by SIGTERM at the cap if the estimate was off (train.py then saves and exits).
# 5. ETA          bench/eta.py: the whole chain (b3, b3<-b3, b0<-b3, ex<-b0) at the measured speeds.
#
# OUTDIR gets four files (the device tool brings back at most 8): summary.md, results.json (every
# result JSON, merged), raw.tar.gz (every JSON, log, metrics.csv and the run's log.txt) and gpu.log.
# Work files go to $WORK (default ${TMPDIR:-/tmp}/micronet-bench-PID), not OUTDIR, for that reason;
# the training run's checkpoints stay there too.
#
# Knobs: PYTHON, BENCH_BUDGET_S, BENCH_DEVICE (cuda), BENCH_MODELS, BENCH_BATCHES ("256 512"),
# BENCH_MEM_BATCH (128), BENCH_STEP_ARGS, BENCH_SYNC_ARGS, BENCH_COMPRESS_ARGS, BENCH_PARALLEL (1; 0 runs the step benches one by one).
# BENCH_SMOKE=1 runs the whole script on a CPU with tiny models and data, to check its plumbing.
set -uo pipefail  # no -e: a part that fails or times out must not stop the parts after it

OUT_ARG=${1:?usage: bash bench/gpu.sh OUTDIR}
mkdir -p "$OUT_ARG" && OUTDIR=$(cd "$OUT_ARG" && pwd)
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)

if [ "${BENCH_SMOKE:-0}" = 1 ]; then
  # One OpenMP thread per process: on a small shared CPU more threads stall each other (PERFORMANCE.md).
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  : "${BENCH_DEVICE:=cpu}" "${BENCH_BUDGET_S:=420}" "${BENCH_BATCHES:=16}" "${BENCH_MEM_BATCH:=8}"
  : "${BENCH_MODELS:=efficientnet_b0 efficientnet_ex}" "${BENCH_PARALLEL:=0}"
  : "${BENCH_STEP_ARGS:=--steps 2 --warmup 1 --eval-steps 1 --rounds 1}" "${BENCH_ALL_MODE:=all-eager}"
  : "${BENCH_MODEL_ARGS:=--width-mult 0.1 --depth-mult 0.1 --teacher-width-mult 0.1 --teacher-depth-mult 0.1}"
  : "${BENCH_TRAIN_ARGS:=--device cpu --width-mult 0.1 --depth-mult 0.1 --train-limit 256 --test-limit 200 --batch-size 64}"
  : "${BENCH_DATA_ARGS:=--device cpu --limit 2000 --seconds 4 --rounds 1 --batch-size 128}"
  : "${BENCH_ETA_ARGS:=--any-width}"
  : "${BENCH_SYNC_ARGS:=--width-mult 0.1 --depth-mult 0.1 --train-limit 256 --test-limit 100 --batch-size 32}"
  : "${BENCH_COMPRESS_ARGS:=--width-mult 0.1 --depth-mult 0.1 --batch-size 16 --steps 1 --warmup 1 --eval-steps 1 --rounds 1}"
fi
BUDGET=${BENCH_BUDGET_S:-460}
DEADLINE=$((T0 + BUDGET))
DEVICE=${BENCH_DEVICE:-cuda}
MODELS=${BENCH_MODELS:-efficientnet_b0 efficientnet_b3 efficientnet_ex efficientnet_exx}
BATCHES=${BENCH_BATCHES:-256 512}
MEM_BATCH=${BENCH_MEM_BATCH:-128}
STEP_ARGS=${BENCH_STEP_ARGS:---steps 30 --warmup 5 --seconds 4 --eval-steps 20 --rounds 1}
MODEL_ARGS=${BENCH_MODEL_ARGS:-}
TRAIN_ARGS=${BENCH_TRAIN_ARGS:-}
DATA_ARGS=${BENCH_DATA_ARGS:---device $DEVICE --batch-size 512 --seconds 16 --rounds 2}
ETA_ARGS=${BENCH_ETA_ARGS:-}
SYNC_ARGS=${BENCH_SYNC_ARGS:-}
COMPRESS_ARGS=${BENCH_COMPRESS_ARGS:---amp bf16}  # train.py's CUDA default
PARALLEL=${BENCH_PARALLEL:-1}
ALL=${BENCH_ALL_MODE:-all}  # the everything-on mode; all-eager where torch.compile is too slow (CPU)
WORK=${WORK:-${TMPDIR:-/tmp}/micronet-bench-$$}
mkdir -p "$WORK/logs"
# Every run shares one compile cache, so a graph compiled by one benchmark (ex at batch 128 in
# "all") is a cache hit for the next (the training run's first compile).
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor-cache}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUTDIR/gpu.log") 2>&1

# part of BUDGET, in seconds: the reserves below were sized for the default 460 s and scale with it.
pct() { echo $(( BUDGET * $1 / 100 )); }
say() { echo "[gpu.sh +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
# cap_for WANT RESERVE: WANT seconds, or fewer so that RESERVE seconds stay for the later parts.
cap_for() { local c=$(( $(left) - $2 )); (( c > $1 )) && c=$1; echo "$c"; }
# phase NAME CAP OUTFILE CMD...: run CMD (stdout and stderr to OUTFILE) under a hard limit of CAP
# seconds and record how it went. timeout sends SIGTERM first, then SIGKILL 15 s later.
phase() {
  local name=$1 cap=$2 out=$3; shift 3
  if (( cap < 5 )); then say "$name: skipped, out of time"; echo "$name: skipped (out of time)" >>"$WORK/phases.txt"; return 124; fi
  say "$name (cap ${cap}s)"
  local t=$(date +%s)
  timeout -k 15 "$cap" "$@" >"$out" 2>&1
  local rc=$?
  echo "$name: $(( $(date +%s) - t )) s (cap $cap s), exit $rc$( ((rc == 124)) && echo ' = hit its cap')" >>"$WORK/phases.txt"
  return $rc
}

# ---------------------------------------------------------------- python, device
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in .venv/bin/python python3 python; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" 2>/dev/null; then PY=$c; break; fi
  done
fi
if [ -z "$PY" ]; then
  say "no python here imports torch: installing requirements.txt"
  timeout 180 python3 -m pip install -q -r requirements.txt && PY=python3
fi
[ -n "$PY" ] || { say "error: no python with torch"; exit 1; }
say "python: $PY; $("$PY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  say "error: torch sees no CUDA GPU here"; exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

# ---------------------------------------------------------------- 1. data
if [ -n "${CIFAR100_DIR:-}" ]; then
  DATA=$CIFAR100_DIR
  SOURCE=given
else
  if [ -z "${PARTS_DIR:-}" ]; then
    for d in shared/data/cifar100 ../shared/data/cifar100; do [ -d "$d" ] && PARTS_DIR=$d && break; done
  fi
  DATA=$WORK/cifar100
  phase data-prepare "$(cap_for 90 "$(pct 82)")" "$WORK/logs/data-prepare.log" "$PY" bench/prepare_data.py "$DATA" \
    --parts-dir "${PARTS_DIR:-/nonexistent}" --synthetic-fallback
  SOURCE=$(tail -n 1 "$WORK/logs/data-prepare.log" | "$PY" -c "import json,sys; print(json.load(sys.stdin)['source'])" 2>/dev/null || echo unknown)
fi
say "data: $DATA ($SOURCE)"

# ---------------------------------------------------------------- 2. data bench
# shellcheck disable=SC2086
phase data-bench "$(cap_for 50 "$(pct 73)")" "$WORK/logs/data-bench.log" "$PY" bench/augmentation.py --data_dir "$DATA" \
  --json "$WORK/data.json" $DATA_ARGS
cat "$WORK/logs/data-bench.log" | grep -v '^\[data\]'


# ---------------------------------------------------------------- 2b. host synchronisations
# A short eager run of train.py under torch.cuda.set_sync_debug_mode("warn"): every wait for the
# device inside the epoch loop, by source line (expected: the non-finite check, once per interval).
# shellcheck disable=SC2086
phase sync-check "$(cap_for 40 "$(pct 70)")" "$WORK/logs/sync-check.log" "$PY" bench/sync_check.py \
  --json "$WORK/sync.json" -- --device "$DEVICE" --model efficientnet_ex --data_dir "$DATA" --no-download \
  --train-limit 5000 --test-limit 1000 --batch-size 256 --epochs 1 --log-interval 10 --no-compile \
  --save "$WORK/sync-runs" $SYNC_ARGS
grep -A 20 '^host synchronisations' "$WORK/logs/sync-check.log"

# ---------------------------------------------------------------- 3. step and memory benches
short() { echo "${1#efficientnet_}"; }
# The chain's teacher of each model: b3 <- b3, b0 <- b3, ex <- b0 (exx, not in the chain: b0).
teacher_of() { case $1 in efficientnet_b3|efficientnet_b0) echo efficientnet_b3 ;; *) echo efficientnet_b0 ;; esac; }
NCPU=$(nproc)
PIN=()
LOCK_ARGS=(--lock "$WORK/gpu.lock")
if (( NCPU >= 6 )) && command -v taskset >/dev/null; then
  PIN=(taskset -c "2-$((NCPU - 1))")
  LOCK_ARGS+=(--timing-cpus 0-1)
  # Few compile workers each: there are a dozen processes compiling at once.
  export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-2}
fi
STEP_CAP=$(cap_for 170 "$(pct 47)")
JOBS=()
# b3 compiles longest: its jobs start first.
ORDERED="$(for m in $MODELS; do [ "$m" = efficientnet_b3 ] && echo "$m"; done) $(for m in $MODELS; do [ "$m" != efficientnet_b3 ] && echo "$m"; done)"
for m in $ORDERED; do
  for b in $BATCHES; do
    JOBS+=("step-$(short "$m")-$b|--model $m --batch-size $b --modes eager-fp32,$ALL --refined-teacher $(teacher_of "$m") --refined-modes $ALL,eager-fp32 $STEP_ARGS")
  done
  mem_modes=eager-fp32,all-eager
  [ "$m" = efficientnet_ex ] && [ "$ALL" != all-eager ] && mem_modes=$mem_modes,$ALL  # also sizes the training run
  JOBS+=("mem-$(short "$m")-$MEM_BATCH|--model $m --batch-size $MEM_BATCH --modes $mem_modes --steps 10 --warmup 3 --eval-steps 5 --rounds 1")
done
say "step benches: ${#JOBS[@]} jobs, $([ "$PARALLEL" = 1 ] && echo concurrent || echo one by one), cap ${STEP_CAP}s"
t_steps=$(date +%s)
run_job() {
  local name=${1%%|*} args=${1#*|} cap=$2
  # shellcheck disable=SC2086
  timeout -k 15 "$cap" "${PIN[@]}" "$PY" bench/step.py --device "$DEVICE" $args $MODEL_ARGS "${LOCK_ARGS[@]}" \
    --json "$WORK/$name.json" --quiet >"$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "  $name: exit $rc$( ((rc == 124)) && echo ' (hit the cap; its JSON holds the modes done)')" >>"$WORK/phases.txt"
}
echo "step benches:" >>"$WORK/phases.txt"
if (( STEP_CAP >= 5 )); then
  if [ "$PARALLEL" = 1 ]; then
    PIDS=()
    for job in "${JOBS[@]}"; do run_job "$job" "$STEP_CAP" & PIDS+=($!); done
    # Only these: a bare `wait` would also wait for the tee behind gpu.log, which never ends.
    wait "${PIDS[@]}"
  else
    for job in "${JOBS[@]}"; do
      c=$(cap_for "$STEP_CAP" "$(pct 47)")
      if (( c >= 5 )); then run_job "$job" "$c"; else echo "  ${job%%|*}: skipped (out of time)" >>"$WORK/phases.txt"; fi
    done
  fi
fi
echo "step benches: $(( $(date +%s) - t_steps )) s (cap $STEP_CAP s)" >>"$WORK/phases.txt"

# ---------------------------------------------------------------- 3b. compression bench
# bench/compression.py: train.py's step for ex dense, with 50% pruning masks, with 8-bit and 4-bit
# QAT and with QAT + masks, in interleaved rounds (docs/compression.md has the CPU figures).
# shellcheck disable=SC2086
phase compress-bench "$(cap_for 45 "$(pct 40)")" "$WORK/logs/compress-bench.log" "$PY" bench/compression.py \
  --device "$DEVICE" --model efficientnet_ex --batch-size 256 --steps 10 --warmup 3 --eval-steps 5 --rounds 2 \
  --json "$WORK/compress.json" $COMPRESS_ARGS
tail -n 12 "$WORK/logs/compress-bench.log"

# ---------------------------------------------------------------- 4. training run
TRAIN_CAP=$(cap_for 240 25)
OVERHEAD=${BENCH_TRAIN_OVERHEAD_S:-75}  # start, data load, compiles (train, eval at 1000, last batch)
EPOCHS=""
for b in 128 256 512 64 16; do
  # shellcheck disable=SC2086
  EPOCHS=$("$PY" bench/eta.py "$WORK" $ETA_ARGS --epochs-within "$(( TRAIN_CAP * 9 / 10 ))" --overhead "$OVERHEAD" \
    --model efficientnet_ex --batch-size "$b" --mode "$ALL" --fallback-modes all-eager,eager-fp32 2>/dev/null)
  [ -n "$EPOCHS" ] && break
done
EPOCHS=${EPOCHS:-75}  # no speed measured: the full regime, and the cap stops it
TRAIN_CMD=("$PY" train.py --model efficientnet_ex --data_dir "$DATA" --no-download --epochs "$EPOCHS" --no-progress
           --save "$WORK/runs" --keep-epoch-states false)
# shellcheck disable=SC2206
TRAIN_CMD+=($TRAIN_ARGS)
t_train=$(date +%s)
phase train "$TRAIN_CAP" "$WORK/logs/train.log" "${TRAIN_CMD[@]}"
train_rc=$?
train_wall=$(( $(date +%s) - t_train ))
tail -n 5 "$WORK/logs/train.log"
RUN=$(ls -td "$WORK"/runs/*/ 2>/dev/null | head -n 1)
"$PY" - "$WORK/train_info.json" "$EPOCHS" "$train_wall" "$train_rc" "$SOURCE" "${TRAIN_CMD[*]}" <<'PY'
import json, sys
path, epochs, wall, rc, source, cmd = sys.argv[1:]
note = None
if source == "synthetic":
    note = "SYNTHETIC DATA (no CIFAR-100 on the machine): seconds are real, accuracy is meaningless"
elif rc == "124":
    note = "stopped by its time cap (SIGTERM): the epochs listed are those finished"
json.dump({"command": cmd, "epochs": int(epochs), "wall_s": int(wall), "exit_code": int(rc),
           "data": source, "note": note}, open(path, "w"), indent=2)
PY

# ---------------------------------------------------------------- 5. ETA, summary, bundle
# shellcheck disable=SC2086
timeout 30 "$PY" bench/eta.py "$WORK" $ETA_ARGS --json "$WORK/eta.json" >"$WORK/eta.txt" 2>&1
{
  echo "Time spent per part (budget $BUDGET s):"
  echo '```'
  cat "$WORK/phases.txt"
  echo '```'
  if [ "$PARALLEL" = 1 ]; then
    echo "The step benches ran as concurrent processes. Their timed parts were serialised by a lock"
    echo "(each timed alone on the GPU${PIN:+, on CPUs 0-1 that the others were kept off}), but one"
    echo "process's compile probes and cudnn.benchmark's first-call autotuning can overlap another's timing."
  fi
  echo "Training epochs planned from the measured speed: $EPOCHS (cap $TRAIN_CAP s, $OVERHEAD s set aside for start and compiles)."
  echo "The refined rows use random-weight teachers: their cost does not depend on the weights."
} >"$WORK/notes.md"
# shellcheck disable=SC2086
timeout 30 "$PY" bench/summary.py "$WORK" $ETA_ARGS ${RUN:+--train-run "$RUN"} --train-info "$WORK/train_info.json" \
  --notes "$WORK/notes.md" --title "GPU benchmark ($DEVICE), $(date -u +%Y-%m-%d)" --out "$OUTDIR/summary.md" \
  --results-json "$OUTDIR/results.json" >/dev/null
[ -n "$RUN" ] && cp "$RUN"/metrics.csv "$RUN"/log.txt "$WORK/logs/" 2>/dev/null
tar -czf "$OUTDIR/raw.tar.gz" -C "$WORK" --exclude=cifar100 --exclude=inductor-cache --exclude=runs --exclude=sync-runs \
  --exclude=gpu.lock . 2>/dev/null
say "done in $(( $(date +%s) - T0 )) s; $OUTDIR: $(ls "$OUTDIR" | tr '\n' ' ')"
cat "$OUTDIR/summary.md" 2>/dev/null | head -n 80
