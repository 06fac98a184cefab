"""(IA)^3 (Liu et al., 2022): learned vectors multiply linear outputs, l * (x W^T + b).

Baseline setting: vectors on the K, V and FFN up-projection outputs, initialised to one,
so an untrained adapter is the identity. (PEFT's default for LLaMA scales down_proj's
input instead of up_proj's output: the same thing, since down's input is act(gate) * up.)
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn

from minipara.methods.base import Adapter, LayerState, MethodConfig, check_targets, fused_linear, out_sizes


@dataclass
class IA3Config(MethodConfig):
    targets: tuple[str, ...] = ("k", "v", "up")

    def __post_init__(self):
        super().__post_init__()
        self.targets = check_targets(self.targets, "ia3")


class IA3(Adapter):
    method = "ia3"
    config_cls = IA3Config

    def __init__(self, config: IA3Config, args):
        super().__init__(config, args)
        outs = out_sizes(args)
        self.scale = nn.ParameterDict({p: nn.Parameter(torch.ones(args.n_layers, outs[p])) for p in config.targets})

    def states(self, dtype) -> list[LayerState]:
        """Every layer's state, the vectors of all layers fused at once."""
        fused = LayerState.build(self.args, dtype, scale=dict(self.scale.items()))
        return [fused.layer(i) for i in range(self.args.n_layers)]

    @torch.no_grad()
    def merge(self, model):
        """A copy of `model` whose weight rows (and biases) are multiplied by the vectors."""
        merged = copy.deepcopy(model)
        for i, st in enumerate(self.states(torch.float32)):
            for f, s in st.scale.items():
                lin = fused_linear(merged, i, f)
                s = s.reshape(-1).to(lin.weight.device)
                lin.weight.copy_(lin.weight.float() * s[:, None])
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias.float() * s)
        return merged
