# Issue 13 probe (nvidia-h100-x2), 2026-11-25 late: GEMV micro-benchmark and the decode-step
# variants on GPU 0, the LoRA and prefill variants on GPU 1, kernel tables of base and LoRA.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
P="python3 scripts/probes/gpu_decode.py"
( export CUDA_VISIBLE_DEVICES=0
  step decode 540 $P base,cdt,attn_math,redlin,redlin_cdt --gemv "$OUT/gemv.json" --profile "$OUT/profile-base.txt" ) &
( export CUDA_VISIBLE_DEVICES=1
  step lora 540 $P lora,lora_split,lora_mm,prefill_c --profile "$OUT/profile-lora.txt" ) &
wait; cat "$OUT/steps.txt"
pack
