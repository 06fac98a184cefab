# Branch mixture-prefill-compiled: its CUDA tests (mixture_prefill.sh gave them 200 s, too few).
# One nvidia-h100-x2 call (about 7 min). GPU 0: the mixture prefill test, then every method and
# mixtures at beam 1; GPU 1: the same at beam 3, then the rest of test_fast.py in what time is left.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
T="env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA tests/test_fast.py"
( export CUDA_VISIBLE_DEVICES=0
  step prefill 420 $T -k "mixtures_compiled_prefill or mixtures_across_repeated_requests and 1" ) &
( export CUDA_VISIBLE_DEVICES=1
  step beam3 300 $T -k "mixtures_across_repeated_requests and 3"
  step rest $((420 - SECONDS)) $T -k "not mixture" ) &
wait; cat "$OUT/steps.txt"
pack
