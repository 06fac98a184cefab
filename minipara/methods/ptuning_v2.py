"""P-tuning v2 (Liu et al., 2022): learned key/value prefixes at every layer.

`prefix_len` (64 in the papers' baseline setting) key and value vectors per layer and
K/V head, learned directly in the space of the cache's entries, as PEFT's prefix tuning
does with its past_key_values: they pass through no norm and no RoPE. The text then
starts at position prefix_len. Init: N(0, 1), like PEFT's prefix embedding (an
nn.Embedding at its default init) and the P-tuning v2 code's; the papers give none.
Not an identity at init, and not mergeable (the base class refuses).
"""

from dataclasses import dataclass

import torch
from torch import nn

from minipara.methods.base import Adapter, LayerState, MethodConfig


@dataclass
class PTuningV2Config(MethodConfig):
    prefix_len: int = 64


class PTuningV2(Adapter):
    method = "ptuning_v2"
    config_cls = PTuningV2Config

    def __init__(self, config: PTuningV2Config, args):
        super().__init__(config, args)
        self.n_prefix = config.prefix_len
        # (layer, key|value, kv head, slot, head_dim): one layer's slice is the cache's layout.
        self.prefix = nn.Parameter(torch.randn(args.n_layers, 2, args.n_kv_heads, config.prefix_len, args.head_dim))

    def state(self, i: int, dtype) -> LayerState:
        k, v = self.prefix[i, :, None]  # (1, n_kv, P, head_dim) each: shared by every row
        return LayerState.build(self.args, dtype, prefix_kv=(k, v))

    merge_refusal = "its prefix keys/values are extra attention entries, which no base weight can hold"
