# issue 13: where the LoRA prefill's low-rank products go (scripts/probes/lora_prefill.py), four lanes
# of one nvidia-h100-x4 call: tenants' per-row pairs at batch 8 and 32, one shared pair at batch 1
# (kernel tables of each variant for batch 8 and 1), and eager runs of both.
. scripts/gpu_session/common.sh
P="env PYTHONPATH=. python3 scripts/probes/lora_prefill.py"
( export CUDA_VISIBLE_DEVICES=0; step rows8 280 $P --batch 8 --per-row --profile ) &
( export CUDA_VISIBLE_DEVICES=1; step rows32 280 $P --batch 32 --per-row ) &
( export CUDA_VISIBLE_DEVICES=2; step one1 280 $P --batch 1 --profile ) &
( export CUDA_VISIBLE_DEVICES=3; step eager 280 sh -c "$P --batch 8 --per-row --eager; $P --batch 1 --eager" ) &
wait; cat "$OUT/steps.txt"; for f in rows8 rows32 one1 eager; do echo "== $f"; grep -v "^#\|^ \|^-\|^W11\|^$" "$OUT/$f.log"; done
