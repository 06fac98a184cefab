# Call 5: assemble and convert the default model, then issue 11's training runs on both GPUs.
. scripts/gpu_session/common.sh
cp .carry/gemma.gguf.part04 ~/parts/ 2>/dev/null
cat ~/parts/gemma.gguf.part0* > ~/model.gguf; md5sum ~/model.gguf > "$OUT/md5.txt"
python3 -m pip install -q --no-index --no-deps --target ~/site .carry/whl/*.whl > "$OUT/pip5.log" 2>&1
export PYTHONPATH=$HOME/site MINIPARA_WEIGHTS_DIR=$HOME/w
python3 -c "from pathlib import Path; from minipara.io.weights import convert, MARKER; d=Path.home()/'w'/'gemma-3-270m'; d.mkdir(parents=True,exist_ok=True); convert(Path.home()/'model.gguf', d); (d/MARKER).write_text('x')" > "$OUT/convert.log" 2>&1 || { cat "$OUT/convert.log"; exit 1; }
L=${DEADLINE:-520}
R() {  # the results command, stopped (runs checkpointed) so that all end by about L - 15 s
  local t=$((L - SECONDS - 45)); ((t > 0)) || return 0
  timeout -k 30 $t python3 -m minipara.train.results --dir results "$@"; }
S="-- --device cuda --max-steps 150 --eval-every 50 --max-eval 200 --max-test 0 --micro-batch 64"
LR=ia3=3e-3,ptuning_v2=1e-2,parade=1e-3
# First the runs that complete 3 seeds everywhere (PARADE at lr 1e-3, see README), then seeds
# 3 and 4 of SST-2 while time is left (a run cut by the deadline keeps its checkpoint).
( export CUDA_VISIBLE_DEVICES=0
  R --task sst2 --methods para,pedro,ia3 --seeds 0,1,2 --lr-for $LR --parallel 6 $S > "$OUT/r0.log" 2>&1
  R --task sst2 --methods lora,bitfit,ia3,ptuning_v2 --seeds 3,4 --lr-for $LR --parallel 8 $S > "$OUT/r0b.log" 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  R --task sst2 --methods parade --seeds 0,1,2 --lr-for $LR --parallel 3 $S > "$OUT/r1.log" 2>&1 &
  R --task rte --methods ptuning_v2 --seeds 0,1,2 --lr-for $LR --parallel 3 $S > "$OUT/r2.log" 2>&1 &
  R --task copa --methods lora --seeds 0 --lr-for $LR -- --device cuda > "$OUT/r3.log" 2>&1; wait
  R --task sst2 --methods para,pedro,parade,iapt --seeds 3,4 --lr-for $LR --parallel 8 $S > "$OUT/r1b.log" 2>&1 ) &
wait
mkdir -p "$OUT/results"; cp -r results/* "$OUT/results/"; rm -f "$OUT"/results/*/*.safetensors "$OUT"/results/*/*.ckpt
ls "$OUT/results/sst2" | grep -c report
pack
