#!/usr/bin/env bash
# The GPU device check, in two phases that each fit one `run` call of the device tool (10 minutes a command,
# 15 minutes of device time a session, a bare machine at each start):
#
#   bash benchmarks/gpu_suite.sh --phase kernels   # CUDA extension, GPU-only tests, kernel tests and benchmarks
#   bash benchmarks/gpu_suite.sh --phase engine    # CUDA-graph and engine tests, real-shape rounds, end to end
#   bash benchmarks/gpu_suite.sh --dry-run         # the plan and budget of both phases; checks every command
#   bash benchmarks/gpu_suite.sh --phase engine --only bench_round    # a rerun of some steps (+ build_ext)
#
# It uses the machine's own python (PYTHON, default python3: on the GPU image the one holding torch, triton,
# transformers, scipy and pytest; no fastapi/openai, so the server's tests are not run), installs nothing
# (the checkout is imported in place; the CUDA extension is built in place, once, as the first step), and runs
# strict: EAGLE_KERNELS_STRICT=1 makes any op that falls back from its kernel on CUDA an error, and
# benchmarks/backends.py prints what every op ran. No JIT build starts at import or collection (EAGLE_NO_JIT=1).
#
# Everything comes back in $OUT (the device tool's folder; default benchmarks/results/gpu): per phase one JSON
# (gpu_<phase>.json: device, commit, date, every step's exit code and seconds, every result the benchmarks
# recorded) and one log (gpu_<phase>.log). Each step runs under its own time limit; a phase's limits add up to
# at most PHASE_BUDGET seconds and both phases' to at most TOTAL_BUDGET (the dry run checks both): with a
# machine's start (a minute or two) that leaves room in a 15-minute lease to rerun one phase. The exit code is
# the worst step's.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
PHASE_BUDGET=270  # seconds: the limits of one phase's steps, added
TOTAL_BUDGET=540  # both phases
PHASE="" DRY=0 ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --phase) PHASE=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_suite: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$PHASE" in
  kernels|engine) ;;
  "") [ "$DRY" = 1 ] || { echo "gpu_suite: give --phase kernels|engine (or --dry-run)" >&2; exit 2; } ;;
  *) echo "gpu_suite: unknown phase $PHASE (kernels, engine)" >&2; exit 2 ;;
esac

# ------------------------------------------------------------------------------------------------ the plan
# One step per line: NAME|LIMIT_SECONDS|COMMAND|CHECK, where CHECK is what the dry run runs to prove that
# COMMAND exists and parses, on any machine (empty: COMMAND itself under EAGLE_BENCH_CHECK_ARGS=1, which makes
# a benchmark read and check every argument, then stop). ${PY} is the python, ${XDIST} pytest's -n option where
# pytest-xdist is installed.
KERNEL_TESTS="tests/test_tree_attention.py tests/test_draft_head_kernels.py tests/test_round_kernels.py tests/test_sampling_kernels.py tests/test_kv_compact.py tests/test_tree_verify.py"
plan() {
  local build="build_ext|105|if ls eagle_kernels/_C*.so >/dev/null 2>&1; then echo 'eagle_kernels._C already built'; else TORCH_CUDA_ARCH_LIST=9.0a \${PY} setup.py -q build_ext --inplace; fi && \${PY} -c 'from eagle_kernels import _C_loader as c; assert c.available(), c.status(); print(c.status())'|\${PY} setup.py build_ext --help"
  case "$1" in
    kernels) cat <<EOF
$build
gpu_only_tests|30|\${PY} -m pytest -q -m 'gpu and kernels' $KERNEL_TESTS|\${PY} -m pytest -q --collect-only -m 'gpu and kernels' $KERNEL_TESTS
kernel_tests|70|\${PY} -m pytest -q \${XDIST} -m 'kernels and not gpu' $KERNEL_TESTS|\${PY} -m pytest -q --collect-only -m 'kernels and not gpu' $KERNEL_TESTS
bench_lm_head_topk|15|\${PY} benchmarks/bench_lm_head_topk.py --vocab 128256 32000 --rows 1 10 80 640|
bench_tree_attention|15|\${PY} benchmarks/bench_tree_attention.py --prefix 1024 8192 --tq 1 10 60 --batch 1 --ref-max 0|
bench_kv_compact|10|\${PY} benchmarks/bench_kv_compact.py --layers 32 --batch 1 8|
bench_tree_verify|10|\${PY} benchmarks/bench_tree_verify.py --batch 1 8|
backends|15|\${PY} benchmarks/backends.py|
EOF
    ;;
    engine) cat <<EOF
$build
engine_tests|50|\${PY} -m pytest -q \${XDIST} tests/test_cuda_graphs.py tests/test_engine_with_kernels.py|\${PY} -m pytest -q --collect-only tests/test_cuda_graphs.py tests/test_engine_with_kernels.py
bench_round|75|\${PY} benchmarks/bench_round.py --model llama3.1-8b --batches 1,8,32 --steps-timed 10|
bench_prefix|15|\${PY} benchmarks/bench_prefix.py --model llama3.1-8b --requests 6 --long-prompt 16384 --chunk 2048|
bench_e2e|25|\${PY} benchmarks/bench_e2e.py --repeats 2 --new-tokens 96|
EOF
    ;;
  esac
}

