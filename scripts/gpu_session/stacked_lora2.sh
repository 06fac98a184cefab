# Ran at b5a0ce7: 16 tenants at batch 32 fell to 0.26 of the base (decode 0.15: x.A as a sum
# over a shared A is slow at 32 rows); the form was dropped.
# The stacked LoRA tenants with x.A as a sum at decode (fused with the gate), after
# stacked_lora.sh found the split-K GEMMs and the gate's multiplies as slow as the per-row form.
# One nvidia-h100-x2 call, about 7 min: the tenant rows (kernel tables at batch 32), the eight-
# method mix, and the CUDA mixture tests.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step t32 200 $B --batch 32 --tenants 16 --methods lora --beams 1 --runs 3 --profile "$OUT/prof32.txt" --json "$OUT/t32.json" --markdown "$OUT/t32.md"
  step tests $((430 - SECONDS)) env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA tests/test_mixture.py \
    "tests/test_fast.py::test_a_mixtures_compiled_prefill_equals_eager_and_does_not_grow_with_its_tenants" \
    "tests/test_fast.py::test_every_method_and_mixtures_across_repeated_requests[1]" ) &
( export CUDA_VISIBLE_DEVICES=1
  step t8 200 $B --batch 8 --tenants 4 --methods lora --beams 1 --runs 3 --json "$OUT/t8.json" --markdown "$OUT/t8.md"
  step mix32 $((430 - SECONDS)) $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md" ) &
wait; cat "$OUT/steps.txt"
pack
