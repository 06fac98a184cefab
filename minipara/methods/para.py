"""PARA (papers 000/001): a vector generator per layer scales Q, V and the FFN up-projection.

    pooled = pool(h)                       # h: hidden states entering the layer
    v      = g(pooled @ W_down) @ W_up + b_up
    Q' = l_q * Q,  V' = l_v * V,  U' = l_u * U   (l_* = split(v))

h is read normalised by default (input_norm "rms": h / sqrt(mean(h^2) + eps) per position,
in float32, before pooling; docs/methods.md, "Generator inputs"); "none"
reads h itself, as the papers write it. W_up starts at zero and b_up at one, so an
untrained adapter is the identity. The vectors are made once per request at prefill and
reused at every decode step.
Vector sizes come from the projection shapes (GQA's smaller V, Gemma's head_dim).
On models that normalise each query/key head (Gemma 3), l_q and l_k scale the normed
heads, before RoPE: applied to the projection output, the norm would cancel any per-head
magnitude they learn (docs/methods.md, Query/key norm).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minipara.errors import UserError
from minipara.methods.base import (
    Adapter,
    LayerState,
    MethodConfig,
    check_input_norm,
    generator_input,
    out_sizes,
    row_matmul,
)
from minipara.methods.poolers import POOLERS, pool

TARGETS = {"qvu": ("q", "v", "up"), "qkvgu": ("q", "k", "v", "gate", "up"), "qv": ("q", "v")}


@dataclass
class ParaConfig(MethodConfig):
    r: int = 12
    pooler: str = "last"  # last | mean | max
    targets: str = "qvu"  # qvu | qkvgu | qv
    up_bias: bool = True  # b_up (the papers' 8.9M count on LLaMA-2-7B leaves it out)
    input_norm: str = "rms"  # rms: the generator reads h / rms(h) per position | none: h itself

    before_field = {"input_norm": "none"}  # files written before input_norm read h itself

    def __post_init__(self):
        super().__post_init__()
        check_input_norm(self.input_norm, type(self).__name__.removesuffix("Config").upper())


class VectorGenerator(nn.Module):
    """The per-layer projections shared by PARA, PEDRO and PARADE, stacked over layers."""

    def __init__(self, n_layers: int, dim: int, r: int, width: int, up_bias: bool):
        super().__init__()
        self.w_down = nn.Parameter(torch.randn(n_layers, dim, r) * 0.02)
        self.w_up = nn.Parameter(torch.zeros(n_layers, r, width))
        self.b_up = nn.Parameter(torch.ones(n_layers, width)) if up_bias else None


class Para(Adapter):
    method = "para"
    config_cls = ParaConfig
    poolers = POOLERS

    def __init__(self, config: ParaConfig, args):
        super().__init__(config, args)
        if config.targets not in TARGETS:
            raise UserError(f"unknown targets {config.targets!r}; use one of {', '.join(TARGETS)}")
        if config.pooler not in self.poolers:
            raise UserError(f"{self.method} has no pooler {config.pooler!r}; use one of {', '.join(self.poolers)}")
        sizes = out_sizes(args)
        self.targets = TARGETS[config.targets]
        self.splits = [sizes[t] for t in self.targets]
        self.gen = VectorGenerator(args.n_layers, args.dim, config.r, sum(self.splits), config.up_bias)

    def activation(self, i: int, z: torch.Tensor, rows=None) -> torch.Tensor:
        return F.gelu(z)

    def normed(self, h: torch.Tensor) -> torch.Tensor:
        """The hidden states as the generator reads them (config.input_norm)."""
        return generator_input(h, self.config.input_norm, self.args.norm_eps)

    def pooled(self, i: int, h: torch.Tensor, pool_mask: torch.Tensor, rows=None) -> torch.Tensor:
        """(B, r): the prompt pooled and projected down. The last-token pooler picks first and
        normalises the one position it picked (the same numbers, without a float32 copy of h)."""
        if self.config.pooler == "last":
            pooled = self.normed(pool(h, pool_mask, "last"))
        else:
            pooled = pool(self.normed(h), pool_mask, self.config.pooler)
        return row_matmul(pooled, self.own(rows)(lambda a: a.gen.w_down[i]))

    def vectors(self, i: int, z: torch.Tensor, rows=None) -> torch.Tensor:
        """(B, width): l_q | l_v | l_u. Without b_up they are 1 + z W_up, so an untrained
        adapter is still the identity."""
        param = self.own(rows)
        v = row_matmul(z, param(lambda a: a.gen.w_up[i]))
        return v + param(lambda a: a.gen.b_up[i]) if self.gen.b_up is not None else v + 1.0

    # In a Mixture, tenants of one config make their vectors in one call, each row with its own
    # tenant's parameters gathered (`rows`), instead of one call per tenant (about 20 small
    # kernels each, at every layer of every prefill).
    mixable = True

    def layer_state(self, i, h, pool_mask, model, rows=None):
        z = self.activation(i, self.pooled(i, h, pool_mask, rows), rows)
        vectors = self.vectors(i, z, rows).split(self.splits, dim=-1)
        return LayerState.build(self.args, h.dtype, scale=dict(zip(self.targets, vectors)), qk_after_norm=True)
