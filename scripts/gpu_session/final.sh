# Issue 13, the last call of 2026-11-25 (nvidia-h100-x2): the single-request rows with the
# library's new defaults (coordinate-descent tuning, compiled prefill, LoRA's x.A folded, beam
# search's bookkeeping inside the captured step) on GPU 0; the compiled-path tests on CUDA, a
# warm start, and LoRA without the fold on GPU 1. Everything stops by ${DEADLINE:-440} s.
. scripts/gpu_session/common.sh
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpus.txt"
D=${DEADLINE:-440}
( export CUDA_VISIBLE_DEVICES=0
  step single $((D - 5)) $B --methods base,lora --beams 1,3 --runs 5 --json "$OUT/single.json" --markdown "$OUT/single.md" ) &
( export CUDA_VISIBLE_DEVICES=1
  T=tests/test_fast.py
  step tests 240 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q $T::test_captured_beam_search_equals_eager_and_replays_one_graph \
    $T::test_lora_folded_into_the_base_product_generates_as_eager "$T::test_every_method_and_mixtures_across_repeated_requests[1]"
  step warm 40 $B --methods base --beams 1 --runs 3 --json "$OUT/warm.json"
  step nofold $((D - 5 - SECONDS)) python3 scripts/probes/gpu_decode.py lora/b1/f0,base/b1/f1 --runs 5 ) &
wait; cat "$OUT/steps.txt"
pack
