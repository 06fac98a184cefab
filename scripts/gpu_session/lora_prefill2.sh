# issue 13, after the LoRA prefill's products became padded GEMMs that add into y (layer_state.add_lora):
# one nvidia-h100-x4 call. GPU 0: the probe at batch 8 and 1 (old and new side by side), then one
# LoRA adapter against its base at beam 1; GPU 1: 4 LoRA tenants in a batch of 8 (interleaved with
# their base), then beam 3; GPU 2: 16 in a batch of 32, the eight-method mix, and the CUDA tests of
# the mixture, the compiled paths and the baselines; GPU 3: the probe at batch 32 and eager, then
# the kernel tables of one base and one LoRA generation (where LoRA's decode step goes).
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
P="env PYTHONPATH=. python3 scripts/probes/lora_prefill.py"
( export CUDA_VISIBLE_DEVICES=0
  step probe8 100 $P --batch 8 --per-row
  step probe1 100 $P --batch 1
  step b1 $((575 - SECONDS)) $B --methods base,lora --beams 1 --runs 3 --interleave --json "$OUT/b1.json" --markdown "$OUT/b1.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  step t8 300 $B --batch 8 --tenants 4 --methods lora --beams 1 --runs 3 --interleave --json "$OUT/t8.json" --markdown "$OUT/t8.md"
  step b3 $((575 - SECONDS)) $B --methods base,lora --beams 3 --runs 3 --interleave --json "$OUT/b3.json" --markdown "$OUT/b3.md" ) &
( export CUDA_VISIBLE_DEVICES=2
  step t32 300 $B --batch 32 --tenants 16 --methods lora --beams 1 --runs 3 --interleave --json "$OUT/t32.json" --markdown "$OUT/t32.md"
  step mix32 250 $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md"
  step tests $((575 - SECONDS)) env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -rA tests/test_mixture.py tests/test_fast.py tests/test_baselines.py ) &
( export CUDA_VISIBLE_DEVICES=3
  step probe32 100 $P --batch 32 --per-row
  step eager 100 sh -c "$P --batch 8 --per-row --eager; $P --batch 1 --eager"
  step b1prof $((575 - SECONDS)) $B --methods base,lora --beams 1 --runs 1 --profile "$OUT/b1-profile.txt" --json "$OUT/b1prof.json" ) &
wait; cat "$OUT/steps.txt"
for f in probe8 probe1 probe32 eager; do echo "== $f"; grep "us: " "$OUT/$f.log"; done
for f in b1 t8 t32 b3 mix32; do grep "^| [bl]" "$OUT/$f.md"; done; tail -3 "$OUT/tests.log"
pack
