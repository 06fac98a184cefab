"""The contract between the model and the adapters: one layer's adapter state.

A method never patches the model. At each layer of a full forward or a prefill, the model
calls `adapter.layer_state(i, h, pool_mask, model)` with the hidden states `h` entering layer
i; the method returns a `LayerState`: multipliers and biases for the outputs of the layer's
linears, low-rank updates, and prefix keys/values. The model applies it (`apply`), the KV
cache keeps it for every decode step (so a generator runs once per request), and the compiled
decode step reads it as plain tensors (`tensors`, `from_tensors`).

Methods speak in per-projection names (q, k, v, o, gate, up, down: projections.py); the model
fuses q|k|v and gate|up, so `LayerState.build` concatenates the parts, filling ones
(multipliers) or zeros (biases, low-rank blocks) for projections the method leaves alone.
"""

from dataclasses import dataclass, field

import torch

from minipara.model.config import ModelArgs
from minipara.model.projections import FUSED, out_sizes, widths
from minipara.model.projections import parts as _parts


@dataclass
class LayerState:
    """One layer's adapter contribution for a batch. Every tensor's first dim is the
    batch (one row per request) or 1 (shared by all rows).

    scale[f]: (B|1, 1, out) multiplies fused linear f's output; scale["q_norm"|"k_norm"]
              multiplies the output of a per-head query/key norm (models with qk_norm)
    bias[f]:  (B|1, 1, out) is added to it
    lora[f]:  (A, Bm), the low-rank update of fused linear f with n parts (q|k|v: 3,
              gate|up: 2, o and down: 1) and r rank slots, the scaling folded into Bm:
              A (r * n, in) or (B, r * n, in), laid out as PEFT's lora_A (row j * n + p is
              rank j of part p), so that a one-token x.A reads A along its rows;
              Bm (r, out) or (B, r, out), whose columns of part p hold that part's B, so
              that each part's product reads only its own columns (a block-diagonal
              (r * n, out) Bm is two thirds zeros for q|k|v: 16 tenants' per-row ones took
              15 us a layer at batch 32 on an H200). Bm's rows for ranks past a part's
              own, and for parts left alone, are zeros (A's there may hold anything).
    prefix_k, prefix_v: (B|1, n_kv, P, head_dim) extra keys/values before the text
    """

    scale: dict = field(default_factory=dict)
    bias: dict = field(default_factory=dict)
    lora: dict = field(default_factory=dict)
    prefix_k: torch.Tensor | None = None
    prefix_v: torch.Tensor | None = None

    def apply(self, name: str, x, y, split=None):
        """y (..., out), the output of fused linear `name` for input x, with this state's
        update; split: its parts' widths (q|k|v, gate|up), None for one part."""
        if name in self.lora:
            y = y + lora_update(x, *(t.to(x.dtype) for t in self.lora[name]), split)
        if name in self.scale:
            y = y * self.scale[name]
        if name in self.bias:
            y = y + self.bias[name]
        return y

    def scale_heads(self, name: str, t):
        """t (B, T, heads, head_dim) times scale[name] (B|1, 1, heads * head_dim), if any."""
        s = self.scale.get(name)
        return t if s is None else t * s.view(s.shape[0], 1, t.shape[2], t.shape[3])

    def tensors(self) -> dict[tuple[str, str], torch.Tensor]:
        """The decode-time tensors by (kind, linear); prefix k/v are left out: after the
        prefill they live in the KV cache."""
        out = {("scale", k): v for k, v in self.scale.items()}
        out.update({("bias", k): v for k, v in self.bias.items()})
        for k, (a, b) in self.lora.items():
            out[("lora_a", k)], out[("lora_b", k)] = a, b
        return out

    @classmethod
    def from_tensors(cls, tensors: dict) -> "LayerState":
        st = cls()
        for (kind, name), t in tensors.items():
            if kind in ("scale", "bias"):
                getattr(st, kind)[name] = t
        for (kind, name), t in tensors.items():
            if kind == "lora_a":
                st.lora[name] = (t, tensors[("lora_b", name)])
        return st

    def select(self, rows: torch.Tensor) -> "LayerState":
        """The state for rows `rows` (beam expansion/reorder); shared tensors stay shared."""

        def pick(t):
            return t if t.dim() < 3 or t.shape[0] == 1 else t.index_select(0, rows)

        return LayerState(
            scale={k: pick(v) for k, v in self.scale.items()},
            bias={k: pick(v) for k, v in self.bias.items()},
            lora={k: (pick(a), pick(b)) for k, (a, b) in self.lora.items()},
            prefix_k=None if self.prefix_k is None else pick(self.prefix_k),
            prefix_v=None if self.prefix_v is None else pick(self.prefix_v),
        )

    def layer(self, i: int) -> "LayerState":
        """Layer i of a state that `build` made from parts stacked over the layers ((L, out)
        vectors, (L, in, r) and (L, r, out) pairs, fused to (L, r * n, in) and (L, r, out)): its
        state shared by every row."""
        return LayerState(
            scale={k: v[i : i + 1] for k, v in self.scale.items()},
            bias={k: v[i : i + 1] for k, v in self.bias.items()},
            lora={k: (a[i], b[i]) for k, (a, b) in self.lora.items()},
        )

    @classmethod
    def build(cls, args: ModelArgs, dtype, scale=None, bias=None, lora=None, prefix_kv=None, qk_after_norm=False):
        """Fuse per-projection parts into the model's fused linears.

        scale/bias: {proj: (B|1, out) or (out,)}; lora: {proj: (A (in, r), B (r, out))},
        unbatched or batched, as methods hold them (x @ A @ B; stored transposed, see `lora`);
        prefix_kv: (k, v) or None.
        qk_after_norm: on models with a per-head query/key norm, scale q and k after that
        norm (whose RMS would divide a per-head magnitude away) instead of at the projection.
        """
        outs, st = out_sizes(args), cls()
        if qk_after_norm and args.qk_norm and scale:
            scale = dict(scale)
            for p in ("q", "k"):
                if p in scale:
                    v = scale.pop(p)
                    lead = v.shape[:-1] if v.dim() > 1 else (1,)
                    st.scale[f"{p}_norm"] = v.reshape(*lead, 1, -1).to(dtype)
        for kind, parts, fill in (("scale", scale, 1.0), ("bias", bias, 0.0)):
            for f in {FUSED[p] for p in parts or ()}:
                ref = next(parts[p] for p in _parts(f) if p in parts)
                lead = ref.shape[:-1] if ref.dim() > 1 else (1,)
                pieces = [
                    parts[p].reshape(*lead, -1)
                    if p in parts
                    else torch.full((*lead, outs[p]), fill, dtype=ref.dtype, device=ref.device)
                    for p in _parts(f)
                ]
                getattr(st, kind)[f] = torch.cat(pieces, -1).unsqueeze(-2).to(dtype)
        for f in {FUSED[p] for p in lora or ()}:
            fused = fuse_lora([lora.get(p) for p in _parts(f)], widths(args, f))
            st.lora[f] = tuple(t.to(dtype) for t in fused)
        if prefix_kv is not None:
            st.prefix_k, st.prefix_v = (t.to(dtype) for t in prefix_kv)
        return st


