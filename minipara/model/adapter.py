"""What the model asks of an adapter: the whole interface, as a typed Protocol.

The model never imports a method. It calls three things on whatever it is given as
`adapter` (minipara/model/transformer.py, minipara/decode/generation.py), and every method
(minipara/methods/, subclasses of methods.base.Adapter) and the many-tenant Mixture
provide them:

    n_prefix                          key/value slots each layer places before the text
                                      (IAPT, P-tuning v2; 0 for the others)
    prefix_rows(batch, device)        how many of those slots each row uses, (batch,) long
    layer_state(i, h, pool_mask, model)
                                      layer i's LayerState (or None: nothing at that layer),
                                      given the hidden states h (B, T, dim) entering it and
                                      the positions a prompt pooler may read (pool_mask)

`model` is the Transformer itself, for the pieces a generator needs (`rope`, `prefix_kv`,
`args`). The adapter returns data only; the model applies it (LayerState.apply), the KV
cache keeps it for decoding, and decoding passes no adapter. docs/design.md tells the rest.
"""

from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from minipara.model.layer_state import LayerState

if TYPE_CHECKING:  # the model module imports this one
    from minipara.model.transformer import Transformer


@runtime_checkable
class AdapterLike(Protocol):
    """The interface the model relies on (see the module's docstring)."""

    n_prefix: int

    def prefix_rows(self, batch: int, device: torch.device) -> torch.Tensor: ...

    def layer_state(
        self, i: int, h: torch.Tensor, pool_mask: torch.Tensor, model: "Transformer"
    ) -> LayerState | None: ...
