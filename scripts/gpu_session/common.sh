# Sourced by every GPU call: environment, wheels for the server, a per-step timer.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCHINDUCTOR_CACHE_DIR=$HOME/inductor PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# The device gets the working tree without .git: write the commit first, here,
#   git rev-parse --short HEAD > scripts/gpu_session/COMMIT
export MINIPARA_COMMIT=$(cat scripts/gpu_session/COMMIT 2>/dev/null || git rev-parse --short HEAD 2>/dev/null || echo unknown)
mkdir -p "$OUT" ~/parts
B="python3 bench.py --shape llama-2-7b --dtype bfloat16 --device cuda"
step() {  # step NAME SECONDS COMMAND... (log in $OUT/NAME.log, how it ended in $OUT/steps.txt)
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s (limit $limit)" | tee -a "$OUT/steps.txt"
}
pack() {  # the device returns only a handful of files per call: one archive of everything
  (cd "$OUT" && tar czf /tmp/all.tgz . && rm -rf "$OUT"/* && mv /tmp/all.tgz "$OUT"/)
}
