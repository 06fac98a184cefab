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

    # ---- many requests in one cache (serve/engine.py) -----------------------------------
    # Every row writes at the shared slot, and attention reads each slot's position and
    # validity (pos, ok), never slot order: so a request's entries may sit in any slots of
    # its row, and a newcomer is placed just below the shared slot.

    @torch.no_grad()
    def place(self, r: int, src: "KVCache", src_row: int):
        """Row r takes `src`'s row src_row (a prefill of its own: slots [0, src.length)),
        in the slots just below the shared slot, moved on if the row needs more."""
        need = src.length
        if self.length < need:  # the slots skipped stay invalid in every row
            self.slot.fill_(need)
            self.length = need
        s = self.length - need
        self.ok[r] = False
        self.clear(r, s)  # what the row's last request left below the copy ([s, length) is overwritten next)
        for i in range(self.n_layers):
            for dst, sb in zip(self.kv(i), src.kv(i)):
                dst[r, :, s : s + need] = sb[src_row, :, :need]
        self.pos[r, s : s + need] = src.pos[src_row, :need]
        self.ok[r, s : s + need] = src.ok[src_row, :need]
        self.next_pos[r] = src.next_pos[src_row]

    def free(self, r: int):
        """Row r holds nothing any more (it still writes throw-away entries at each step)."""
        self.ok[r] = False

    @torch.no_grad()
    def compact(self, keep):
        """Move each row's valid entries to the front of its slots, and the shared slot back
        to the longest row: room for more steps without touching any row's meaning. Rows
        not in `keep` are emptied (free rows wrote throw-away entries at every step)."""
        idle = torch.ones(self.batch, dtype=torch.bool)
        idle[list(keep)] = False
        self.ok[idle.to(self.ok.device)] = False
        order = (~self.ok).to(torch.int8).argsort(dim=1, stable=True)  # valid slots first
        for i in range(self.n_layers):
            for buf in self.kv(i):
                buf.copy_(buf.gather(2, order[:, None, :, None].expand_as(buf)))
        self.pos.copy_(self.pos.gather(1, order))
        self.ok.copy_(self.ok.gather(1, order))
        self.length = int(self.ok.sum(1).max())
        self.slot.fill_(self.length)
        for i in range(self.n_layers):
            for buf in self.kv(i):
                buf[:, :, self.length :].zero_()  # no row's entries are left there: zero, for `place`


class Rows:
    """The first k rows of a KVCache, as views, for one decode step of the engine (a step on
    them writes into the cache, the shared slot too). Made inside the compiled step from the
    whole cache and k, the size of an input marked dynamic: every view's batch size is then
    the one symbol k, so one graph serves every bucket (serve/engine.py). Holds what
    `Transformer.step` reads."""

    def __init__(self, cache: KVCache, k):
        self.n_prefix, self.states = cache.n_prefix, [None] * cache.n_layers
        self.slot = cache.slot  # shared by every row
        self.pos, self.ok, self.next_pos = cache.pos[:k], cache.ok[:k], cache.next_pos[:k]
        self._kv = [tuple(buf[:k] for buf in cache.kv(i)) for i in range(cache.n_layers)]

    def kv(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._kv[i]


class SlotStates:
    """The decode-time adapter states of every row of a batch, one buffer per (kind, linear)
    stacked over layers: (layers, rows, a, b), filled per row (`fill`) and reset to the
    identity (`reset`: scale 1, bias 0, zero low-rank pairs), so that rows of different
    tenants and methods, or none, decode in one batched step.

    Buffers are only ever made or grown (a new kind, a larger LoRA rank), never dropped: once
    every adapter served has been seen, their addresses and shapes stay, and a captured step
    replays whatever mix of requests comes. `layers(keys)` gives some of the kinds, per
    layer, made once (fixed addresses)."""

    FILL = {"scale": 1.0, "bias": 0.0, "lora_a": 0.0, "lora_b": 0.0}

    def __init__(self, n_layers: int, rows: int):
        self.n_layers, self.n_rows = n_layers, rows
        self.bufs: dict = {}  # (kind, linear) -> (layers, rows, a, b)
        self.keys_of: list = [frozenset()] * rows  # the kinds each row uses
        self._views: dict = {}
        self.version = 0  # bumped when buffers are made or grown

    @staticmethod
    def shapes(states: list) -> dict:
        """{(kind, linear): (a, b)} of one request's per-layer states (what `fill` would need)."""
        out = {}
        for s in states:
            for key, t in (s.tensors() if s is not None else {}).items():
                out[key] = tuple(max(x, y) for x, y in zip(t.shape[-2:], out.get(key, (0, 0))))
        return out

    @torch.no_grad()
    def ensure(self, shapes: dict, dtype, device):
        """Make or grow buffers to hold states of these shapes (other rows kept)."""
        for key, shape in sorted(shapes.items()):
            buf = self.bufs.get(key)
            if buf is not None and all(a >= b for a, b in zip(buf.shape[-2:], shape)):
                continue
            big = tuple(max(a, b) for a, b in zip(shape, buf.shape[-2:])) if buf is not None else tuple(shape)
            new = torch.full((self.n_layers, self.n_rows, *big), self.FILL[key[0]], dtype=dtype, device=device)
            if buf is not None:
                new[..., : buf.shape[-2], : buf.shape[-1]] = buf
            self.bufs[key] = new
            self._views.clear()
            self.version += 1

    @torch.no_grad()
    def fill(self, r: int, states: list, src_row: int = 0):
        """Row r takes row src_row of per-layer states (a prefill's; rows of 1 are shared)."""
        per_layer = [s.tensors() if s is not None else {} for s in states]
        ref = next((t for p in per_layer for t in p.values()), None)
        if ref is not None:
            self.ensure(self.shapes(states), ref.dtype, ref.device)
        self.reset(r)
        for i, p in enumerate(per_layer):
            for key, t in p.items():
                t = t.reshape(-1, *t.shape[-2:])
                t = t[src_row if t.shape[0] > 1 else 0]
                self.bufs[key][i, r, : t.shape[0], : t.shape[1]] = t
        self.keys_of[r] = frozenset(k for p in per_layer for k in p)

    @torch.no_grad()
    def reset(self, r: int):
        """Row r back to the identity in every buffer, not only the kinds it used: a step may
        apply kinds a row does not use (the engine's warmed-up structures), and a row must
        never carry what an earlier one left there."""
        for key, buf in self.bufs.items():
            buf[:, r] = self.FILL[key[0]]
        self.keys_of[r] = frozenset()

    def used(self, rows) -> frozenset:
        """The kinds that the given rows use."""
        return frozenset().union(*(self.keys_of[r] for r in rows))

    def layers(self, keys: tuple) -> list:
        """Per layer, every row of each kind in `keys`: [[t for key in keys] for layer]."""
        v = self._views.get(keys)
        if v is None:
            v = self._views[keys] = [[self.bufs[key][i] for key in keys] for i in range(self.n_layers)]
        return v


def reorder_packed(bufs, rows: torch.Tensor, batch: int):
    """Row i of packed adapter states (layers, rows or 1, ...) becomes old row rows[i];
    states shared by all rows stay."""
    for buf in bufs:
        if buf.dim() >= 4 and buf.shape[1] == batch:
            buf.copy_(buf.index_select(1, rows))
