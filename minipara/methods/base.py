"""What every method shares: the Adapter base, its targets option and config as a dict.

A method returns, per layer, the `LayerState` the model applies (minipara/layer_state.py, the
model-adapter contract, beside the model); it names a layer's linears as projections.py does.
"""

import math
import threading
from dataclasses import fields
from typing import ClassVar

import torch
from torch import nn

from minipara.checks import check_fields, kind
from minipara.errors import UserError
from minipara.model.config import ModelArgs
from minipara.model.layer_state import LayerState  # noqa: F401 - what layer_state() returns, for the methods
from minipara.model.projections import PROJECTIONS, fused_linear, in_sizes, out_sizes  # noqa: F401 - the methods' vocabulary


def check_targets(targets, method: str) -> tuple[str, ...]:
    """A targets option as a tuple in the canonical order ("q,v" or a sequence of names)."""
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    bad = [t for t in names if t not in PROJECTIONS]
    if bad:
        raise UserError(f"{method} target {bad[0]!r} is not a projection; choose among {', '.join(PROJECTIONS)}")
    if not names:
        raise UserError(f"{method} needs at least one target among {', '.join(PROJECTIONS)}")
    return tuple(p for p in PROJECTIONS if p in names)


class Adapter(nn.Module):
    """Base class: a method's config plus only its own parameters.

    Subclasses set `method` (registry name) and `config_cls`, build parameters in
    `__init__(config, args)` and implement `layer_state` (or `state`, where the states do not
    depend on the prompt). Parameters are kept in float32; states are cast to the model's dtype.
    """

    method: str = ""
    n_prefix: int = 0  # extra key/value entries each layer places before the text
    template: str | None = None  # the prompt template it was trained with (set by adapter files)
    shardable: bool = True  # False: its generators call base weights outside the blocks' forward (FSDP)

    def __init__(self, config, args: ModelArgs):
        super().__init__()
        self.config, self.args = config, args
        self.layer_pass = LayerPass()  # `states` of the pass over the layers under way

    def prefix_rows(self, batch: int, device) -> torch.Tensor:
        """How many of the `n_prefix` slots each row uses (all of them, unless mixed)."""
        return torch.full((batch,), self.n_prefix, dtype=torch.long, device=device)

    def layer_state(self, i: int, h: torch.Tensor, pool_mask: torch.Tensor, model) -> LayerState | None:
        """Layer i's state, given the hidden states h entering it (prompt positions: pool_mask).
        A method whose states do not depend on the prompt implements `states(dtype)` (all
        layers', built at once at a pass's first layer) or `state(i, dtype)` instead."""
        return self.layer_pass.get(i, self.args.n_layers, lambda: self.states(h.dtype))

    def states(self, dtype) -> list[LayerState]:
        """Every layer's state, for methods whose states do not depend on the prompt."""
        return [self.state(i, dtype) for i in range(self.args.n_layers)]

    def state(self, i: int, dtype) -> LayerState:
        raise NotImplementedError

    # True: layer_state also takes `rows`, each row's own parameters (per_row), so that tenants
    # of this class with equal configs run as one generator call in a Mixture.
    mixable: bool = False

    @classmethod
    def mixed_layer_state(
        cls, adapters: list, which: torch.Tensor, i: int, h: torch.Tensor, pool_mask: torch.Tensor, model
    ) -> LayerState | None:
        """Layer i's state for rows whose adapter is adapters[which[b]] (all of this class and
        config): what each one's layer_state gives its rows, in one call (mixable methods)."""
        return adapters[0].layer_state(i, h, pool_mask, model, rows=per_row(adapters, which))

    def own(self, rows=None):
        """param(get): get(self), this adapter's parameter; or, given `rows` (per_row), each
        row's own, stacked (B, ...)."""
        return rows or (lambda get: get(self))

    def low_rank(self) -> dict | None:
        """The update, if all of it is a low-rank update that does not depend on the prompt:
        {proj: (A (L, in, r), B (L, r, out), scale)} over the L layers, y_proj += scale * x @ A[i]
        @ B[i] at layer i. A Mixture places many tenants' parts side by side from these, for
        all layers at once, without fusing each one's first."""
        return None

    # Why merge() is refused, for methods that cannot fold into the base weights.
    merge_refusal = "it generates its parameters from each prompt at prefill"

    def merge(self, model):
        """A copy of `model` with this adapter folded into its weights (mergeable methods only)."""
        raise UserError(f"{self.method} cannot be merged into the base weights: {self.merge_refusal}; use it unmerged")


# No trained adapter holds a value, nor sets a float option, near this magnitude. A diverged run
# (--lr 1e30) writes values that are finite yet overflow to inf once used, as does a LoRA alpha
# of 1e308: refusing them where they enter keeps NaN out of every output.
ABSURD = 1e6


