# Ran at 0c43abe (third session of 2026-11-26; written as next.sh): one nvidia-h100-x2 call, 5.4 min.
# GPU 0: IAPT against the base in one process with kernel tables (IAPT's 0.94 of 2026-11-26 was
#   never profiled), then the eight-method mixed batch, not re-measured since a mixture's prefill
#   is compiled (9021477).
# GPU 1: the rest of tests/test_fast.py on CUDA (the mixture tests passed at 4f7398a), then the
#   base beam-1 row again (on H100 last measured on 2026-11-25: 181-186 tok/s).
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step iapt 240 python3 scripts/probes/gpu_decode.py base/b1/new,iapt/b1/new --runs 5 --profile "$OUT/profile.txt"
  step mix32 $((530 - SECONDS)) $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step tests 300 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA tests/test_fast.py -k "not mixture"
  step base $((530 - SECONDS)) $B --methods base --beams 1 --runs 5 --json "$OUT/base.json" --markdown "$OUT/base.md" ) &
wait; cat "$OUT/steps.txt"
pack
