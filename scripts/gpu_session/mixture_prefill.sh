# Branch mixture-prefill-compiled (not on main): a mixture's prefill compiled with its generators
# run eagerly (mixture.py), against main's rule (a mixture's prefill recorded uncompiled).
# Measure on one nvidia-h100-x2 call (about 8 min): the tenants rows of 2026-11-26's call 3
# (results/bench/2026-11-26/gpu-tenants*.json) on this branch; merge if the first tokens of
# the tenant rows fall and the CUDA tests pass.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step tenants32 400 $B --batch 32 --tenants 16 --methods lora,para --beams 1 --runs 3 --json "$OUT/tenants32.json" --markdown "$OUT/tenants32.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step tests 200 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q tests/test_fast.py -k "mixture"
  step tenants8 250 $B --batch 8 --tenants 4 --methods lora,para --beams 1 --runs 3 --json "$OUT/tenants8.json" --markdown "$OUT/tenants8.md" ) &
wait; cat "$OUT/steps.txt"
pack
