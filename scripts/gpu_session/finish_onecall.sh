# The fourth session's second call (nvidia-h100-x2, about 10 min): what tenants_onecall.sh's limits cut.
# GPU 0: the prompt-aware rows at batch 1, interleaved with the base, 3 runs (5 did not fit in 300 s).
# GPU 1: the one CUDA mixture test not reached (every method and mixtures, repeated requests,
#   beam 1), then the eight-method mix at batch 32 since the one-call tenants.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step inter 570 $B --methods base,para,pedro,parade,iapt --beams 1 --runs 3 --interleave --json "$OUT/inter.json" --markdown "$OUT/inter.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step tests 330 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA \
    "tests/test_fast.py::test_every_method_and_mixtures_across_repeated_requests[1]"
  step mix32 $((570 - SECONDS)) $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md" ) &
wait; cat "$OUT/steps.txt"
pack
