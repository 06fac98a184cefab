"""A batch whose rows use different adapters (and methods), or none: multi-tenant serving.

`Mixture(adapters, rows)`: row b of the batch uses `adapters[rows[b]]` (None: the bare
model). At each layer every member adapter runs its generator on its own rows only, once
per request, and the states are combined into one full-batch `LayerState` that the
model applies like any other:

    scale   ones, member rows' vectors written in      (y * 1 is y exactly)
    bias    zeros, member rows' vectors written in     (y + 0 is y exactly)
    lora    per-row A and B (LayerState.lora's layout): each row its own adapter's low-rank
            pair, ranks zero-padded to the largest, zeros for rows without one; decode is
            then one batched low-rank product for all tenants, with no loop over rows. The
            pairs are gathered from the tenants' pairs stacked side by side, and a method that
            gives its update as unfused parts (`low_rank`: LoRA) is stacked part by part, for
            all layers at the first: a prefill of 16 LoRA tenants then takes a few kernels, not
            each tenant's fusing at every layer.
    prefix  (B, n_kv, P_max, hd): each row's own entries in its first P_row slots; the
            model masks a row's unused slots and starts its text at P_row (prefix_rows)

So each row gets the output it would get alone, up to float rounding (zero-padded sums).
"""

import torch
from torch import nn

from minipara.errors import UserError
from minipara.methods.base import Adapter, LayerPass, LayerState
from minipara.model.layer_state import lora_parts
from minipara.model.projections import FUSED, widths
from minipara.model.projections import parts as parts_of


