#!/usr/bin/env bash
# The whole GPU check in one call, under 8 minutes on one GPU: parity tests compiled on the GPU, kernel
# microbenchmarks, the ahead-of-time compile report, training-step throughput, the cost table and the same
# benchmarks as pytest-benchmark tests (bench/test_gpu_benchmarks.py, when pytest-benchmark is installed).
#
#   bash bench/gpu_suite.sh OUTDIR          (from anywhere; runs from the repository root with PYTHONPATH=.)
#
# Installs nothing. Every part runs under `timeout`, so one failure or hang still leaves the others' results.
# OUTDIR ends up with at most 8 files (the device tool returns no more): summary.md (printed at the end),
# env.json, kernels.json, throughput.json, cost.json, compile_report.json, benchmarks.json and logs.tar.gz (every
# log and per-part markdown, and rl.json); see bench/results/README.md. The copy of the tree on the GPU machine may
# have no .git: set BENCH_GIT_COMMIT=<hash> on the command line to name the commit in every result.
# Time limits in seconds (typical use in brackets): env 10+25 [~10] | tests 80 [~40 with pytest-xdist's 4
# workers, used when installed] | kernels 90 [~80: no new measurement after 65 s, no torch.compile one with
# < 25 s of that left] | throughput 185 [~155: none after 140 s, no compiled one with < 60 s of that left] |
# cost 10 [~2] | benchmarks 30 [~20] | rl: what is left of 450 s, at most 90, none under 30 | summary 20 [~5].
# About 5.5 min expected, then bench.rl; every part at its limit and killed 5 s after it, 480 s (8 min). The
# compile report (CPU only) runs in the background from the start (limit 300) and is waited for before bench.rl.
set -u
OUT=${1:?usage: bash bench/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY=${PYTHON:-$(command -v python3 || command -v python)}
T0=$(date +%s)
: > "$OUT/parts.txt"
# GPU_SUITE_CPU_SMOKE=1: the same script with tiny CPU runs and no tests (tests/test_bench.py proves the plumbing)
if [ "${GPU_SUITE_CPU_SMOKE:-0}" = 1 ]; then
  KERNELS_ARGS="--cpu-smoke --op rms_norm --variants torch"
  THROUGHPUT_ARGS="--cpu-smoke --preset small --variants minimind2 torch --warmup 1 --repeats 2"
  COMPILE_ARGS="--kernels swiglu --cc 90"
  BENCHMARK_ARGS=(bench/test_cpu_benchmarks.py -k "test_loader and pretrain" --benchmark-max-time=0.1)
  BENCHMARK_LIMIT=120  # no time budget to keep here, and a loaded CPU builds the demo corpus slowly
  RL_ARGS="--preset tiny --prompts 1 --group 2 --prompt_len 8 --gen_len 8 --kernels torch --repeats 1"
  RUN_TESTS=0
else
  KERNELS_ARGS="--budget_s 65"
  THROUGHPUT_ARGS="--preset all --seq_len 512 1024 --budget_s 140"
  COMPILE_ARGS=""
  BENCHMARK_ARGS=(bench/test_gpu_benchmarks.py)
  BENCHMARK_LIMIT=30
  RL_ARGS=""  # its GPU defaults: MiniMind's GRPO size, 2 prompts x 6, 768 + 1024 tokens, ours on triton
  RUN_TESTS=1
fi

part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, log to OUT/NAME.log, record rc and seconds
  local name=$1 limit=$2 t rc
  shift 2
  echo "=== $name (limit ${limit}s, at $(( $(date +%s) - T0 ))s) ==="
  t=$(date +%s)
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "| $name | $rc$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo ' (timed out)') | $(( $(date +%s) - t )) |" \
    >> "$OUT/parts.txt"
  tail -n 3 "$OUT/$name.log"
}

