# Where 16 LoRA tenants' extra decode time goes (batch 32: 0.76 of the base, target 0.88), and
# 4 tenants' at batch 8: bench.py's kernel tables of the base row and the LoRA-tenants row.
. scripts/gpu_session/common.sh
( export CUDA_VISIBLE_DEVICES=0
  step t32 400 $B --batch 32 --tenants 16 --methods lora --beams 1 --runs 3 --profile "$OUT/prof32.txt" --json "$OUT/t32.json" ) &
( export CUDA_VISIBLE_DEVICES=1
  step t8 400 $B --batch 8 --tenants 4 --methods lora --beams 1 --runs 3 --profile "$OUT/prof8.txt" --json "$OUT/t8.json" ) &
wait; cat "$OUT/steps.txt"
pack
