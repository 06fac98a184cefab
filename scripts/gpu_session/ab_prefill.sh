# issue 13: the LoRA prefill's padded GEMMs (e806ce0) against the products before them (bdd097c's
# layer_state.py), on the same GPU one after the other, the order swapped between GPUs (one
# nvidia-h100-x4 call): GPUs 0/1 16 tenants in a batch of 32, GPUs 2/3 4 in a batch of 8.
# The device gets no .git: write the old file first, and carry it (ignored, like COMMIT):
#   git show bdd097c:minipara/layer_state.py > scripts/gpu_session/old_layer_state.py
# Result (results/probes/lora-prefill-2026-11-26.txt): no difference; e806ce0 was given back.
. scripts/gpu_session/common.sh
old=/tmp/old; mkdir -p $old && cp -r bench.py minipara $old/ && cp scripts/gpu_session/old_layer_state.py $old/minipara/layer_state.py
run() {  # run GPU NAME DIR ARGS...
  local gpu=$1 name=$2-g$1 dir=$3; shift 3
  (cd "$dir" && CUDA_VISIBLE_DEVICES=$gpu step "$name" 200 $B "$@" --beams 1 --runs 3 --interleave --json "$OUT/$name.json" --markdown "$OUT/$name.md")
}
T32="--batch 32 --tenants 16 --methods lora"; T8="--batch 8 --tenants 4 --methods lora"
( run 0 t32-old $old $T32; run 0 t32-new $PWD $T32 ) &
( run 1 t32-new $PWD $T32; run 1 t32-old $old $T32 ) &
( run 2 t8-old $old $T8; run 2 t8-new $PWD $T8 ) &
( run 3 t8-new $PWD $T8; run 3 t8-old $old $T8 ) &
wait; cat "$OUT/steps.txt"; for f in "$OUT"/*.md; do echo "== $f"; grep "^| [bl]" "$f"; done
