"""The model's linear products, and how one-token rows run them inside a compiled step.

Products of a few one-token rows (decode) can run as reductions over the input dim that the
compiler generates and tunes, one per row, fused into one kernel that reads the weight once.
On an H100 these stream the LLaMA-2-7B weights at 2.5-3.0 TB/s where cuBLAS's GEMV kernels
reach 2.1-2.7 (scripts/probes/gpu_decode.py). Eagerly the product x * w would be
materialised, so fast.py turns this on only around its compiled steps.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

REDUCE_ROWS = 0  # matvec of at most this many one-token rows runs as reductions


@contextlib.contextmanager
def matvec_by_reduction(rows: int):
    """Within: `matvec` of at most `rows` one-token rows runs as reductions."""
    global REDUCE_ROWS
    old, REDUCE_ROWS = REDUCE_ROWS, rows
    try:
        yield
    finally:
        REDUCE_ROWS = old


def matvec(x, w, b=None, extra=None):
    """F.linear(x, w, b). extra: (in, r), or per row (B, 1, in, r), further columns whose
    products x @ extra are returned too, as (y, x @ extra): a shared one joins w's rows when
    the product runs as a reduction, so LoRA's x.A costs no kernel of its own."""
    rows = x.shape[:-1].numel()
    xe = None
    if x.shape[-2] == 1 and rows <= REDUCE_ROWS:
        fold = extra is not None and extra.dim() == 2
        wx = torch.cat([w, extra.T.to(w.dtype)]) if fold else w
        flat = x.reshape(rows, x.shape[-1])
        y = torch.stack([(flat[i] * wx).sum(-1) for i in range(rows)]).view(*x.shape[:-1], -1)
        if fold:
            y, xe = y.split([w.shape[0], extra.shape[-1]], -1)
        if b is not None:
            y = y + b
    else:
        y = F.linear(x, w, b)
    if extra is None:
        return y
    if xe is None:  # one token per row: sums the compiler fuses into a reduction (see LayerState.linear)
        xe = (x[..., None] * extra).sum(-2) if x.shape[-2] == 1 else x @ extra
    return y, xe


class Linear(nn.Linear):
    """nn.Linear through `matvec`."""

    def forward(self, x):
        return matvec(x, self.weight, self.bias)
