"""PARADE (paper 002): PARA whose vector generators pool the prompt with an attentional
capsule pooler (docs/methods.md, PARADE, fixes the paper's inconsistent dimensions):

    h'      = norm(h) @ W_down                      (B, T, r)   norm: PARA's input_norm
    m[j->k] = h'_j @ W_cap[k]                        W_cap[k]: r x r/K, K = 4 capsules
    b[j,k]  = v_k . h'_j                             v_k in R^r
    n[:,k]  = softmax_j b[:,k]   (prompt positions only)
    c_k     = squash(sum_j n[j,k] m[j->k])
    b[j,k] += c_k . m[j->k],  recompute n and c     (one routing update)
    v       = GELU(concat(c_1..c_K)) @ W_up + b_up   (as PARA)

W_down, W_up, b_up are PARA's VectorGenerator; W_cap and v_k add r*r + K*r parameters per
layer (+0.06% on LLaMA-2-7B). W_up = 0 and b_up = 1 make an untrained adapter the identity.

Variants (paper 002, Table 6) are config values:
    PARADE-1: pooler="last"                (the last prompt token, no capsules)
    PARADE-3: targets="qkvgu", r=8         (l_q, l_k, l_v, l_g, l_u)
    PARADE-4: targets="qv", r=24           (l_q, l_v)
(PARADE-2, Zhang et al.'s capsule pooler, is not implemented.) The paper's 9.8M and 9.4M
for PARADE-3/4 are the counts without b_up, like PARA's 8.9M.
"""

from dataclasses import dataclass

import torch
from torch import nn

from minipara.errors import UserError
from minipara.methods.para import Para, ParaConfig
from minipara.methods.poolers import POOLERS


@dataclass
class ParadeConfig(ParaConfig):
    pooler: str = "capsule"  # capsule | last (PARADE-1) | mean | max
    capsules: int = 4  # K; must divide r


def squash(s: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """|s|^2 / (1 + |s|^2) * s / |s| over the last dim; |s| = sqrt(|s|^2 + eps) keeps s = 0
    (and its gradient) finite, and is exact in float32 once |s|^2 > ~1e-5."""
    n2 = s.pow(2).sum(-1, keepdim=True)
    return s * (n2 / (1 + n2)) * torch.rsqrt(n2 + eps)


class CapsulePooler(nn.Module):
    """Per-layer attentional capsule poolers, stacked over layers: (B, T, r) -> (B, r)."""

    def __init__(self, n_layers: int, r: int, capsules: int):
        super().__init__()
        self.w_cap = nn.Parameter(torch.randn(n_layers, capsules, r, r // capsules) * 0.02)
        self.v = nn.Parameter(torch.randn(n_layers, capsules, r) * 0.02)

    def forward(self, hp: torch.Tensor, mask: torch.Tensor, w_cap: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """hp (B, T, r) with one layer's w_cap (K, r, r/K) and v (K, r), or each row's own,
        (B, K, r, r/K) and (B, K, r) (a Mixture's tenants)."""
        rowwise = v.dim() == 3
        msg = torch.einsum("btr,bkrc->btkc" if rowwise else "btr,krc->btkc", hp, w_cap)  # m[j->k]: (B, T, K, r/K)
        # Non-prompt positions get the lowest logit: exp gives exactly 0 for them, as -inf
        # would, without a NaN for a row that has no prompt position at all.
        hidden = torch.finfo(hp.dtype).min

        def capsules(logit):  # (B, T, K) -> c (B, K, r/K)
            n = logit.masked_fill(~mask[..., None], hidden).softmax(dim=1)
            return squash(torch.einsum("btk,btkc->bkc", n, msg))

        logit = torch.einsum("btr,bkr->btk", hp, v) if rowwise else hp @ v.T
        c = capsules(logit)
        c = capsules(logit + torch.einsum("bkc,btkc->btk", c, msg))
        return c.flatten(1)  # concat(c_1..c_K)


class Parade(Para):
    method = "parade"
    config_cls = ParadeConfig
    poolers = ("capsule",) + POOLERS

    def __init__(self, config: ParadeConfig, args):
        if config.pooler == "capsule" and (config.capsules < 1 or config.r % config.capsules):
            raise UserError(f"PARADE's {config.capsules} capsules must divide r = {config.r}: change r or capsules")
        super().__init__(config, args)
        if config.pooler == "capsule":
            self.caps = CapsulePooler(args.n_layers, config.r, config.capsules)

    def pooled(self, i, h, pool_mask, rows=None):
        if self.config.pooler != "capsule":
            return super().pooled(i, h, pool_mask, rows)
        param = self.own(rows)
        return self.caps(
            self.normed(h).float() @ param(lambda a: a.gen.w_down[i]),
            pool_mask,
            param(lambda a: a.caps.w_cap[i]),
            param(lambda a: a.caps.v[i]),
        )
