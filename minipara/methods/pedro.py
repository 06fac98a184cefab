"""PEDRO (paper 004): PARA whose vector generators use a learnable activation.

    v = R_i(pool(h) @ W_down) @ W_up + b_up

R_i is layer i's own rational activation (rational.py; 7 + 5 = 12 parameters per layer),
GELU-shaped at init, so PEDRO starts as the identity like PARA. The rational parameters
are architecture parameters: `arch_parameters()` hands them to the trainer, which trains
them in their own optimizer group on dev batches (first-order DARTS, SPEC.md). Options
and variants are PARA's: PEDRO-1/2 = pooler mean/max, PEDRO-3 = targets qkvgu with r=8,
PEDRO-4 = targets qv with r=24.
"""
from dataclasses import dataclass

from torch import nn

from .para import Para, ParaConfig
from .rational import Rational


@dataclass
class PedroConfig(ParaConfig):
    """PARA's options (r, pooler, targets, up_bias)."""


class Pedro(Para):
    method = "pedro"
    config_cls = PedroConfig

    def __init__(self, config: PedroConfig, args):
        super().__init__(config, args)
        self.act = nn.ModuleList(Rational() for _ in range(args.n_layers))

    def activation(self, i, z):
        return self.act[i](z)

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.act.parameters())
