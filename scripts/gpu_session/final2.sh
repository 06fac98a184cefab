# Issue 13, second call of 2026-11-26 (nvidia-h100-x2): the rows with the per-layer
# adapter inputs and static marks made once. GPU 0: base and LoRA at beams 1 and 3 with HF's
# generate() in turns. GPU 1: IAPT against base at beam 1, then 16 LoRA and 16 PARA tenants in a
# batch of 32 against base batch 32. Everything stops by ${DEADLINE:-560} s.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
D=${DEADLINE:-560}
( export CUDA_VISIBLE_DEVICES=0
  step single $((D - 5)) $B --methods base,lora --beams 1,3 --runs 5 --compare-hf --json "$OUT/single.json" --markdown "$OUT/single.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step iapt 200 $B --methods base,iapt --beams 1 --runs 5 --json "$OUT/iapt.json" --markdown "$OUT/iapt.md"
  step tenants32 $((D - 5 - SECONDS)) $B --batch 32 --tenants 16 --methods lora,para --beams 1 --runs 3 --json "$OUT/tenants32.json" --markdown "$OUT/tenants32.md" ) &
wait; cat "$OUT/steps.txt"
pack
