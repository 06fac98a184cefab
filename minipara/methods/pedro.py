"""PEDRO (paper 004): PARA whose vector generators use a learnable activation.

    v = R_i(pool(h) @ W_down) @ W_up + b_up

R_i is layer i's own rational activation (rational.py; 7 + 5 = 12 parameters per layer),
GELU-shaped at init, so PEDRO starts as the identity like PARA. The rational parameters
are architecture parameters: `arch_parameters()` hands them to the trainer, which trains
them in their own optimizer group on dev batches (first-order DARTS, docs/methods.md, PEDRO). Options
and variants are PARA's: PEDRO-1/2 = pooler mean/max, PEDRO-3 = targets qkvgu with r=8,
PEDRO-4 = targets qv with r=24; PEDRO-5/6/7 = activation relu / gelu / relu-gelu (fixed
functions: no architecture parameters, so no bi-level steps).
"""

from dataclasses import dataclass

from torch import nn

from minipara.methods.para import Para, ParaConfig
from minipara.methods.rational import Rational, check_activation, fixed_activation, rational_per_row


@dataclass
class PedroConfig(ParaConfig):
    """PARA's options (r, pooler, targets, up_bias), and the generator activation."""

    activation: str = "rational"  # rational | relu (PEDRO-5) | gelu (PEDRO-6) | relu-gelu (PEDRO-7) | gelu-relu


class Pedro(Para):
    method = "pedro"
    config_cls = PedroConfig

    def __init__(self, config: PedroConfig, args):
        check_activation(config.activation, "PEDRO")
        super().__init__(config, args)
        if config.activation == "rational":
            self.act = nn.ModuleList(Rational() for _ in range(args.n_layers))

    def activation(self, i, z, rows=None):
        if self.config.activation != "rational":
            return fixed_activation(self.config.activation, i, self.args.n_layers)(z)
        if rows is None:
            return self.act[i](z)
        return rational_per_row(z, rows, lambda a: a.act[i])

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.act.parameters()) if self.config.activation == "rational" else []
