# Stacked-then-gathered LoRA tenants: the prefill stacks the tenants' parts (as in
# stacked_lora.sh) and gathers per-row pairs from them, so decode keeps main's per-row form.
# The last 290 s of a session's device time: the two LoRA tenant rows only, no tests.
. scripts/gpu_session/common.sh
( export CUDA_VISIBLE_DEVICES=0
  step t32 180 $B --batch 32 --tenants 16 --methods lora --beams 1 --runs 3 --json "$OUT/t32.json" --markdown "$OUT/t32.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step t8 180 $B --batch 8 --tenants 4 --methods lora --beams 1 --runs 3 --json "$OUT/t8.json" --markdown "$OUT/t8.md" ) &
wait; cat "$OUT/steps.txt"
