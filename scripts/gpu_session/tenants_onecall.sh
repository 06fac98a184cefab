# The call run first in the fourth session of 2026-11-26 at a597cc4 (nvidia-h100-x2, 2x H200, about 10 min; the tests and inter steps hit their limits):
# What it measures was changed after the third session of 2026-11-26 had spent its device time:
# a mixture's LoRA pairs stacked at prefill and gathered per row (5caa122), PARA-family tenants
# of one config in one generator call (03fbef9: 38 ops a layer at prefill for 16 tenants in bf16, from
# 387; IAPT tenants likewise since ccce431).
# GPU 0: 16 LoRA and 16 PARA tenants at batch 32, then 4 of each at batch 8, each batch's rows
#   interleaved with its base (runs in turns: the one-process spread of 0.94-1.07 between
#   identical decode graphs is what single-row ratios could not settle).
# GPU 1: the CUDA mixture tests, then the prompt-aware rows at batch 1, interleaved.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step t32 330 $B --batch 32 --tenants 16 --methods lora,para --beams 1 --runs 3 --interleave --json "$OUT/t32.json" --markdown "$OUT/t32.md"
  step t8 $((580 - SECONDS)) $B --batch 8 --tenants 4 --methods lora,para --beams 1 --runs 3 --interleave --json "$OUT/t8.json" --markdown "$OUT/t8.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step tests 280 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA tests/test_mixture.py \
    "tests/test_fast.py::test_a_mixtures_compiled_prefill_equals_eager_and_does_not_grow_with_its_tenants" \
    "tests/test_fast.py::test_every_method_and_mixtures_across_repeated_requests[1]"
  step inter $((580 - SECONDS)) $B --methods base,para,pedro,parade,iapt --beams 1 --runs 5 --interleave --json "$OUT/inter.json" --markdown "$OUT/inter.md" ) &
wait; cat "$OUT/steps.txt"
pack
