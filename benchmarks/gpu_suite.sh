#!/usr/bin/env bash
# The GPU suite in one command, on a machine with a CUDA GPU and Python with torch + triton installed (no
# network needed):
#
#   bash benchmarks/gpu_suite.sh
#
# 1. installs the package in place (pip install -e . --no-build-isolation --no-deps);
# 2. runs the tests on the GPU (pytest -x -q tests, without TRITON_INTERPRET; the AOT compile test, ~10 CPU
#    minutes, is left to CI, which runs it on every submission);
# 3. runs every benchmarks/bench_*.py it finds (new benchmarks join automatically), each under a time limit,
#    then benchmarks/methods.py (every speculative method; results in benchmarks/results/gpu/);
# 4. records the run (device, date, commit, exit codes, durations) in benchmarks/results/gpu_suite.json and
#    prints a summary table of every result recorded during this run, last.
#
# Environment knobs: PYTHON (default python), TEST_TIMEOUT (s, default 300), BENCH_TIMEOUT (s per benchmark,
# default 150), SKIP_INSTALL=1, SKIP_TESTS=1. Aims to finish within 8 minutes.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOG="$RESULTS/gpu_suite_$STAMP.log"
unset TRITON_INTERPRET
echo "gpu_suite: started $START, log $LOG"

run_step() {  # run_step NAME TIMEOUT CMD...: runs CMD, tees to the log, records "NAME rc seconds"
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "$name $rc $((SECONDS - t0))" >> "$RESULTS/.gpu_suite_steps_$STAMP"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
}

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  run_step install 300 "$PYTHON" -m pip install -e . --no-build-isolation --no-deps -q
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  run_step tests "$TEST_TIMEOUT" "$PYTHON" -m pytest -x -q tests --ignore tests/test_triton_compile.py
fi
for bench in benchmarks/bench_*.py; do
  [ -e "$bench" ] || continue
  run_step "$(basename "$bench" .py)" "$BENCH_TIMEOUT" "$PYTHON" "$bench"
done
# Every method on the demo pair (trains its Medusa heads first on a fresh machine): results beside the CPU ones.
run_step methods 420 "$PYTHON" benchmarks/methods.py --device cuda --prompts 8 --repeats 2 \
  --out "$RESULTS/gpu"

# Record the run, then print everything recorded since it started.
"$PYTHON" - "$RESULTS/.gpu_suite_steps_$STAMP" "$LOG" <<'EOF'
import os
import sys

sys.path.insert(0, "benchmarks")
import common  # noqa: E402

steps = []
with open(sys.argv[1]) as f:
    for line in f:
        name, rc, seconds = line.split()
        steps.append({"step": name, "exit_code": int(rc), "seconds": int(seconds)})
os.remove(sys.argv[1])
common.append_results("gpu_suite", [{"steps": steps, "log": os.path.basename(sys.argv[2])}])
print("\n=== steps")
print(common.format_table(steps, ["step", "exit_code", "seconds"]))
EOF
echo
echo "=== results recorded since $START"
"$PYTHON" benchmarks/common.py summary --since "$START"