def check_values(adapter, name: str = "the adapter"):
    """Refuse (UserError naming `name`) an adapter whose tensors hold NaN, infinity or values
    beyond ABSURD, or whose config fails its checks (edited since it was made): in use they
    give NaN. Every entry that uses or writes an adapter calls this; one fused max per tensor
    and one device-to-host read."""
    for m in adapter.modules():  # a Mixture's members too
        if isinstance(m, Adapter) and m.config is not None:
            try:
                type(m.config)(**config_dict(m.config))  # the config class checks each field
            except (TypeError, ValueError, UserError) as e:
                raise UserError(f"{name}: bad {m.method} config: {e}") from None
    items = [(k, t.detach()) for k, t in adapter.state_dict().items() if t.is_floating_point() and t.numel()]
    if not items:
        return
    peaks = torch.stack(torch._foreach_norm([t for _, t in items], math.inf)).float().cpu()
    bad = (~(peaks <= ABSURD)).nonzero()  # NaN compares false
    if len(bad):
        k, peak = items[int(bad[0])][0], float(peaks[int(bad[0])])
        what = "NaN or infinite values" if not math.isfinite(peak) else f"values up to {peak:.3g} in magnitude"
        raise UserError(
            f"{name}: tensor {k} holds {what} (a trained adapter stays within {ABSURD:g}): "
            "the adapter is damaged or its training diverged"
        )


class LayerPass:
    """States that do not depend on the prompt, built for all layers at once at the first layer
    of a pass over them (a forward, a prefill) and handed out layer by layer, in the ops that
    one layer's took (LoRA's fusing: 37 a layer, 1184 small kernels in a 7B's prefill). A pass
    that starts again, or a call out of order, builds them again; the last layer lets them go.
    Kept per thread, so that passes in two threads never hand out each other's states."""

    def __init__(self):
        self.passes = {}  # thread id -> (built, the layer expected next)

    def get(self, i: int, n_layers: int, build):
        """Layer i's item of build() (a list over the layers), built at this pass's first call."""
        me = 0 if torch.compiler.is_compiling() else threading.get_ident()  # (a compiled pass is one graph)
        built, expected = self.passes.get(me, (None, 0))
        if i == 0 or i != expected:  # (no pass under way: expected is 0)
            built = build()
        if i + 1 == n_layers:
            self.passes.pop(me, None)
        else:
            self.passes[me] = (built, i + 1)
        return built[i]


def per_row(adapters: list, which: torch.Tensor):
    """For mixed_layer_state: rows(param) is param(adapter) for each row's adapter, (B, ...)."""
    return lambda param: torch.stack([param(a) for a in adapters])[which]


def row_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, n) times w (n, m), or times each row's own w (B, n, m): (B, m)."""
    return x @ w if w.dim() == 2 else (x[:, None] @ w)[:, 0]


INPUT_NORMS = ("rms", "none")


def check_input_norm(kind: str, method: str):
    if kind not in INPUT_NORMS:
        raise UserError(f"unknown {method} input_norm {kind!r}; use one of {', '.join(INPUT_NORMS)}", ("input_norm",))


def generator_input(h: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """What a prompt-aware generator reads of the hidden states h (..., d): with kind "rms",
    h / sqrt(mean(h^2) + eps) over the feature axis, per position, in float32 (docs/methods.md,
    "Generator inputs": what a pre-norm block's sub-layers read,
    without their learned scale); with "none", h itself (its dtype kept: the poolers cast
    what they pick)."""
    if kind == "none":
        return h
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


def config_dict(config) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config)}


class MethodConfig:
    """Base of every method's config dataclass: each field's type and range are checked when a
    config is made, whoever makes it (an adapter file, a PEFT config, a command-line flag, a
    Python call), by the one rule of minipara.checks: the type is the default's; counts
    (ints) are at least 1, numbers finite, flags true or false, names strings, projection lists
    strings or lists of strings.

    `before_field`: {field: value} for fields added after adapter files of the method were
    already written: a stored config without the field gets this value, not the default, so
    an old file keeps the behaviour (and tokens) it had."""

    before_field: ClassVar[dict] = {}

    @classmethod
    def stored(cls, config: dict) -> dict:
        """A config as stored by an older minipara, with the fields it could not know filled in."""
        return {**cls.before_field, **config}

    def __post_init__(self):
        method = getattr(self, "method_name", type(self).__name__.removesuffix("Config").lower())
        check_fields(self, f"{method} option ", least=1)
        for f in fields(self):  # (1e308 is finite, but overflows to inf in use)
            v = getattr(self, f.name)
            if kind(f) is float and abs(v) > ABSURD:
                raise UserError(
                    f"{method} option {f.name} must be a finite number within {ABSURD:g} in magnitude, got {v!r}",
                    (f.name,),
                )
