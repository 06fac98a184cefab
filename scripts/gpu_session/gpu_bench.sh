#!/usr/bin/env bash
# The GPU figures of README/BENCHMARKS in one call (one H100, at most ~8 minutes, compile
# warm-ups included): the compiled-path tests on CUDA, then bench.py's rows in order of
# importance, each under its own time limit and all under one deadline, so that a step that
# runs long costs only itself and the steps after it (bench.py writes its JSON after every
# row). Output: $OUT/*.json, *.md, *.log and steps.txt (how each step ended).
#   OUT=out bash scripts/gpu_session/gpu_bench.sh [total seconds, default 465]
set -u
OUT=${OUT:-out}
DEADLINE=${1:-465}
mkdir -p "$OUT"
# The compiler's on-disk caches (FX graphs, Triton kernels): the first bench processes fill
# them, the `warm` step (a new process) measures the warm start.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/minipara-inductor}
B="python bench.py --shape llama-2-7b --dtype bfloat16 --device cuda"
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS)); shift 2
  if ((left < 15)); then echo "$name: skipped (deadline)" | tee -a "$OUT/steps.txt"; return; fi
  ((limit > left)) && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s (limit $limit)" | tee -a "$OUT/steps.txt"
}
step tests 80 env MINIPARA_TEST_DEVICE=cuda python -m pytest -q -x tests/test_fast.py
step single 200 $B --methods base,lora --beams 1,3 --runs 5 --compare-hf \
  --json "$OUT/single.json" --markdown "$OUT/single.md"
step tenants32 100 $B --batch 32 --tenants 16 --methods lora,para --beams 1 --runs 3 \
  --json "$OUT/tenants32.json" --markdown "$OUT/tenants32.md"
step warm 25 $B --methods base --beams 1 --runs 3 --json "$OUT/warm.json"
step eager 20 $B --methods base --beams 1 --runs 3 --warmup 1 --compile no --json "$OUT/eager.json"
step mix32 45 $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 \
  --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md"
step prompt_aware 50 $B --methods base,para,pedro,parade,iapt --beams 1 --runs 5 \
  --json "$OUT/prompt_aware.json" --markdown "$OUT/prompt_aware.md"
step tenants8 60 $B --batch 8 --tenants 4 --methods lora,para --beams 1 --runs 3 --compare-hf \
  --json "$OUT/tenants8.json" --markdown "$OUT/tenants8.md"
cat "$OUT/steps.txt"
