# The next GPU call for issue 13 (not yet run): one nvidia-h100-x2 call, about 8 min.
# GPU 0: 16 LoRA tenants at batch 32 with the merged mixture form (5caa122: pairs stacked at
#   prefill, gathered per row), then the prompt-aware rows with --interleave (rows in turns within
#   each run: the one-process spread of 0.94-1.07 between identical decode graphs is what the
#   single-row ratios could not settle; the tenant rows interleaved too).
# GPU 1: the CUDA mixture tests for the merged form, then 4 LoRA tenants at batch 8 again.
# Since written: PARA-family tenants of one config run as one generator call (16 PARA tenants:
#   34 ops a layer at prefill, from 328): the tenant rows now include 16 PARA tenants (target 0.95).
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step t32 240 $B --batch 32 --tenants 16 --methods lora,para --beams 1 --runs 3 --interleave --json "$OUT/t32.json" --markdown "$OUT/t32.md"
  step inter $((480 - SECONDS)) $B --methods base,para,pedro,parade,iapt --beams 1 --runs 5 --interleave --json "$OUT/inter.json" --markdown "$OUT/inter.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step tests 300 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA tests/test_mixture.py \
    "tests/test_fast.py::test_a_mixtures_compiled_prefill_equals_eager_and_does_not_grow_with_its_tenants" \
    "tests/test_fast.py::test_every_method_and_mixtures_across_repeated_requests"
  step t8 $((480 - SECONDS)) $B --batch 8 --tenants 4 --methods lora,para --beams 1 --runs 3 --interleave --json "$OUT/t8.json" --markdown "$OUT/t8.md" ) &
wait; cat "$OUT/steps.txt"
pack
