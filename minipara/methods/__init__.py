"""Method registry: name -> Adapter class, one module per method."""

import importlib
from dataclasses import fields

import torch

from minipara.errors import UserError
from minipara.model.transformer import n_params

_MODULES = {
    "para": ("para", "Para"),
    "pedro": ("pedro", "Pedro"),
    "parade": ("parade", "Parade"),
    "iapt": ("iapt", "Iapt"),
    "lora": ("lora", "Lora"),
    "ia3": ("ia3", "IA3"),
    "bitfit": ("bitfit", "BitFit"),
    "ptuning_v2": ("ptuning_v2", "PTuningV2"),
}
METHODS = tuple(_MODULES)
PROMPT_AWARE = ("para", "pedro", "parade", "iapt")


def method_class(name: str):
    key = name.replace("-", "_").lower()
    if key not in _MODULES:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    module, cls = _MODULES[key]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build_adapter(name: str, args, **options):
    """A fresh adapter for model args; `options` override the method's config defaults
    (unknown option names are refused, None values are ignored)."""
    cls = method_class(name)
    known = {f.name for f in fields(cls.config_cls)}
    bad = sorted(k for k, v in options.items() if v is not None and k not in known)
    if bad:
        raise UserError(f"method {cls.method} has no option {bad[0]!r}; its options: {', '.join(sorted(known))}")
    config = cls.config_cls(**{k: v for k, v in options.items() if v is not None})
    return construct(cls, config, args)


MIN_LIMIT = 2**24  # adapters of tiny test models may be a large fraction of them; none need this many


def construct(cls, config, args):
    """cls(config, args), once a build on the meta device (no memory, no time) has shown its
    parameter count is sane: not above the base model's own (nor 16M for tiny models). A typo
    such as r=10**9 would otherwise try to allocate hundreds of GB."""
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(config, args).parameters())
    limit = max(MIN_LIMIT, n_params(args))
    if n > limit:
        raise UserError(
            f"this {cls.method} config makes an adapter of {n:,} parameters; at most {limit:,} make sense "
            f"for this model (as many as the model itself): check its sizes (r, hidden sizes, prefix lengths)"
        )
    return cls(config, args)
