"""LoRA (Hu et al., 2021): a low-rank update on the chosen linears, y = x W^T + s * x A^T B^T.

Baseline setting of the papers: rank 4, alpha 8 (s = alpha / r = 2) on all seven linears;
A ~ Kaiming-uniform as nn.Linear's default init, B = 0, so an untrained adapter is the
identity. Parameters are kept per projection and stacked over layers, transposed to the
x @ A @ B layout the model uses: a[p] (L, in, r) = A^T, b[p] (L, r, out) = B^T, unscaled
as in PEFT; the scale is folded into B when a layer's state is built.
"""

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from minipara.methods.base import (
    PROJECTIONS,
    Adapter,
    LayerState,
    MethodConfig,
    check_targets,
    fused_linear,
    in_sizes,
    out_sizes,
)
from minipara.model.layer_state import lora_delta
from minipara.model.projections import widths


@dataclass
class LoraConfig(MethodConfig):
    r: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = PROJECTIONS
    rslora: bool = False  # scale alpha / sqrt(r) (PEFT's use_rslora) instead of alpha / r

    def __post_init__(self):
        super().__post_init__()
        self.targets = check_targets(self.targets, "lora")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


class Lora(Adapter):
    method = "lora"
    config_cls = LoraConfig

    def __init__(self, config: LoraConfig, args):
        super().__init__(config, args)
        ins, outs, r, L = in_sizes(args), out_sizes(args), config.r, args.n_layers
        # nn.Linear's kaiming_uniform_(a=sqrt(5)) on A (r, in) is U(-1/sqrt(in), 1/sqrt(in));
        # written out because fan-in of the stacked (L, in, r) tensor would be computed wrongly.
        self.a = nn.ParameterDict(
            {
                p: nn.Parameter(torch.empty(L, ins[p], r).uniform_(-(ins[p] ** -0.5), ins[p] ** -0.5))
                for p in config.targets
            }
        )
        self.b = nn.ParameterDict({p: nn.Parameter(torch.zeros(L, r, outs[p])) for p in config.targets})

    def low_rank(self) -> dict:
        return {p: (self.a[p], self.b[p], self.config.scale) for p in self.a}

    def states(self, dtype) -> list[LayerState]:
        """Every layer's state, the pairs of all layers fused at once."""
        fused = LayerState.build(self.args, dtype, lora={p: (a, b * s) for p, (a, b, s) in self.low_rank().items()})
        return [fused.layer(i) for i in range(self.args.n_layers)]

    @torch.no_grad()
    def merge(self, model):
        """A copy of `model` with W += s * B A folded into its fused weights (float32 math)."""
        merged = copy.deepcopy(model)
        for i, st in enumerate(self.states(torch.float32)):
            for f, (a, b) in st.lora.items():
                w = fused_linear(merged, i, f).weight
                w.copy_(w.float() + lora_delta(a, b, widths(self.args, f)).T.to(w.device))
        return merged
