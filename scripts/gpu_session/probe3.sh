# Issue 13 probe 3 (nvidia-h100-x2), 2026-11-25 late: LoRA with x.A folded into the base product
# or not, against the base, on GPU 0; the compiled-path tests on CUDA, then the mixed-methods
# batch-32 row, on GPU 1. Everything stops by ${DEADLINE:-330} s.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
D=${DEADLINE:-330}
( export CUDA_VISIBLE_DEVICES=0
  step fold $((D - 5)) python3 scripts/probes/gpu_decode.py base/b1/f1,lora/b1/f1,lora/b1/f0 --runs 5 ) &
( export CUDA_VISIBLE_DEVICES=1
  step tests 200 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -x tests/test_fast.py
  step mix32 $((D - 5 - SECONDS)) $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 \
    --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md" ) &
wait; cat "$OUT/steps.txt"
pack