class Mixture(Adapter):
    method = "mixture"
    config_cls = None

    def __init__(self, adapters: list, rows: list):
        nn.Module.__init__(self)
        for r in rows:
            if r is not None and not (isinstance(r, int) and 0 <= r < len(adapters)):
                raise UserError(f"mixture row {r!r} names no adapter: use 0..{len(adapters) - 1} or None")
        present = [a for a in adapters if a is not None]
        if any(a.args != present[0].args for a in present):
            raise UserError("a mixture's adapters must all be made for the same base model")
        self.config, self.args, self.batch = None, present[0].args if present else None, len(rows)
        # Rows grouped by adapter object, so each generator runs once over all of its rows.
        groups: dict[int, tuple] = {}
        for b, r in enumerate(rows):
            a = None if r is None else adapters[r]
            if a is not None:
                groups.setdefault(id(a), (a, []))[1].append(b)
        self.groups = list(groups.values())
        self.members = nn.ModuleList(a for a, _ in self.groups)  # follow .to(device)
        # One generator call per adapter, or per kind (class and config) for methods whose
        # generators run many tenants at once (`mixable`): (adapters, rows, each row's adapter).
        calls: dict = {}
        for a, idx in self.groups:
            ads, rows, which = calls.setdefault((type(a), repr(a.config)) if a.mixable else id(a), ([], [], []))
            rows += idx
            which += [len(ads)] * len(idx)
            ads.append(a)
        self.calls = list(calls.values())
        self.n_prefix = max((a.n_prefix for a, _ in self.groups), default=0)
        self._kept = {}  # index tensors of the row layout, made once (see _keep)
        # Members whose update is all low-rank and prompt-independent (`low_rank`: LoRA), and
        # their pairs for all layers (_low_rank_state).
        self.low_rank_calls = {c for c, (ads, _, _) in enumerate(self.calls) if ads[0].low_rank() is not None}
        self.low_rank_pass = LayerPass()

    def _keep(self, key, make):
        """make(), once per key: the rows' layout never changes, so their index tensors are made
        on the CPU at the first prefill and kept; a recorded prefill finds them made and copies
        nothing to the device."""
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def _rows_of(self, c: int, device) -> torch.Tensor:
        """Call c's rows, and which of its adapters each uses, as tensors on `device`."""
        return self._keep(
            ("rows", c, str(device)), lambda: tuple(torch.tensor(x, device=device) for x in self.calls[c][1:])
        )

    def _check(self, batch: int):
        if batch != self.batch:
            raise ValueError(f"this mixture is for batches of {self.batch} rows, got {batch}")

    def prefix_rows(self, batch, device):
        self._check(batch)
        out = torch.zeros(batch, dtype=torch.long, device=device)
        for c, (ads, idx, _) in enumerate(self.calls):
            if ads[0].n_prefix:  # (one class and config: one prefix)
                out[self._rows_of(c, device)[0]] = ads[0].prefix_rows(len(idx), device)
        return out

    # Eager inside a compiled prefill: traced, a mixture's generators (each member over its
    # rows, at every layer) make a graph that grows with the tenants (16 LoRA tenants, 8 tiny
    # layers, CPU: 111 s to compile); broken out, the layers compile as the base's do (10 s).
    @torch.compiler.disable
    def layer_state(self, i, h, pool_mask, model):
        B = h.shape[0]
        self._check(B)
        lora = self._low_rank_state(i, B, h.device, h.dtype)
        parts, blocks = self._generated(i, h, pool_mask, model)
        for f, (A, Bm) in self._pairs(blocks, B, h.device, h.dtype).items():
            # Both kinds on one linear: each row's ranks side by side (the other kind's are zeros in Bm).
            lora[f] = (torch.cat([lora[f][0], A], 1), torch.cat([lora[f][1], Bm], 1)) if f in lora else (A, Bm)
        if not parts and not lora:
            return None
        out = LayerState(lora=lora)
        for kind, fill in (("scale", 1.0), ("bias", 0.0)):
            for name in sorted({n for _, _, st in parts for n in getattr(st, kind)}):
                vals = [
                    (rows, _rows(_as3d(getattr(st, kind)[name]), len(rows)))
                    for _, rows, st in parts
                    if name in getattr(st, kind)
                ]
                ref = vals[0][1]
                # The fill row, then every member's rows, picked into batch order by one index
                # (three ops, not one write per member).
                stacked = torch.cat([ref.new_full((1, *ref.shape[1:]), fill)] + [v for _, v in vals]).to(ref.dtype)
                getattr(out, kind)[name] = stacked[self._order(tuple(rows for rows, _ in vals), B, h.device)]
        pre = [(ix, st) for ix, _, st in parts if st.prefix_k is not None]
        if pre:
            k0 = pre[0][1].prefix_k
            out.prefix_k = k0.new_zeros(B, k0.shape[1], self.n_prefix, k0.shape[3])
            out.prefix_v = torch.zeros_like(out.prefix_k)
            for ix, st in pre:
                P = st.prefix_k.shape[2]
                out.prefix_k[ix, :, :P] = _rows(st.prefix_k, len(ix))
                out.prefix_v[ix, :, :P] = _rows(st.prefix_v, len(ix))
        return out

    def _low_rank_state(self, i: int, batch: int, device, dtype) -> dict:
        """Layer i's {fused linear: (A, Bm)} of the low-rank members. Their pairs do not depend
        on the prompt: all layers' are gathered at once, at a pass's first layer (LayerPass)."""

        def build():
            blocks = {}
            for c in self.low_rank_calls:
                ads, idx, _ = self.calls[c]
                for p, (A, Bm, s) in ads[0].low_rank().items():
                    blocks.setdefault(p, []).append((tuple(idx), A, Bm, s))
            stacks = self._pairs(blocks, batch, device, dtype)
            return [{f: (A[j], Bm[j]) for f, (A, Bm) in stacks.items()} for j in range(self.args.n_layers)]

        return dict(self.low_rank_pass.get(i, self.args.n_layers, build)) if self.low_rank_calls else {}

    def _generated(self, i: int, h, pool_mask, model) -> tuple[list, dict]:
        """The other members' layer-i states, each call over its own rows: [(row index tensor,
        rows, LayerState)], and their low-rank pairs as blocks by projection for `_pairs`."""
        parts, blocks = [], {}  # blocks: projection -> [(rows, A (in, r), B (r, width), scale)]
        for c, (ads, idx, _) in enumerate(self.calls):
            if c in self.low_rank_calls:
                continue
            ix, which = self._rows_of(c, h.device)
            if len(ads) > 1:
                st = type(ads[0]).mixed_layer_state(
                    ads, which, i, h.index_select(0, ix), pool_mask.index_select(0, ix), model
                )
            elif type(ads[0]).layer_state is Adapter.layer_state:  # states that do not read the prompt
                st = ads[0].layer_state(i, h, pool_mask, model)  # ((IA)^3, BitFit: no rows to pick out)
            else:
                st = ads[0].layer_state(i, h.index_select(0, ix), pool_mask.index_select(0, ix), model)
            if st is None:
                continue
            parts.append((ix, tuple(idx), st))
            for f, pair in st.lora.items():  # fused pairs (scaling folded in), shared or per row: by part
                for p, (A, Bm) in zip(parts_of(f), lora_parts(*pair, widths(self.args, f))):
                    if A.dim() == 2 or (A.shape[0] == 1 and Bm.shape[0] == 1):
                        blocks.setdefault(p, []).append(
                            (tuple(idx), A.reshape(A.shape[-2:]), Bm.reshape(Bm.shape[-2:]), 1.0)
                        )
                        continue
                    A, Bm = (_rows(t if t.dim() == 3 else t[None], len(idx)) for t in (A, Bm))
                    blocks.setdefault(p, []).extend(((row,), A[k], Bm[k], 1.0) for k, row in enumerate(idx))
        return parts, blocks

    def _pairs(self, blocks: dict, batch: int, device, dtype) -> dict:
        """{fused linear: (A, Bm)} in LayerState.lora's per-row layout, from blocks
        {projection: [(rows, A (..., in, r), B (..., r, width), scale)]} (leading dims: the
        layers, or none): each part's pairs stacked side by side, and each row's columns
        gathered from the stacks (the scalings on B, before the gather)."""
        out = {}
        for f in {FUSED[p] for p in blocks}:
            present = [p for p in parts_of(f) if p in blocks]
            cols, local, scale = self._gather(f, present, [blocks[p] for p in present], batch, device)
            A = torch.cat([b[1] for p in present for b in blocks[p]], -1).to(dtype).mT[..., cols, :]
            lead = A.shape[:-4]
            Bm = []
            for p, w in zip(parts_of(f), widths(self.args, f)):
                if p not in blocks:
                    Bm.append(A.new_zeros(*lead, batch, cols.shape[1], w))
                    continue
                bs = [b[2] for b in blocks[p]]
                stack = torch.cat(bs + [bs[0].new_zeros(*lead, 1, w)], -2)  # its last row: padding's
                Bm.append((stack * scale[p]).to(dtype)[..., local[p], :])
            out[f] = (A.flatten(-3, -2), torch.cat(Bm, -1))
        return out

    def _order(self, groups: tuple, batch: int, device) -> torch.Tensor:
        """(batch,) index into [fill row, the groups' rows in turn]: each row's own entry, the
        fill row (0) for rows outside the groups."""

        def make():
            order, at = [0] * batch, 1
            for rows in groups:
                for r in rows:
                    order[r], at = at, at + 1
            return torch.tensor(order, device=device)

        return self._keep(("order", groups, str(device)), make)

    def _gather(self, f: str, present: list, part_blocks, batch: int, device):
        """Where each row's low-rank pair of fused linear f comes from, the same at every layer
        and request: cols (batch, R, n), the columns of the parts' A's stacked side by side
        that row b takes as rank j of part k (LayerState.lora's layout; padding: column 0, its
        B row being zero); local, {present part: (batch, R)}: the same as rows of that part's
        stacked B's, padding the zero row past them, so that a padded rank adds exactly nothing;
        scale, {present part: (rows + 1, 1)}: the scaling of each row of its stacked B's."""

        def make():
            n, ks = len(parts_of(f)), [parts_of(f).index(p) for p in present]
            mine = [[[] for _ in range(n)] for _ in range(batch)]  # row -> part -> [(column, local)]
            col, ends, scale = 0, [], []
            for k, blocks in zip(ks, part_blocks):
                at, scale_k = 0, []
                for rows, a, _, s in blocks:
                    for r in rows:
                        mine[r][k] += [(col + at + j, at + j) for j in range(a.shape[-1])]
                    at += a.shape[-1]
                    scale_k += [s] * a.shape[-1]
                col += at
                ends.append(at)
                scale.append(torch.tensor(scale_k + [0.0], device=device)[:, None])
            R = max(1, max(len(m) for row in mine for m in row))
            cols = torch.zeros(batch, R, n, dtype=torch.long)
            local = torch.tensor(ends)[:, None, None].repeat(1, batch, R)  # each part's zero row
            for r, row in enumerate(mine):
                for k, m in enumerate(row):
                    for j, (c, lc) in enumerate(m):
                        cols[r, j, k] = c
                        local[ks.index(k), r, j] = lc
            return cols.to(device), dict(zip(present, local.to(device))), dict(zip(present, scale))

        key = (
            f,
            tuple(present),
            tuple(tuple((b[0], b[1].shape[-1], b[3]) for b in bl) for bl in part_blocks),
            str(device),
        )
        return self._keep(key, make)

    def merge(self, model):
        raise UserError("a mixture of adapters cannot be merged into one model: merge each adapter on its own")


def _as3d(t: torch.Tensor) -> torch.Tensor:
    """Scale/bias as (rows|1, 1, out); fewer dims mean shared by all rows (as in LayerState.select)."""
    return t if t.dim() >= 3 else t.reshape(1, 1, t.shape[-1])


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """t with a leading dim of n rows: a shared tensor (first dim 1) is expanded."""
    if t.shape[0] == 1:
        return t.expand(n, *t.shape[1:])
    if t.shape[0] != n:
        raise ValueError(f"adapter state has {t.shape[0]} rows for {n} requests")
    return t
