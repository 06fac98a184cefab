# issue 13: the kernel tables of a batch-8 prefill with 4 LoRA tenants after e806ce0 (and one step):
# does the prefill still run sm80 fallback GEMMs? (the last 188 s of the session's device time)
. scripts/gpu_session/common.sh
step t8prof 120 $B --batch 8 --tenants 4 --methods lora --beams 1 --new-tokens 2 --runs 1 --profile "$OUT/t8-prefill-profile.txt" --json "$OUT/t8prof.json"
cat "$OUT/steps.txt"; pack
