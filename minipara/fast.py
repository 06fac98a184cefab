"""Fast decoding: the one-token step captured with torch.compile (CUDA graphs on GPU).

Only the decode step is compiled: prefill and the adapters' generators run eagerly
once per request. Everything the step reads has a fixed address from request to
request (the model's weights, the cache's buffers, and the adapter states packed
into the cache), so a CUDA graph recorded once is replayed for every token.
Adapter states enter as plain tensors: PARA's vectors become one multiply that
the compiler fuses into the neighbouring kernels, LoRA a pair of small matmuls.
"""
import torch

from .methods.base import LayerState


def compile_decoder(decoder, mode: str | None = None):
    """Replace `decoder.step` with a compiled step (default mode: reduce-overhead on CUDA,
    which records CUDA graphs; plain inductor on CPU). Numerics match the eager step to
    float rounding: the compiler may fuse and reorder element-wise work."""
    model = decoder.model
    n_layers = model.args.n_layers
    if mode is None:
        mode = "reduce-overhead" if model.tok_embeddings.weight.is_cuda else "default"
    # One graph per (cache, method structure): allow more than the default handful.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def raw_step(cache, tokens, keys, bufs):
        states = [None] * n_layers
        if keys:
            states = [LayerState.from_tensors({k: b[i] for k, b in zip(keys, bufs)}) for i in range(n_layers)]
        return model.step(tokens[:, None], cache, states=states)[:, -1]

    compiled = torch.compile(raw_step, mode=mode, fullgraph=True, dynamic=False)
    eager_step = decoder.step

    @torch.no_grad()
    def step(cache, tokens):
        if any(s is not None for s in cache.states) and not cache.packed:
            return eager_step(cache, tokens)  # states of differing structure: no stacked tensors
        if cache.length + 1 > cache.max_len:
            raise ValueError(f"{cache.length + 1} tokens exceed the cache length {cache.max_len}")
        cache.length += 1  # the host mirror of cache.slot, which the graph advances
        keys = tuple(cache.packed)
        bufs = [cache.packed[k] for k in keys]
        for t in (*cache.buffers(), *bufs):  # fixed addresses: no copy into the graph per replay
            torch._dynamo.mark_static_address(t, guard=False)
        # The graph's output buffer is reused by the next replay: hand back a copy.
        return compiled(cache, tokens, keys, bufs).clone()

    decoder.step = step
    return decoder
