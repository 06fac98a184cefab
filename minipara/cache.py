"""Static key/value cache for prefill + token-by-token decode.

Slot layout of every row: `[0, n_prefix)` holds per-layer prefix entries (IAPT's
soft tokens, P-tuning v2's prefixes), then the left-padded prompt, then the
generated tokens. `pos` holds each slot's RoPE position and `ok` whether it is
a real entry, so masks are built from two small tensors instead of per-row
Python bookkeeping. Buffers are allocated once and updated in place, which
keeps their addresses fixed for CUDA graphs.
"""
import torch
from torch import nn

from .config import ModelArgs


class KVCache(nn.Module):
    def __init__(self, args: ModelArgs, batch: int, max_len: int, n_prefix: int = 0,
                 dtype=torch.float32, device=None):
        super().__init__()
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        for i in range(args.n_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.zeros(batch, max_len, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("ok", torch.zeros(batch, max_len, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("next_pos", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        self.n_layers, self.batch, self.max_len, self.n_prefix = args.n_layers, batch, max_len, n_prefix
        self.length = n_prefix  # slots in use; the text starts after the prefix region
        self.states = [None] * args.n_layers  # each layer's adapter state (methods/base.py: LayerState)

    def kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def reset(self, n_prefix: int = 0):
        """Empty the cache for a new batch of requests, keeping the buffers (and their addresses)."""
        if n_prefix > self.max_len:
            raise ValueError(f"{n_prefix} prefix slots exceed the cache length {self.max_len}")
        self.ok.zero_()
        self.n_prefix = self.length = n_prefix
        self.states = [None] * self.n_layers

    @torch.no_grad()
    def reorder(self, rows: torch.Tensor):
        """Row i becomes old row rows[i] (beam search), in place; adapter states follow."""
        for name, buf in self.named_buffers():
            buf.copy_(buf.index_select(0, rows))
        self.states = [s.select(rows) if s is not None else None for s in self.states]

    @torch.no_grad()
    def load_rows(self, src: "KVCache", rows: torch.Tensor):
        """Fill this cache with `src`'s rows `rows` (e.g. each prompt repeated once per beam)."""
        if len(rows) != self.batch or src.max_len != self.max_len:
            raise ValueError("load_rows: this cache must have len(rows) rows and src's length")
        for (_, dst), (_, s) in zip(self.named_buffers(), src.named_buffers()):
            dst.copy_(s.index_select(0, rows))
        self.n_prefix, self.length = src.n_prefix, src.length
        self.states = [s.select(rows) if s is not None else None for s in src.states]
