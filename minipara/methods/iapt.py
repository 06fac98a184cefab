"""IAPT (paper 003): a prompt generator per layer writes l_sp soft tokens for that layer.

    u = norm(h) @ W_down_g                 (B, T, m)     h: hidden states entering layer i
    A = softmax_T(u @ W_sa_i)              (B, T, l_sp)  over prompt positions only
    p = A^T u                              (B, l_sp, m)
    s = R_g(p) @ W_up_g                    (B, l_sp, d)  the soft tokens (hidden states)

norm(h) is h / sqrt(mean(h^2) + eps) per position, in float32 (input_norm "rms", the
default; docs/methods.md, "Generator inputs"), or h itself ("none").

Layer i's soft tokens go through its input norm, K/V projections, key norm and RoPE at
positions 0..l_sp-1 (`model.prefix_kv`) and become l_sp key/value entries placed before the
text, which starts at position l_sp; their own outputs are discarded, and the next layer
makes new ones. At inference they are written once into the KV cache at prefill, so
decoding never runs a generator and costs what P-tuning v2 with l_sp prefixes costs.

Layers are grouped by `share_every` (L_s): group g = layers g*L_s .. g*L_s + L_s - 1 share
W_down_g (d x m), W_up_g (m x d) and the rational activation R_g; W_sa (m x l_sp) is per
layer. When L_s does not divide the layer count, the last group has the remaining layers.
All weights start N(0, 0.02) (docs/methods.md, IAPT: W_up = 0 would still add zero-valued keys that
shift attention, so IAPT is no identity at init anyway); R_g starts as GELU.

Parameters on LLaMA-2-7B (d 4096, 32 layers): 8 groups * 2 * 4096 * 256 + 32 * 256 * 4
+ 8 * 12 = 16,810,080. The paper's "8.4M" matches 8 * 4096 * 256 + 32 * 256 * 4
= 8,421,376, i.e. one projection per group; the formula (and this code) have two.

Variants (paper 003, Table 5) are config values:
    IAPT-1: pooler="mean"                  IAPT-2: share_every=16, m=1024
    IAPT-3: share_every=1, m=64            IAPT-4: activation="gelu"   IAPT-5: activation="relu"
    IAPT-6: activation="relu-gelu"         IAPT-7: activation="gelu-relu"  (by layer depth)
"""

from dataclasses import dataclass

import torch
from torch import nn

from minipara.errors import UserError
from minipara.methods.base import Adapter, LayerState, MethodConfig, check_input_norm, generator_input
from minipara.methods.rational import Rational, check_activation, fixed_activation, rational_per_row

POOLERS = ("attention", "mean")


@dataclass
class IaptConfig(MethodConfig):
    soft_tokens: int = 4  # l_sp, soft tokens (prefix key/value entries) per layer
    share_every: int = 4  # L_s, consecutive layers sharing W_down, W_up and the activation
    m: int = 256  # bottleneck width
    pooler: str = "attention"  # attention | mean (IAPT-1)
    activation: str = "rational"  # rational | gelu (IAPT-4) | relu (IAPT-5) | relu-gelu (6) | gelu-relu (7)
    input_norm: str = "rms"  # rms: the generator reads h / rms(h) per position | none: h itself

    before_field = {"input_norm": "none"}  # files written before input_norm read h itself

    def __post_init__(self):
        super().__post_init__()
        check_input_norm(self.input_norm, type(self).__name__.removesuffix("Config").upper())


class Iapt(Adapter):
    method = "iapt"
    config_cls = IaptConfig
    shardable = False  # model.prefix_kv runs a block's norm and K/V projections outside its forward

    def __init__(self, config: IaptConfig, args):
        super().__init__(config, args)
        if config.pooler not in POOLERS:
            raise UserError(f"unknown IAPT pooler {config.pooler!r}; use one of {', '.join(POOLERS)}")
        check_activation(config.activation, "IAPT")
        self.n_prefix = config.soft_tokens
        groups = -(-args.n_layers // config.share_every)
        self.w_down = nn.Parameter(torch.randn(groups, args.dim, config.m) * 0.02)
        self.w_up = nn.Parameter(torch.randn(groups, config.m, args.dim) * 0.02)
        if config.pooler == "attention":
            self.w_sa = nn.Parameter(torch.randn(args.n_layers, config.m, config.soft_tokens) * 0.02)
        if config.activation == "rational":
            self.act = nn.ModuleList(Rational() for _ in range(groups))

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.act.parameters()) if self.config.activation == "rational" else []

    def soft_tokens(self, i: int, h: torch.Tensor, pool_mask: torch.Tensor, rows=None) -> torch.Tensor:
        """(B, l_sp, d) float32: layer i's soft tokens from the prompt positions of h. rows: each
        row's own parameters, in a Mixture (see mixed_layer_state); the products broadcast over
        either."""
        g = i // self.config.share_every
        param = self.own(rows)
        u = generator_input(h, self.config.input_norm, self.args.norm_eps).float() @ param(lambda a: a.w_down[g])
        if self.config.pooler == "attention":
            # Non-prompt positions get the lowest logit: exactly 0 weight, and no NaN for a
            # row without prompt positions (as -inf would give).
            logit = (u @ param(lambda a: a.w_sa[i])).masked_fill(~pool_mask[..., None], torch.finfo(u.dtype).min)
            p = logit.softmax(dim=1).transpose(1, 2) @ u
        else:
            # IAPT-1 swaps only the pooler (paper 003, Sec. 5 "IAPT-1 substitutes the
            # self-attention pooler to average pooling"; l_sp = 4 stays, Sec. 4 "(a) the length
            # of soft prompts is l_sp = 4"): A becomes uniform over the prompt, so the l_sp
            # soft tokens are the one mean-pooled vector repeated. They still differ as keys
            # (RoPE positions 0..l_sp-1), and the cache layout and decode cost stay IAPT's.
            keep = pool_mask[..., None].to(u.dtype)
            mean = (u * keep).sum(1) / keep.sum(1).clamp(min=1)
            p = mean[:, None].expand(-1, self.config.soft_tokens, -1)
        return self.activation(i, p, rows) @ param(lambda a: a.w_up[g])

    def activation(self, i: int, p: torch.Tensor, rows=None) -> torch.Tensor:
        """Layer i's activation: its group's rational, or a fixed one chosen by the layer's depth."""
        kind, g = self.config.activation, i // self.config.share_every
        if kind == "rational" and rows is not None:  # each row's own coefficients
            return rational_per_row(p, rows, lambda ad: ad.act[g])
        if kind == "rational":
            return self.act[g](p)
        return fixed_activation(kind, i, self.args.n_layers)(p)

    # In a Mixture, tenants of one config make their soft tokens in one call (see Para).
    mixable = True

    def layer_state(self, i, h, pool_mask, model, rows=None):
        s = self.soft_tokens(i, h, pool_mask, rows)
        pos = torch.arange(self.n_prefix, device=h.device).expand(h.shape[0], -1)
        k, v = model.prefix_kv(i, s.to(h.dtype), pos)
        return LayerState.build(self.args, h.dtype, prefix_kv=(k, v))
