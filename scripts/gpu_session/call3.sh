# Call 3: the engine and server tests on CUDA; the eager (uncompiled) base row.
. scripts/gpu_session/common.sh
cp .carry/gemma.gguf.part02 ~/parts/ 2>/dev/null
( export CUDA_VISIBLE_DEVICES=0
  step eager 60 $B --methods base --beams 1 --runs 3 --warmup 1 --compile no --json "$OUT/eager.json" ) &
( export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$HOME/site
  step test_engine 100 env MINIPARA_TEST_DEVICE=cuda python3 -m pytest -q -x -p no:cacheprovider tests/test_engine.py ) &
wait; cat "$OUT/steps.txt"; ls ~/parts
pack
