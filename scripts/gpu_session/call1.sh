# Call 1 (nvidia-h100-x2): issue 15's 1- vs 2-GPU training steps/s, then issue 13's single-request
# rows on GPU 0 and the prompt-aware rows on GPU 1 side by side.
# (`pack` added after the run: this call returned only 8 of its files, so single.json, its
# profile and the warm-start row were lost; call 6 re-measured the single-request rows.)
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"; python3 -c "import torch,transformers,peft;print(torch.__version__,transformers.__version__,peft.__version__)" >> "$OUT/gpus.txt" 2>&1
T="--methods para --prompt-tokens 274"
step scale1_b16 70 env CUDA_VISIBLE_DEVICES=0 $B $T --train-steps 10 --warmup 3 --train-batch 16
step scale2_b16 80 python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench.py --shape llama-2-7b --dtype bfloat16 --device cuda $T --train-steps 10 --warmup 3 --train-batch 16
step scale1_b128 70 env CUDA_VISIBLE_DEVICES=0 $B $T --train-steps 3 --warmup 1 --train-batch 128 --micro-batch 16
step scale2_b128 80 python3 -m torch.distributed.run --standalone --nproc-per-node 2 bench.py --shape llama-2-7b --dtype bfloat16 --device cuda $T --train-steps 3 --warmup 1 --train-batch 128 --micro-batch 16
left=$((${DEADLINE:-440} - SECONDS))
( export CUDA_VISIBLE_DEVICES=0
  step single $((left - 35)) $B --methods base,lora --beams 1,3 --runs 5 --compare-hf --json "$OUT/single.json" --markdown "$OUT/single.md" --profile "$OUT/single-profile.txt"
  step warm 30 $B --methods base --beams 1 --runs 3 --json "$OUT/warm.json" ) &
( export CUDA_VISIBLE_DEVICES=1
  step prompt_aware $((left - 5)) $B --methods base,para,pedro,parade,iapt --beams 1 --runs 5 --json "$OUT/prompt_aware.json" --markdown "$OUT/prompt_aware.md" ) &
cp .carry/gemma.gguf.part00 ~/parts/ 2>/dev/null
wait; cat "$OUT/steps.txt"; ls ~/parts
pack
