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

from minipara.model.config import ModelArgs
from minipara.model.layer_state import LayerState


class KVCache(nn.Module):
    def __init__(self, args: ModelArgs, batch: int, max_len: int, n_prefix: int = 0, dtype=torch.float32, device=None):
        super().__init__()
        # One buffer per layer: a compiled step then writes each new entry in place. (Views of
        # one stacked buffer made the compiler copy the whole buffer at every step.)
        shape = (batch, args.n_kv_heads, max_len, args.head_dim)
        for i in range(args.n_layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("pos", torch.zeros(batch, max_len, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("ok", torch.zeros(batch, max_len, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("next_pos", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        # The next free slot, on the device: a compiled decode step reads and advances it
        # without a host round trip; `length` mirrors it on the host for checks.
        self.register_buffer("slot", torch.full((1,), n_prefix, dtype=torch.long, device=device), persistent=False)
        self.n_layers, self.batch, self.max_len, self.n_prefix = args.n_layers, batch, max_len, n_prefix
        self.length = n_prefix  # slots in use; the text starts after the prefix region
        self.states = [None] * args.n_layers  # each layer's adapter state (layer_state.py: LayerState)
        self.packed = {}  # (kind, linear) -> the states' tensors of all layers, stacked (see pack_states)
        self._spare = {}  # packed buffers of earlier requests, kept to be refilled (fixed addresses)

    def advance(self, n: int):
        """Take the next n slots: moves the host-side `length` (the graph-safe forward moves
        `slot` on the device), refusing to run past the end."""
        if self.length + n > self.max_len:
            raise ValueError(f"{self.length + n} tokens exceed the cache length {self.max_len}")
        self.length += n

    def kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def reset(self, n_prefix: int = 0):
        """Empty the cache for a new batch of requests, keeping the buffers (and their addresses)."""
        if n_prefix > self.max_len:
            raise ValueError(f"{n_prefix} prefix slots exceed the cache length {self.max_len}")
        self.clear(end=self.length)  # the slots the last request wrote; the rest are still zero
        self.ok.zero_()
        self.slot.fill_(n_prefix)
        self.n_prefix = self.length = n_prefix
        self.states = [None] * self.n_layers
        self._spare.update(self.packed)
        self.packed = {}

    @torch.no_grad()
    def clear(self, row: int | None = None, end: int | None = None):
        """Zero the keys and values of `row` (default: every row) in slots [0, end) (default:
        all), before a new request uses them. Masking does not protect a request from what an
        earlier one left: a masked slot still enters attention as 0 * V, and 0 * NaN is NaN,
        so the NaN or inf of one adapter that overflowed would reach every later request.
        A memset per request, where checking or masking would cost every decode step."""
        for i in range(self.n_layers):
            for buf in self.kv(i):
                (buf if row is None else buf[row])[..., :end, :].zero_()

    @torch.no_grad()
    def pack_states(self, states: list):
        """Keep the adapter states of a prefill for decoding, stacked over layers in tensors
        this cache owns and reuses from request to request: a beam reorder is then one index
        op per kind, and a captured decode step finds them at the same addresses.
        Layers whose states differ in structure are kept as they are, unstacked."""
        self.states = list(states)
        self._spare.update(self.packed)
        self.packed = {}
        per_layer = [s.tensors() if s is not None else None for s in states]
        if all(not p for p in per_layer):  # nothing to apply at decode (IAPT's prefix is in the KV cache)
            self.states = [None] * self.n_layers
            return
        first = per_layer[0]
        if first is None or any(
            p is None or p.keys() != first.keys() or any(p[k].shape != first[k].shape for k in p) for p in per_layer
        ):
            return
        for key in first:
            new = torch.stack([p[key] for p in per_layer])
            buf = self._spare.get(key)
            if buf is None or buf.shape != new.shape or buf.dtype != new.dtype:
                buf = self._spare[key] = new
            else:
                buf.copy_(new)
            self.packed[key] = buf
        self.states = [LayerState.from_tensors({k: b[i] for k, b in self.packed.items()}) for i in range(self.n_layers)]

    @torch.no_grad()
    def reorder(self, rows: torch.Tensor, since: int = 0):
        """Row i becomes old row rows[i] (beam search), in place; adapter states follow.

        since: slots before it are equal in every row that `rows` maps between (beams of one
        prompt share its prefill), so only the later slots move: beam search then copies the
        few generated entries per step, not the whole cache."""
        for name, buf in self.named_buffers():
            if name == "slot":
                continue
            if buf.dim() > 1:  # (rows, slots) or (rows, heads, slots, head_dim)
                buf = buf[:, since : self.length] if buf.dim() == 2 else buf[:, :, since : self.length]
            buf.copy_(buf.index_select(0, rows))
        self._reorder_states(rows)

    def _reorder_states(self, rows):
        if self.packed:
            reorder_packed(self.packed.values(), rows, self.batch)
        else:
            self.states = [s.select(rows) if s is not None else None for s in self.states]

    @torch.no_grad()
    def reorder_slots(self, rows: torch.Tensor, slots: torch.Tensor):
        """As `reorder` for the buffers, moving only the given slots (a tensor, so that a
        captured step can take a window whose start is data): every entry the rows differ in
        must be among them. Packed adapter states are left to `reorder_packed`."""
        for name, buf in self.named_buffers():
            if name == "slot":
                continue
            if buf.dim() == 1:
                buf.copy_(buf.index_select(0, rows))
            else:
                d = 1 if buf.dim() == 2 else 2  # the slot axis: (rows, slots) or (rows, heads, slots, head_dim)
                buf.index_copy_(d, slots, buf.index_select(d, slots).index_select(0, rows))

    @torch.no_grad()
    def load_rows(self, src: "KVCache", rows: torch.Tensor):
        """Fill this cache with `src`'s rows `rows` (e.g. each prompt repeated once per beam)."""
        if len(rows) != self.batch or src.max_len != self.max_len:
            raise ValueError("load_rows: this cache must have len(rows) rows and src's length")
        for (name, dst), (_, s) in zip(self.named_buffers(), src.named_buffers()):
            dst.copy_(s if name == "slot" else s.index_select(0, rows))
        self.n_prefix, self.length = src.n_prefix, src.length
        self.pack_states([s.select(rows) if s is not None else None for s in src.states])


def reorder_packed(bufs, rows: torch.Tensor, batch: int):
    """Row i of packed adapter states (layers, rows or 1, ...) becomes old row rows[i];
    states shared by all rows stay."""
    for buf in bufs:
        if buf.dim() >= 4 and buf.shape[1] == batch:
            buf.copy_(buf.index_select(1, rows))
