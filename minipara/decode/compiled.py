"""Fast decoding: the one-token step captured with torch.compile, and on CUDA the prefill
(generators included) compiled and recorded as a CUDA graph.

Everything the step reads has a fixed address from request to request (the model's
weights, the cache's buffers, and the adapter states packed into the cache), so a
CUDA graph recorded once is replayed for every token. Adapter states enter as plain
tensors: PARA's vectors become one multiply that the compiler fuses into the
neighbouring kernels, LoRA a pair of small matmuls.

On CUDA the compiler tunes its kernels by coordinate descent, under which it also makes a
one-row product a reduction of its own (fused with the input's norm) instead of a cuBLAS
GEMV: on an H100 the 7B's decode step goes from 5.6 to 5.2 ms of GPU time
(docs/benchmarks.md; the probe, scripts/probes/gpu_decode.py, is in git history).

The prefill runs once per request but launches a few thousand small kernels (norms,
RoPE, and each layer's generator): eagerly, a batch-1 prefill of a 7B model is
bound by the CPU launching them. A request shape seen a second time (same cache,
adapter and prompt shape) is compiled (which fuses the element-wise work: 13.2 -> 8.4 ms
for the 7B's 274-token prefill on an H100), recorded once and then replayed as one graph
launch; a mixture of tenants' generators run eagerly inside it (mixture.py).
"""

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from minipara.model.cache import reorder_packed
from minipara.model.layer_state import LayerState

# LoRA's steps compile without coordinate-descent tuning (see compile_decoder); the probe
# (scripts/probes/gpu_decode.py, in git history) set this to measure them tuned.
TUNE_LORA_STEPS = False
# A captured beam step moves this many slots after the shared prompt (bucketed statically,
# so one graph serves every step and prompt length); longer generations reorder eagerly.
BEAM_WINDOW = 64


