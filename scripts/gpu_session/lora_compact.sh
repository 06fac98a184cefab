# The fourth session's third call (nvidia-h100-x2, about 10 min): LoRA pairs in the compact layout
# of LayerState.lora: A (r * n, in) as PEFT's lora_A, each part's B in its own columns only (the
# tenant rows' two 15 us reductions a layer read block-diagonal B's, two thirds zeros for q|k|v).
# GPU 0: 16 LoRA tenants at batch 32 with kernel tables (against 5caa122's in
#   results/probes/gpu-tenants-2026-11-26.txt), then 4 at batch 8 and one LoRA at batch 1,
#   these two interleaved with their base.
# GPU 1: the CUDA mixture tests and every method's compiled decode against eager, beams 1 and 3.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step t32 200 $B --batch 32 --tenants 16 --methods lora --beams 1 --runs 3 --profile "$OUT/t32-profile.txt" --json "$OUT/t32.json" --markdown "$OUT/t32.md"
  step t8 170 $B --batch 8 --tenants 4 --methods lora --beams 1 --runs 3 --interleave --json "$OUT/t8.json" --markdown "$OUT/t8.md"
  step b1 $((550 - SECONDS)) $B --methods base,lora --beams 1 --runs 3 --interleave --json "$OUT/b1.json" --markdown "$OUT/b1.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step tests 550 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA tests/test_mixture.py \
    "tests/test_fast.py::test_every_method_and_mixtures_across_repeated_requests[1]" \
    "tests/test_fast.py::test_every_method_and_mixtures_across_repeated_requests[3]" ) &
wait; cat "$OUT/steps.txt"
pack