budget() {  # budget PHASE: the limits of its steps, added
  plan "$1" | awk -F'|' '{s += $2} END {print s}'
}

export PY=$PYTHON
if [ "$DRY" = 1 ]; then
  phases=${PHASE:-kernels engine}
  status=0 total_all=0
  export XDIST="" WORK
  WORK=$(mktemp -d)
  for p in $phases; do
    total=$(budget "$p")
    total_all=$((total_all + total))
    echo "== phase $p: $(plan "$p" | wc -l) steps, limits adding to ${total} s (at most ${PHASE_BUDGET} s)"
    [ "$total" -le "$PHASE_BUDGET" ] || { echo "   over budget" >&2; status=1; }
    while IFS= read -r line; do
      fields=$(awk -F'|' '{print NF}' <<< "$line")
      [ "$fields" = 4 ] || { echo "   not NAME|LIMIT|COMMAND|CHECK (a '|' in a command?): $line" >&2; status=1; }
      IFS='|' read -r name limit cmd check <<< "$line"
      printf '   %-22s %4s s  %s\n' "$name" "$limit" "$cmd"
      [ -n "$check" ] || check="EAGLE_BENCH_CHECK_ARGS=1 $cmd"
      if ! out=$(cd "$ROOT" && PYTHONPATH="$ROOT:$ROOT/python" EAGLE_NO_JIT=1 bash -c "$check" 2>&1 < /dev/null); then
        echo "   check failed for $name: $check" >&2
        echo "$out" | tail -n 20 >&2
        status=1
      fi
    done < <(plan "$p")
  done
  if [ -z "$PHASE" ]; then
    echo "== both phases: ${total_all} s (at most ${TOTAL_BUDGET} s)"
    [ "$total_all" -le "$TOTAL_BUDGET" ] || { echo "   over budget" >&2; status=1; }
  fi
  rm -rf "$WORK"
  [ "$status" = 0 ] && echo "dry run: every command exists and parses; the phases fit their budgets"
  exit "$status"
fi

# ------------------------------------------------------------------------------------------------- running
OUT=${OUT:-$ROOT/benchmarks/results/gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/gpu_$PHASE.log"
: > "$LOG"
export WORK PYTHONPATH="$ROOT:$ROOT/python" EAGLE_KERNELS_STRICT=1 EAGLE_NO_JIT=1 PYTHONUNBUFFERED=1
export EAGLE_BENCH_RESULTS="$WORK/results"
unset TRITON_INTERPRET
XDIST=""
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST="-n 8"
export XDIST
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "gpu_suite: phase $PHASE, started $START, python $PYTHON, results in $OUT" | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

: > "$WORK/steps"
if [ -n "$ONLY" ]; then  # every name must exist; the extension is always built (a bare machine needs it)
  for name in ${ONLY//,/ }; do
    plan "$PHASE" | cut -d'|' -f1 | grep -qx "$name" || { echo "gpu_suite: no step $name in $PHASE" >&2; exit 2; }
  done
  ONLY="build_ext,$ONLY"
fi
worst=0
while IFS='|' read -r name limit cmd check; do
  if [ -n "$ONLY" ] && ! [[ ",$ONLY," == *",$name,"* ]]; then
    continue
  fi
  t0=$SECONDS
  echo "=== $name (limit $limit s): $cmd" | tee -a "$LOG"
  timeout -k 10 "$limit" bash -c "$cmd" < /dev/null 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  [ "$rc" -gt "$worst" ] && worst=$rc
  echo "$name $rc $((SECONDS - t0)) $limit" >> "$WORK/steps"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$LOG"
done < <(plan "$PHASE")

# One JSON with every figure: the steps, every result the benchmarks appended, the round model's prediction.
"$PYTHON" - "$PHASE" "$WORK" "$OUT" "$START" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, json, os, sys
sys.path.insert(0, "benchmarks")
import common

phase, work, out, start = sys.argv[1:]
steps = []
for line in open(os.path.join(work, "steps")):
    name, rc, seconds, limit = line.split()
    steps.append({"step": name, "exit_code": int(rc), "seconds": int(seconds), "limit": int(limit)})
results = {}
for path in sorted(glob.glob(os.path.join(work, "results", "*.json"))):
    with open(path) as f:
        results[os.path.basename(path)[:-5]] = [json.loads(line) for line in f if line.strip()]
record = {"phase": phase, "started": start, **common.environment(), "steps": steps, "results": results}
with open(os.path.join(out, f"gpu_{phase}.json"), "w") as f:
    json.dump(record, f, indent=1)
print("\n=== steps")
print(common.format_table(steps, ["step", "exit_code", "seconds", "limit"]))
print(f"\nwrote {out}/gpu_{phase}.json and gpu_{phase}.log")
EOF
rm -rf "$WORK"
exit "$worst"
