# Issue 13, first call of 2026-11-26 (nvidia-h100-x2), after each layer's adapter states became
# graph inputs of their own (fast.py layer_views: the layers share kernels). GPU 0: LoRA's
# decode step in the probe's variants (untuned; no unrolled rank reduction, u1; (x.A).B through
# cuBLAS, bmm; tuned), with kernel tables. GPU 1: the prompt-aware methods' beam-1 rows against
# base, then base and LoRA at beam 3 with kernel tables. Everything stops by ${DEADLINE:-560} s.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
D=${DEADLINE:-560}
P="python3 scripts/probes/gpu_decode.py"
( export CUDA_VISIBLE_DEVICES=0
  step lora $((D - 5)) $P base/b1/new,lora/b1/new,lora/b1/new+u1,lora/b1/new+bmm,lora/b1/new+tune+u1,lora/b1/new+tune \
    --runs 5 --profile "$OUT/profile-gpu0.txt" ) &
( export CUDA_VISIBLE_DEVICES=1
  step prompt_aware 400 $B --methods base,para,pedro,parade,iapt --beams 1 --runs 5 --json "$OUT/prompt-aware.json" --markdown "$OUT/prompt-aware.md"
  step beam3 $((D - 5 - SECONDS)) $P base/b3/new,lora/b3/new+u1 --runs 5 --profile "$OUT/profile-gpu1.txt" ) &
wait; cat "$OUT/steps.txt"
pack
