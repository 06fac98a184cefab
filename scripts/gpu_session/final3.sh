# Issue 13, third call of 2026-11-26 (nvidia-h100-x2), after a mixture's prefill stopped being
# compiled (the second call's 16-tenant LoRA row was still compiling after 6 minutes).
# GPU 0: 16 LoRA and 16 PARA tenants in a batch of 32 against base batch 32. GPU 1: 4 tenants in a
# batch of 8, then the mixed-methods batch of 32. Everything stops by ${DEADLINE:-480} s.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
D=${DEADLINE:-480}
( export CUDA_VISIBLE_DEVICES=0
  step tenants32 $((D - 5)) $B --batch 32 --tenants 16 --methods lora,para --beams 1 --runs 3 --json "$OUT/tenants32.json" --markdown "$OUT/tenants32.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step tenants8 270 $B --batch 8 --tenants 4 --methods lora,para --beams 1 --runs 3 --json "$OUT/tenants8.json" --markdown "$OUT/tenants8.md"
  step mix32 $((D - 5 - SECONDS)) $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md" ) &
wait; cat "$OUT/steps.txt"
pack
