"""LLaMA / Gemma decoder in plain PyTorch, numerically matching HF transformers.

Projections are fused (q|k|v and gate|up) for speed; adapters attach through
`LayerState.apply(name, x, y, split)` on the outputs of the four fused linears
("qkv", "o", "gate_up", "down"), on the outputs of Gemma 3's per-head query/key norms
("q_norm", "k_norm"), and through per-layer prefix key/values. With no adapter the
hooks are a single `is None` test.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from minipara.model.adapter import AdapterLike
from minipara.model.cache import KVCache
from minipara.model.config import ModelArgs, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        n = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma: (x * (1 + w)) in float32, then cast
            return (n * (self.offset + self.weight.float())).type_as(x)
        return self.weight * n.type_as(x)  # LLaMA: cast, then scale


def rope_cos_sin(inv_freq, pos, dtype):
    """cos/sin of shape (B, T, head_dim) for integer positions (B, T), as HF computes them."""
    freqs = pos[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos/sin: (B, T, D). Rotates the two halves of each head (HF's layout)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.wqkv = nn.Linear(args.dim, args.q_dim + 2 * args.kv_dim, bias=args.attention_bias)
        self.wo = nn.Linear(args.q_dim, args.dim, bias=args.attention_bias)
        if args.qk_norm:
            self.q_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)
            self.k_norm = RMSNorm(args.head_dim, args.norm_eps, args.norm_offset)

    def project(self, h, rope, st):
        """q, k, v heads (B, H, T, D) of normed hidden states h, RoPE applied."""
        a = self.args
        B, T, _ = h.shape
        qkv, sizes = self.wqkv(h), (a.q_dim, a.kv_dim, a.kv_dim)
        if st is not None:
            qkv = st.apply("qkv", h, qkv, split=sizes)
        q, k, v = qkv.split(sizes, dim=-1)
        q = q.view(B, T, a.n_heads, a.head_dim)
        k = k.view(B, T, a.n_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
            if st is not None:  # prompt-aware l_q/l_k act here, the norm would cancel them (docs/methods.md)
                q, k = st.scale_heads("q_norm", q), st.scale_heads("k_norm", k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        cos, sin = rope
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, h, rope, mask, kv, st):
        """kv: None (full forward), or (k_buf, v_buf, slots) to write into and read from."""
        a = self.args
        B, T, _ = h.shape
        q, k, v = self.project(h, rope, st)
        if kv is None:
            if st is not None and st.prefix_k is not None:  # (B|1, n_kv, P, D): shared ones broadcast
                k = torch.cat([st.prefix_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
                v = torch.cat([st.prefix_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        else:
            k_buf, v_buf, slots = kv
            k_buf.index_copy_(2, slots, k.to(k_buf.dtype))  # (a float32 prefill of a 16-bit model: see upcast)
            v_buf.index_copy_(2, slots, v.to(v_buf.dtype))
            k, v = k_buf.to(q.dtype), v_buf.to(q.dtype)
        # Grouped-query attention without copying K/V: fold the query heads that share
        # a K/V head into the time axis, so each K/V head serves n_rep*T queries.
        rep = a.n_heads // a.n_kv_heads
        q = q.reshape(B, a.n_kv_heads, rep * T, a.head_dim)
        if rep > 1:
            mask = mask.repeat(1, 1, rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.attn_scale)
        # reshape, not view: some kernels return the output in a layout view cannot take
        o = o.reshape(B, a.n_heads, T, a.head_dim).transpose(1, 2).reshape(B, T, a.q_dim)
        y = self.wo(o)
        return st.apply("o", o, y) if st is not None else y


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.ffn_dim = args.ffn_dim
        self.w_gate_up = nn.Linear(args.dim, 2 * args.ffn_dim, bias=args.mlp_bias)
        self.w_down = nn.Linear(args.ffn_dim, args.dim, bias=args.mlp_bias)
        self.act = F.silu if args.activation == "silu" else lambda x: F.gelu(x, approximate="tanh")

    def forward(self, x, st):
        gu = self.w_gate_up(x)
        if st is not None:
            gu = st.apply("gate_up", x, gu, split=(self.ffn_dim, self.ffn_dim))
        gate, up = gu.split(self.ffn_dim, dim=-1)
        a = self.act(gate) * up
        y = self.w_down(a)
        return st.apply("down", a, y) if st is not None else y


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        norm = lambda: RMSNorm(args.dim, args.norm_eps, args.norm_offset)  # noqa: E731
        self.attention_norm, self.attention, self.ffn_norm, self.ffn = (
            norm(),
            Attention(args),
            norm(),
            FeedForward(args),
        )
        self.sandwich = args.sandwich_norm
        if self.sandwich:
            self.post_attention_norm, self.post_ffn_norm = norm(), norm()

    def forward(self, x, rope, mask, kv, st):
        h = self.attention(self.attention_norm(x), rope, mask, kv, st)
        x = x + (self.post_attention_norm(h) if self.sandwich else h)
        h = self.ffn(self.ffn_norm(x), st)
        return x + (self.post_ffn_norm(h) if self.sandwich else h)


def n_params(args: ModelArgs) -> int:
    """How many parameters Transformer(args) has, by arithmetic: adapter builds check their own
    size against it (methods.construct) without building a model, even on the meta device."""
    a = args
    qkv = a.q_dim + 2 * a.kv_dim
    attention = a.dim * qkv + a.q_dim * a.dim + (qkv + a.dim) * a.attention_bias + 2 * a.head_dim * a.qk_norm
    ffn = 3 * a.dim * a.ffn_dim + (2 * a.ffn_dim + a.dim) * a.mlp_bias
    norms = (4 if a.sandwich_norm else 2) * a.dim
    embeddings = (1 if a.tie_embeddings else 2) * a.vocab_size * a.dim
    return embeddings + a.n_layers * (attention + ffn + norms) + a.dim  # (+ the final norm)


class Transformer(nn.Module):
    weights_id: str | None = None  # fingerprint of the checkpoint's weights (loading.py); None: random

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, args.norm_offset)
        if not args.tie_embeddings:
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        # sqrt(dim) rounded to each dtype, as Python numbers (a tensor's .item() would break a compiled graph);
        # made on the CPU, as load_model builds the model under the meta device
        self.embed_scale = {
            dt: torch.tensor(math.sqrt(args.dim), dtype=dt, device="cpu").item()
            for dt in (torch.float32, torch.bfloat16, torch.float16)
        }
        self.register_buffer("inv_freq_global", torch.empty(args.head_dim // 2), persistent=False)
        self.register_buffer("inv_freq_local", torch.empty(args.head_dim // 2), persistent=False)
        self.setup_rope()

    def setup_rope(self):
        """(Re)compute the RoPE frequencies in float32: call after casting the model, which
        would otherwise round them to the new dtype (HF keeps them in float32)."""
        dev = self.inv_freq_global.device
        if dev.type != "meta":
            self.inv_freq_global = rope_inv_freq(self.args, local=False).to(dev)
            self.inv_freq_local = rope_inv_freq(self.args, local=True).to(dev)

    # ---- pieces adapters use ------------------------------------------------------------
    def rope(self, layer: int, pos, dtype):
        inv = self.inv_freq_local if self.args.sliding[layer] else self.inv_freq_global
        return rope_cos_sin(inv, pos, dtype)

    def prefix_kv(self, layer: int, hidden, pos):
        """Keys/values (B, n_kv, P, D) that hidden states (B, P, dim) at positions pos (B, P)
        would add to `layer`: its input norm, K/V projections, key norm and RoPE."""
        blk = self.layers[layer]
        h = blk.attention_norm(hidden)
        _, k, v = blk.attention.project(h, self.rope(layer, pos, h.dtype), None)
        return k, v

    def logits(self, h):
        """Vocabulary logits of final (normed) hidden states."""
        w = self.tok_embeddings.weight if self.args.tie_embeddings else self.output.weight
        return F.linear(h, w)

    def new_cache(self, batch: int, max_len: int, n_prefix: int = 0) -> KVCache:
        p = self.tok_embeddings.weight
        return KVCache(self.args, batch, max_len, n_prefix, dtype=p.dtype, device=p.device)

    # ---- forward --------------------------------------------------------------------------
    def forward(
        self,
        tokens,
        valid=None,
        cache: KVCache | None = None,
        adapter: AdapterLike | None = None,
        pool_mask=None,
        hidden_only=False,
        last_only=False,
    ):
        """Logits (B, T, V) for tokens (B, T).

        valid:     (B, T) bool, False at padding (left or right). Default: all valid.
        cache:     read and extend this KV cache (prefill, then decode one token at a time).
        adapter:   run the adapter's generators at each layer (full forward or prefill); its
                   per-layer states go into `cache` and are reused by later calls, which
                   pass no adapter: decode never runs a generator.
        pool_mask: (B, T) bool, the positions prompt poolers may see (default: valid). In
                   teacher-forced training this is the prompt only.
        """
        B, T = tokens.shape
        dev = tokens.device
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=dev)
        n_pre = adapter.n_prefix if adapter is not None else (cache.n_prefix if cache is not None else 0)
        # Text positions start after the row's prefix entries (IAPT: 274 tokens sit at 4..277).
        pre_rows = adapter.prefix_rows(B, dev) if n_pre and adapter is not None else None
        if cache is None:
            start = torch.zeros(B, dtype=torch.long, device=dev) if pre_rows is None else pre_rows
            q_pos = start[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
            k_pos, k_ok = q_pos, valid
            if n_pre:
                slots = torch.arange(n_pre, device=dev)
                k_pos = torch.cat([(slots - n_pre).expand(B, n_pre), q_pos], dim=1)
                k_ok = torch.cat([slots[None] < pre_rows[:, None], valid], dim=1)
            q_slot = n_pre + torch.arange(T, device=dev)
        else:
            if adapter is not None and n_pre != cache.n_prefix:
                raise ValueError(f"cache was made for {cache.n_prefix} prefix slots, the adapter has {n_pre}")
            prefill = cache.length == cache.n_prefix  # the cache holds no text yet
            cache.advance(T)
            if prefill:
                if pre_rows is None:
                    cache.next_pos.zero_()
                else:
                    slots = torch.arange(n_pre, device=dev)
                    cache.ok[:, :n_pre] = slots[None] < pre_rows[:, None]
                    cache.pos[:, :n_pre] = slots - n_pre  # negative: prefix, see attention_mask
                    cache.next_pos.copy_(pre_rows)
            out = self.step(tokens, cache, valid, adapter, pool_mask, hidden_only, last_only)
            if adapter is not None:
                cache.pack_states(cache.states)
            return out
        states = [None] * self.args.n_layers
        return self._layers(
            tokens,
            q_pos,
            q_slot,
            k_pos,
            k_ok,
            n_pre,
            None,
            states,
            adapter,
            valid if pool_mask is None else pool_mask,
            hidden_only,
            last_only,
        )

    def step(
        self,
        tokens,
        cache: KVCache,
        valid=None,
        adapter: AdapterLike | None = None,
        pool_mask=None,
        hidden_only=False,
        last_only=False,
        states=None,
    ):
        """The tensor-only part of a cached forward: reads and advances `cache.slot` and the
        per-row positions on the device, and reads no host-side counters, so a decode step
        (one token per row, no adapter) can be captured once and replayed (fast.py).
        `states`: the per-layer adapter states to use (default: the cache's)."""
        B, T = tokens.shape
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        q_slot = cache.slot + torch.arange(T, device=tokens.device)
        q_pos = cache.next_pos[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
        cache.pos.index_copy_(1, q_slot, q_pos)
        cache.ok.index_copy_(1, q_slot, valid)
        cache.next_pos.copy_(q_pos[:, -1] + valid[:, -1].long())
        cache.slot.add_(T)
        # Only a prefill writes prefix entries; a decode step reads no host-side count at all.
        n_pre = cache.n_prefix if adapter is not None else 0
        return self._layers(
            tokens,
            q_pos,
            q_slot,
            cache.pos,
            cache.ok,
            n_pre,
            cache,
            cache.states if states is None else states,
            adapter,
            valid if pool_mask is None else pool_mask,
            hidden_only,
            last_only,
        )

    def _layers(
        self, tokens, q_pos, q_slot, k_pos, k_ok, n_pre, cache, states, adapter, pool_mask, hidden_only, last_only
    ):
        a = self.args
        x = self.tok_embeddings(tokens)
        if a.embed_scale:  # HF rounds sqrt(dim) to the model dtype first
            x = x * self.embed_scale[x.dtype]
        dtype, upcast = x.dtype, upcast_layers(x)
        if upcast:
            x = x.float()
        masks = {
            w: attention_mask(q_pos, q_slot, k_pos, k_ok, w)
            for w in {a.sliding_window if s else None for s in a.sliding}
        }
        ropes = {s: self.rope(a.sliding.index(s), q_pos, x.dtype) for s in set(a.sliding)}
        for i, layer in enumerate(self.layers):
            if adapter is not None:  # (in the model's dtype: its states are kept for decode)
                st = states[i] = adapter.layer_state(i, x.to(dtype), pool_mask, self)
            else:
                st = states[i]
            kv = None
            if cache is not None:
                k_buf, v_buf = cache.kv(i)
                if adapter is not None and st is not None and st.prefix_k is not None:
                    k_buf[:, :, :n_pre] = st.prefix_k.to(k_buf.dtype)
                    v_buf[:, :, :n_pre] = st.prefix_v.to(v_buf.dtype)
                kv = (k_buf, v_buf, q_slot)
            window = a.sliding_window if a.sliding[i] else None
            inputs = (x, ropes[a.sliding[i]], masks[window], kv, st)
            if upcast:  # this layer's weights in float32, for this call only
                x = torch.func.functional_call(layer, {n: p.float() for n, p in layer.named_parameters()}, inputs)
            else:
                x = layer(*inputs)
        x = x.to(dtype)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        return x if hidden_only else self.logits(x)


# A CPU without 16-bit matrix instructions runs 16-bit prefills several times slower than
# float32, while decoding one token per row is bound by reading the weights and is faster in
# 16 bits. So on such a CPU, inputs (not one-token steps) of at least this many tokens run each
# layer in float32, its weights upcast for the call, and write the KV cache back in the model's
# dtype. bf16 has such instructions with AVX512-BF16 or AMX, fp16 with AMX-FP16: measured on an
# AVX512-BF16 EPYC (2 threads, default model, 274 tokens), bf16 throughout 268 ms, float32
# 400 ms, upcast 496 ms.
UPCAST_MIN_TOKENS = 32


def fast_16bit_matmul(dtype) -> bool:
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.cpu._is_amx_fp16_supported()


def upcast_layers(x) -> bool:
    """Whether to run the layers of this forward in float32 (x: the embedded input)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.shape[1] > 1
        and x.shape[0] * x.shape[1] >= UPCAST_MIN_TOKENS
        and not fast_16bit_matmul(x.dtype)
    )


def attention_mask(q_pos, q_slot, k_pos, k_ok, window: int | None):
    """(B, 1, T, S) bool: which keys each query sees.

    Causal by position, within `window` positions on sliding layers. Prefix entries carry
    negative positions and are always visible, also on sliding layers: they are per-layer
    adapter memory rather than text. A padding query also sees its own slot, so that no
    softmax row is empty (an all-masked row gives NaN, which would leak into later layers).
    """
    S = k_pos.shape[1]
    k_slot = torch.arange(S, device=k_pos.device)
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    see = k_ok[:, None, :] & (kp <= qp)
    if window is not None:
        see = see & ((qp - kp < window) | (kp < 0))
    see = see | (k_slot[None, None, :] == q_slot[None, :, None])
    return see[:, None]
