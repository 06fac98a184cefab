# Call 2: issue 13's many-tenant rows and profile on GPU 0; issue 14's load figures on GPU 1.
. scripts/gpu_session/common.sh
cp .carry/gemma.gguf.part01 ~/parts/ 2>/dev/null
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target ~/site .whl/*.whl > "$OUT/pip.log" 2>&1
L=${DEADLINE:-440}
( export CUDA_VISIBLE_DEVICES=0
  step tenants8 170 $B --batch 8 --tenants 4 --methods base,lora,para --beams 1 --runs 3 --compare-hf --json "$OUT/tenants8.json" --markdown "$OUT/tenants8.md"
  step tenants32 $((L - SECONDS - 100)) $B --batch 32 --tenants 16 --methods base,lora,para --beams 1 --runs 3 --json "$OUT/tenants32.json" --markdown "$OUT/tenants32.md"
  step mix32 $((L - SECONDS - 5)) $B --batch 32 --tenants 16 --mix --methods para,pedro,parade,iapt,lora,ia3,bitfit,ptuning_v2 --beams 1 --runs 3 --json "$OUT/mix32.json" --markdown "$OUT/mix32.md" ) &
( export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$HOME/site
  step loadgen $((L - 5)) python3 -m minipara.bench.loadgen --shape llama-2-7b --dtype bfloat16 --device cuda --requests 3 --out "$OUT/load.jsonl" ) &
wait; cat "$OUT/steps.txt"; ls ~/parts
pack
