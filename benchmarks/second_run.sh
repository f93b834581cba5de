#!/usr/bin/env bash
# The default sr job (configs/sr.py) started twice with one FRESH persistent compilation cache
# (issue 19, acceptance 7): how long each run takes to compile its CoDi step (the job's own
# "compiled train step" log line) and to finish its first train step. Each run is stopped after
# its first step.
#
#   bash benchmarks/second_run.sh [OUT_DIR]      # PYTHON=... to pick the interpreter
#
# Writes OUT_DIR/run{1,2}.log and OUT_DIR/second_run.txt; the cache is OUT_DIR/cache (not the
# user's), so run 1 always compiles cold. --config.train.log_every=1 only makes step 1 log
# itself (--verbosity=0: INFO logs on, which is where it logs); it is not part of the compiled
# step.
set -u
OUT=${1:-/tmp/cdd_second_run}
PY=${PYTHON:-python}
rm -rf "$OUT"
mkdir -p "$OUT"
export CDD_JAX_COMPILATION_CACHE="$OUT/cache"
summary="$OUT/second_run.txt"
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S') UTC; host: $(hostname); $(nproc) cores"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
} > "$summary"
for run in 1 2; do
  log="$OUT/run$run.log"
  load="$(cut -d' ' -f1-3 /proc/loadavg)"
  t0=$(date +%s.%N)
  "$PY" -m cdd_jax.main --config=configs/sr.py --workdir="$OUT/wd$run" \
    --config.train.log_every=1 --verbosity=0 > "$log" 2>&1 &
  pid=$!
  compiled="" first=""
  while kill -0 "$pid" 2>/dev/null; do
    now=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
    if [ -z "$compiled" ] && grep -q "compiled train step" "$log"; then compiled=$now; fi
    if grep -qE '\] \[1\] ' "$log"; then first=$now; kill -KILL "$pid"; break; fi
    sleep 0.5
  done
  wait "$pid" 2>/dev/null
  secs=$(grep -o '"compile_seconds": [0-9.]*' "$log" | head -1 | awk '{print $2}')
  trace=$(grep -o '"trace_seconds": [0-9.]*' "$log" | head -1 | awk '{print $2}')
  echo "run $run: load before $load; step compile ${secs:-?} s (of which tracing and" \
    "lowering ${trace:-?} s; the job's" \
    "log); compiled-step log line at ${compiled:-?} s; first step done at ${first:-never} s" \
    "after the process started" | tee -a "$summary"
done
echo "cache: $(du -sh "$OUT/cache" | cut -f1) in $(find "$OUT/cache" -type f | wc -l) files" \
  | tee -a "$summary"