def fuse_lora(pairs, outs):
    """One fused linear's (A, Bm) (see LayerState.lora) from its parts' (A (..., in, r),
    B (..., r, out)) pairs, None for a part left alone; outs: the parts' widths."""
    present = [ab for ab in pairs if ab is not None]
    r, n = max(a.shape[-1] for a, _ in present), len(pairs)
    lead = torch.broadcast_shapes(*(t.shape[:-2] for ab in present for t in ab))
    a0, b0 = present[0]
    a = a0.new_zeros(*lead, r, n, a0.shape[-2])
    bm = b0.new_zeros(*lead, r, sum(outs))
    col = 0
    for p, (ab, w) in enumerate(zip(pairs, outs)):
        if ab is not None:
            rp = ab[0].shape[-1]
            a[..., :rp, p, :] = ab[0].mT
            bm[..., :rp, col : col + w] = ab[1]
        col += w
    return a.flatten(-3, -2), bm


def lora_update(x, a, bm, split=None):
    """x (B, T, in) times the low-rank pair (a, bm) of LayerState.lora: (B, T, out)."""
    n = len(split) if split else 1
    if x.shape[-2] == 1:
        # One token per row (decode): the products as sums, which the compiler fuses into
        # reductions (x.A) and into the consumer of y (rank sums of <= 8 unroll). As GEMMs with
        # 1-3 rows and r columns, cuBLAS picked a kernel that took 63 us per call at 3 rows
        # on an H100 (bench.py --profile).
        if a.dim() == 3:  # per-row pairs (B, r * n, in), (B, r, out)
            a, bm = a[:, None], bm[:, None]
        xa = (x[..., None, :] * a).sum(-1).unflatten(-1, (-1, n))[..., None]  # (B, 1, r, n, 1)
        return torch.cat([(xa[..., p, :] * b).sum(-2) for p, b in enumerate(_by_part(bm, split))], -1)
    xa = (x @ a.mT).unflatten(-1, (-1, n))  # (B, T, r, n)
    return torch.cat([xa[..., p] @ b for p, b in enumerate(_by_part(bm, split))], -1)


def lora_parts(a, bm, split=None):
    """The parts' (A (..., in, r), B (..., r, out)) of a fused pair (a, bm): fuse_lora undone."""
    bms = _by_part(bm, split)
    return [(a[..., p :: len(bms), :].mT, b) for p, b in enumerate(bms)]


def _by_part(bm, split):
    """Bm's columns split by part (split: the parts' widths; None: one part)."""
    return bm.split(split or (bm.shape[-1],), -1)


def lora_delta(a, bm, split=None):
    """The dense (..., in, out) update x @ delta of the pair (a, bm) (merging, tests)."""
    return torch.cat([pa @ pb for pa, pb in lora_parts(a, bm, split)], -1)
