# The next GPU call for issue 13 (not yet run): one nvidia-h100-x4 call (a machine of several
# chips counts its held time once, like the x2), about 10 min (timeout_s 600); four lanes.
# What is unmeasured since e298df8 (compact LoRA pairs), e10ee1f (LoRA tenants' pairs
# gathered for all layers at once at prefill, 51 ops for 16 tenants instead of 41 a layer) and
# f1a6619 (one LoRA adapter's states likewise, 37 ops instead of 37 a layer):
# the single adapter (0.79 at beam 1, 0.86 at beam 3, 96afb9c), the LoRA tenant rows
# interleaved with their base (0.87 at batch 32, 0.86 at batch 8 with a first token of 63
# against 46 ms), the eight-method mix (0.76 before e298df8), and where the LoRA tenants'
# first token goes (kernel tables of a prefill and one step: --new-tokens 2); and the CUDA
# mixture tests since e10ee1f.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
( export CUDA_VISIBLE_DEVICES=0
  step b1 300 $B --methods base,lora --beams 1 --runs 3 --interleave --json "$OUT/b1.json" --markdown "$OUT/b1.md"
  step b3 $((575 - SECONDS)) $B --methods base,lora --beams 3 --runs 3 --interleave --json "$OUT/b3.json" --markdown "$OUT/b3.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step t32 260 $B --batch 32 --tenants 16 --methods lora --beams 1 --runs 3 --interleave --json "$OUT/t32.json" --markdown "$OUT/t32.md"
  step mix32 $((575 - SECONDS)) $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md" ) &
( export CUDA_VISIBLE_DEVICES=2
  step t8 260 $B --batch 8 --tenants 4 --methods lora --beams 1 --runs 3 --interleave --json "$OUT/t8.json" --markdown "$OUT/t8.md"
  step t8prof $((575 - SECONDS)) $B --batch 8 --tenants 4 --methods lora --beams 1 --new-tokens 2 --runs 1 --profile "$OUT/t8-prefill-profile.txt" --json "$OUT/t8prof.json" ) &
( export CUDA_VISIBLE_DEVICES=3
  step t32prof 300 $B --batch 32 --tenants 16 --methods lora --beams 1 --new-tokens 2 --runs 1 --profile "$OUT/t32-prefill-profile.txt" --json "$OUT/t32prof.json"
  step tests $((575 - SECONDS)) env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA tests/test_mixture.py ) &
wait; cat "$OUT/steps.txt"
pack
