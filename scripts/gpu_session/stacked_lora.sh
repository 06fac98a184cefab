# Ran at f5f2291: 16 tenants 0.85 of the base at batch 32 (decode 0.78, first token 205 ms), 4
# tenants 0.78 at batch 8 (decode 0.76); the compiled-prefill kernel-count test failed on CUDA
# (37 against 34 kernels). The form it measured was replaced (5caa122).
# A mixture's LoRA tenants side by side (one shared pair and a per-row gate) instead of
# per-row pairs: the tenant rows again, with kernel tables for batch 32, and the CUDA mixture
# tests. One nvidia-h100-x2 call, about 8 min.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step t32 300 $B --batch 32 --tenants 16 --methods lora,para --beams 1 --runs 3 --profile "$OUT/prof32.txt" --json "$OUT/t32.json" --markdown "$OUT/t32.md"
  step mix32 $((500 - SECONDS)) $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step tests 300 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA tests/test_mixture.py \
    "tests/test_fast.py::test_a_mixtures_compiled_prefill_equals_eager_and_does_not_grow_with_its_tenants" \
    "tests/test_fast.py::test_every_method_and_mixtures_across_repeated_requests[1]"
  step t8 $((500 - SECONDS)) $B --batch 8 --tenants 4 --methods lora,para --beams 1 --runs 3 --json "$OUT/t8.json" --markdown "$OUT/t8.md" ) &
wait; cat "$OUT/steps.txt"
pack
