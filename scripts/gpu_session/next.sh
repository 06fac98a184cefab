# The next GPU call for issue 13 (not yet run): one nvidia-h100-x2 call, about 10 min (timeout_s 600).
# What e298df8's compact LoRA pairs were not measured on: the single adapter (0.79 at beam 1,
# 0.86 at beam 3, 96afb9c), 16 LoRA tenants interleaved with their base (0.87 not interleaved),
# and the eight-method mix (0.76 before e298df8).
# GPU 0: one LoRA at beams 1 and 3, each interleaved with its base.
# GPU 1: 16 LoRA tenants at batch 32, interleaved, then the eight-method mix.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step b1 300 $B --methods base,lora --beams 1 --runs 3 --interleave --json "$OUT/b1.json" --markdown "$OUT/b1.md"
  step b3 $((575 - SECONDS)) $B --methods base,lora --beams 3 --runs 3 --interleave --json "$OUT/b3.json" --markdown "$OUT/b3.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step t32 260 $B --batch 32 --tenants 16 --methods lora --beams 1 --runs 3 --interleave --json "$OUT/t32.json" --markdown "$OUT/t32.md"
  step mix32 $((575 - SECONDS)) $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md" ) &
wait; cat "$OUT/steps.txt"
pack