def compile_decoder(decoder, mode: str | None = None, graph_prefill: bool | None = None):
    """Replace `decoder.step` with a compiled step (default: on CUDA, reduce-overhead, which
    records CUDA graphs, with coordinate-descent tuning of the generated kernels except for
    LoRA's steps; plain inductor on CPU), and on CUDA `decoder.run_prefill` with compiled,
    recorded graphs (`graph_prefill`). Numerics match the eager path to float rounding: the
    compiler may fuse and reorder the arithmetic."""
    persistent_caches()
    model = decoder.model
    n_layers = model.args.n_layers
    cuda = model.tok_embeddings.weight.is_cuda
    tuned = plain = {"mode": mode} if mode is not None else {}
    if mode is None and cuda:
        # reduce-overhead's option, plus the tuning under which one-row products become fast
        # generated reductions (gpt-fast sets it too). LoRA's steps compile untuned: tuned, the
        # step ran slower (176.1 against 181.3 tok/s on an H200: its x.A reads split the tuned
        # fusions) and compiled for 123 s against 87-122 s
        # (results/probes/gpu-decode-2026-11-26.txt, in git history); with x.A folded into the
        # base product, tuned, at 103.5 against 175.4 (the -lorafold.txt log beside it).
        plain = {"mode": "reduce-overhead"}
        tuned = {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
    if graph_prefill is None:
        graph_prefill = cuda
    # One graph per (cache, method structure): allow more than the default handful.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def raw_step(cache, tokens, keys, bufs):
        states = [None] * n_layers
        if keys:
            states = [LayerState.from_tensors(dict(zip(keys, layer))) for layer in bufs]
        return model.step(tokens[:, None], cache, states=states)[:, -1]

    def raw_beam_step(cache, since, beams, keys, bufs):
        # Beam search's whole step in one graph: the search's bookkeeping (Beams.update) and
        # the cache's reorder, one gather and scatter per buffer over a fixed-width window of
        # slots from `since` (a tensor; slots past the end clamp to the last one), instead of
        # ~30 + ~150 small kernels launched eagerly between replays.
        window = (since + torch.arange(BEAM_WINDOW, device=since.device)).clamp(max=cache.max_len - 1)
        cache.reorder_slots(beams.rows, window)
        reorder_packed([t[None] for layer in bufs for t in layer], beams.rows, cache.batch)  # (1, rows, ...) each
        beams.update(raw_step(cache, beams.tokens, keys, bufs))

    def by_tuning(fn):  # {tune: fn compiled with or without the tuning}: see above
        return {
            tune: torch.compile(fn, fullgraph=True, dynamic=False, **(tuned if tune else plain))
            for tune in (True, False)
        }

    compiled, compiled_beam = by_tuning(raw_step), by_tuning(raw_beam_step)
    eager_step, eager_beam_step = decoder.step, decoder.beam_step
    starts = {}  # since -> its device tensor, made once

    def run(fns, cache, *args, static=()):
        cache.advance(1)  # the graph advances cache.slot on the device
        mark_static((*cache.buffers(), *static))
        keys = tuple(cache.packed)
        tune = TUNE_LORA_STEPS or not any(kind == "lora_a" for kind, _ in keys)
        return fns[tune](cache, *args, keys, list(zip(*(layer_views(cache.packed[k]) for k in keys))))

    def layer_views(buf):
        # Each layer's states enter the graph as inputs of their own, made once per stacked
        # buffer: the compiler writes a view's offset into a stacked input into its kernels,
        # so indexing the stack in the graph gave every layer kernels of its own (32 times
        # the compiling and tuning on a 7B).
        if getattr(buf, "_layer_views", None) is None:
            buf._layer_views = [buf[i] for i in range(n_layers)]
            mark_static(buf._layer_views)
        return buf._layer_views

    def unstacked(cache):  # states of differing structure: no stacked tensors to capture
        return any(s is not None for s in cache.states) and not cache.packed

    @torch.no_grad()
    def step(cache, tokens):
        if unstacked(cache):
            return eager_step(cache, tokens)
        return run(compiled, cache, tokens).clone()  # the graph's output buffer is reused by the next replay

    @torch.no_grad()
    def beam_step(cache, beams, since):
        if unstacked(cache) or cache.length - since > BEAM_WINDOW:
            return eager_beam_step(cache, beams, since)  # (its `step` is the compiled one)
        if since not in starts:
            starts[since] = torch.tensor(since, device=beams.t.device)
        run(compiled_beam, cache, starts[since], beams, static=beams.buffers())

    decoder.step, decoder.beam_step = step, beam_step
    if graph_prefill:
        decoder.run_prefill = PrefillGraphs(decoder.run_prefill, torch.compile(decoder.run_prefill))
    return decoder


def persistent_caches() -> Path:
    """Keep the compiler's caches (inductor's FX graphs and AOT autograd artifacts, Triton's
    kernels, autotuning results) in the per-user cache folder, ~/.cache/minipara/compile
    ($MINIPARA_COMPILE_CACHE, or $XDG_CACHE_HOME's), instead of a temporary folder: a second
    start with the same model and settings then traces but compiles nothing. Variables
    the user set (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR) win."""
    root = os.environ.get("MINIPARA_COMPILE_CACHE")
    root = (
        Path(root)
        if root
        else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minipara" / "compile"
    )
    # `import torch._dynamo` writes torch's own temporary default into TORCHINDUCTOR_CACHE_DIR,
    # so a value equal to that default is torch's, not the user's, and is replaced (inductor
    # reads the variable at each use).
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if inductor is None or os.path.abspath(inductor) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ.setdefault("TRITON_CACHE_DIR", str(root / "triton"))
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return root


def compile_kwargs(cuda: bool, tune: bool) -> dict:
    """torch.compile's options for a decode step: on CUDA, CUDA graphs, and with `tune` the
    coordinate-descent tuning of the generated kernels (see compile_decoder); plain inductor
    on CPU."""
    if not cuda:
        return {}
    if tune:
        return {"options": {"triton.cudagraphs": True, "coordinate_descent_tuning": True}}
    return {"mode": "reduce-overhead"}


def mark_static(tensors):
    """Tensors a captured graph reads in place at a fixed address, rather than copying them
    into the graph at every replay (the mark stays on the tensor)."""
    for t in tensors:
        torch._dynamo.mark_static_address(t, guard=False)


class _Recorded:
    """One recorded prefill: its graph, its static inputs and output, and the host-side
    cache state (length, adapter states) that replaying the graph does not redo."""

    def __init__(self, graph, tokens, valid, logits, cache, adapter):
        self.graph, self.tokens, self.valid, self.logits = graph, tokens, valid, logits
        self.length, self.states, self.packed = cache.length, list(cache.states), dict(cache.packed)
        self.cache, self.adapter = cache, adapter  # held: their ids key this record


class PrefillGraphs:
    """`run_prefill(cache, tokens, valid, adapter)` replayed from CUDA graphs.

    A shape met for the first time runs eagerly (a one-off prompt costs no compiling or
    recording); the second time it runs `compiled` (the compiler makes its kernels for the
    first such shape, and once more, for any length, at the second) and is recorded, then
    replayed. `compiled` may be the eager function itself (the server's choice: recording
    costs a few prefills' time, a compilation tens of seconds). The adapter's parameters
    are read in place, so training them between requests is seen; replacing them is not.
    All records share one memory pool: each record's output is copied out right after
    its replay, and the adapter states it keeps live in the cache's own buffers."""

    def __init__(self, eager, compiled, keep: int = 16):
        self.eager, self.compiled, self.keep = eager, compiled, keep
        self.records: OrderedDict = OrderedDict()
        self.seen = set()
        self.pool = None  # made at the first recording

    @torch.no_grad()
    def __call__(self, cache, tokens, valid, adapter):
        key = (id(cache), id(adapter), tuple(tokens.shape))  # the adapter sets the prefix slots
        rec = self.records.get(key)
        if rec is None:
            if key not in self.seen:
                if len(self.seen) > 4096:  # ids of long-gone adapters: forget them, at worst one early record
                    self.seen.clear()
                self.seen.add(key)
                return self.eager(cache, tokens, valid, adapter)
            rec = self.records[key] = self._record(cache, tokens, valid, adapter)
            if len(self.records) > self.keep:
                self.records.popitem(last=False)
        self.records.move_to_end(key)
        rec.tokens.copy_(tokens)
        rec.valid.copy_(valid)
        rec.graph.replay()
        cache.length, cache.states, cache.packed = rec.length, list(rec.states), dict(rec.packed)
        return rec.logits.clone()

    def _record(self, cache, tokens, valid, adapter):
        tokens, valid, n_pre = tokens.clone(), valid.clone(), cache.n_prefix
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # Warm up on a side stream (as torch.cuda.graph asks); this also gives the cache
        # buffers for the adapter states outside the graph's pool (cache.pack_states). Twice:
        # the second run finds those buffers, as the recorded one will, and any compiling
        # that this changes happens here rather than during the recording.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                cache.reset(n_pre)
                self.compiled(cache, tokens, valid, adapter)
        torch.cuda.current_stream().wait_stream(side)
        cache.reset(n_pre)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.compiled(cache, tokens, valid, adapter)
        return _Recorded(graph, tokens, valid, logits, cache, adapter)
