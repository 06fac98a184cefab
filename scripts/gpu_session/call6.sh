# Call 6 (the budget's last minutes, compiler caches warm from calls 1-2): the single-request
# rows again (call 1's files did not come back: too many), batch-32 PARA and batch-8 rows.
. scripts/gpu_session/common.sh
( export CUDA_VISIBLE_DEVICES=0; step single 190 $B --methods base,lora --beams 1,3 --runs 5 --compare-hf --json "$OUT/single.json" --markdown "$OUT/single.md" ) &
( export CUDA_VISIBLE_DEVICES=1; step t32para 95 $B --batch 32 --tenants 16 --methods para --beams 1 --runs 3 --json "$OUT/t32para.json"
  step t8 90 $B --batch 8 --tenants 4 --methods lora,para --beams 1 --runs 3 --json "$OUT/t8.json" ) &
wait; pack