# 1. environment
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  git rev-parse --short HEAD 2>/dev/null
} > "$OUT/env.log"
timeout 25 "$PY" - > "$OUT/env.json" 2>> "$OUT/env.log" <<'EOF'
import importlib.util, json
from bench import report
env = report.environment()
env["liger_kernel"] = importlib.util.find_spec("liger_kernel") is not None
env["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
print(json.dumps(env, indent=1))
EOF
cat "$OUT/env.log" "$OUT/env.json"

# 2. the compile report needs no GPU: in the background, on the CPU, while the GPU parts run
( timeout -k 5 300 "$PY" -m bench.compile_report $COMPILE_ARGS --out "$OUT" > "$OUT/compile_report.log" 2>&1
  echo "| compile_report | $? | background |" >> "$OUT/parts.txt" ) &
BG=$!

# 3. parity tests, compiled on the GPU (the kernel test files that exist); cold, each Triton specialisation
# compiles (~0.3 s each, ~150 of them), so 4 xdist workers share the compiling when pytest-xdist is there
# and GRPO on the triton and liger backends against torch on the GPU (liger: where liger-kernel is installed)
TESTS=$(ls tests/test_kernels_elementwise.py tests/test_linear_cross_entropy.py tests/test_moe.py \
           tests/test_model_triton.py 2>/dev/null | tr '\n' ' ')
[ -f tests/test_rl_stages.py ] && TESTS="$TESTS tests/test_rl_stages.py::test_grpo_on_cuda_kernels_matches_torch"
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
if [ "$RUN_TESTS" = 0 ]; then
  echo "| tests | skipped (CPU smoke) | 0 |" >> "$OUT/parts.txt"
elif [ -n "$TESTS" ]; then
  part tests 80 "$PY" -m pytest -v -rfE $XDIST --durations=10 -p no:cacheprovider --junitxml="$OUT/tests.xml" $TESTS
else
  echo "| tests | no kernel test files found | 0 |" >> "$OUT/parts.txt"
fi

# 4. kernel microbenchmarks (no new measurement after 65 s; the JSON is rewritten after every measurement)
part kernels 90 "$PY" -m bench.kernels --out "$OUT" $KERNELS_ARGS

# 5. training-step throughput (no new measurement after 140 s; order in bench.throughput.plan)
part throughput 185 "$PY" -m bench.throughput --out "$OUT" $THROUGHPUT_ARGS

# 6. cost table from what was measured (published data sizes: the data is not on this machine)
if [ -f "$OUT/throughput.json" ]; then
  part cost 10 "$PY" -m bench.cost --throughput "$OUT/throughput.json" --kernels_json "$OUT/kernels.json" --out "$OUT"
else
  echo "| cost | no throughput.json | 0 |" >> "$OUT/parts.txt"
fi

# 7. the pytest-benchmark versions (each op forward + backward, a training step per preset and variant)
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  # (without xdist's worker variables: pytest-benchmark turns itself off when it sees them, e.g. when this script
  # runs inside the test suite's xdist workers)
  part benchmarks "$BENCHMARK_LIMIT" env -u PYTEST_XDIST_WORKER -u PYTEST_XDIST_WORKER_COUNT \
    "$PY" -m pytest "${BENCHMARK_ARGS[@]}" --benchmark-only \
    --benchmark-json="$OUT/benchmarks.json" -q -p no:cacheprovider
  [ -s "$OUT/benchmarks.json" ] || rm -f "$OUT/benchmarks.json"  # created empty at the start: killed before the end
else
  echo "| benchmarks | skipped (pytest-benchmark not installed) | 0 |" >> "$OUT/parts.txt"
fi

wait "$BG" 2>/dev/null

# 8. one GRPO step at MiniMind's size, ours against MiniMind's full-logits log-probs (bench.rl), in the time the
# parts above left of the 8 minutes (at most 90 s; none when less than 30 s is left)
LEFT=$(( 450 - ($(date +%s) - T0) ))
if [ "$LEFT" -ge 30 ]; then
  part rl $(( LEFT < 90 ? LEFT : 90 )) "$PY" -m bench.rl --json "$OUT/rl.json" $RL_ARGS
else
  echo "| rl | skipped (${LEFT}s left of the 8 minutes) | 0 |" >> "$OUT/parts.txt"
fi

# 9. one summary (compact tables; the full ones are in each part's .md), then logs and per-part markdown packed
# into logs.tar.gz so that at most 8 files remain
echo "| total | - | $(( $(date +%s) - T0 )) |" >> "$OUT/parts.txt"
timeout 20 "$PY" -m bench.report "$OUT" > "$OUT/summary.log" 2>&1 || cp "$OUT/summary.log" "$OUT/summary.md"
( cd "$OUT" || exit
  files=$(ls -- *.log *.xml *.tmp parts.txt kernels.md throughput.md cost.md compile_report.md rl.json 2>/dev/null)
  [ -n "$files" ] && tar czf logs.tar.gz --remove-files $files
  ls -la )
# the tool returns only the end of the output: the summary last
cat "$OUT/summary.md"
