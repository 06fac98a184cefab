"""BitFit as the papers configure it: a learned bias added to every linear output.

The base linears of LLaMA/Gemma have no bias, so the bias is a new vector per linear
(zeros at init: an untrained adapter is the identity) rather than a base parameter
made trainable. Merging gives the fused linears a bias.
"""

import copy
from dataclasses import dataclass

import torch
from torch import nn

from minipara.methods.base import PROJECTIONS, Adapter, LayerState, MethodConfig, check_targets, fused_linear, out_sizes


@dataclass
class BitFitConfig(MethodConfig):
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self):
        super().__post_init__()
        self.targets = check_targets(self.targets, "bitfit")


class BitFit(Adapter):
    method = "bitfit"
    config_cls = BitFitConfig

    def __init__(self, config: BitFitConfig, args):
        super().__init__(config, args)
        outs = out_sizes(args)
        self.bias = nn.ParameterDict({p: nn.Parameter(torch.zeros(args.n_layers, outs[p])) for p in config.targets})

    def states(self, dtype) -> list[LayerState]:
        """Every layer's state, the biases of all layers fused at once."""
        fused = LayerState.build(self.args, dtype, bias=dict(self.bias.items()))
        return [fused.layer(i) for i in range(self.args.n_layers)]

    @torch.no_grad()
    def merge(self, model):
        """A copy of `model` with the biases added to (or made into) its linears' biases.
        Both attention (or both FFN) linears get one, so that the copy's
        attention_bias/mlp_bias flags describe it truthfully."""
        merged = copy.deepcopy(model)
        a, states = merged.args, self.states(torch.float32)
        fused = set(states[0].bias)
        a.attention_bias |= bool(fused & {"qkv", "o"})
        a.mlp_bias |= bool(fused & {"gate_up", "down"})
        for i, st in enumerate(states):
            bias = st.bias
            for f in ("qkv", "o") * a.attention_bias + ("gate_up", "down") * a.mlp_bias:
                lin = fused_linear(merged, i, f)
                if lin.bias is None:
                    w = lin.weight
                    lin.bias = nn.Parameter(
                        torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False
                    )
                if f in bias:
                    lin.bias.copy_(lin.bias.float() + bias[f].reshape(-1).to(lin.bias.device))
        return merged
