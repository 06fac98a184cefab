# Issue 13 probe 2 (nvidia-h100-x2), 2026-11-25 late: the library's new decode options against the
# old ones on GPU 0 (base beams 1/3, LoRA beam 1), the compiled-path tests on CUDA, then LoRA beam 3,
# on GPU 1.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
P="python3 scripts/probes/gpu_decode.py"
( export CUDA_VISIBLE_DEVICES=0
  step decode 540 $P base/b1/rold,base/b1/r1,base/b3/r1,base/b3/r4,lora/b1/r1 --gemv "$OUT/gemv.json" --profile "$OUT/profile.txt" ) &
( export CUDA_VISIBLE_DEVICES=1
  step tests 300 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -x tests/test_fast.py
  step lora3 $((540 - SECONDS)) $P lora/b3/r1,lora/b3/r4 ) &
wait; cat "$OUT/steps.txt"
pack
