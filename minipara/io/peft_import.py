"""Load LoRA and (IA)^3 adapters saved by HF PEFT (`save_pretrained`) as minipara adapters.

A PEFT adapter is a directory with `adapter_config.json` and `adapter_model.safetensors`.
Tensors are named after the HF module they adapt, e.g.

    base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight   (r, in)
    base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight   (out, r)
    base_model.model.model.layers.3.mlp.down_proj.ia3_l              (1, in) or (out, 1)

(older files may carry the adapter name: `.lora_A.default.weight`). Only what minipara
represents exactly is accepted; anything else is refused with a one-line UserError that
says why, rather than loaded approximately. Every tensor's shape is checked against the
model, which is how an adapter made for another base model is caught.
"""

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minipara.errors import UserError
from minipara.methods.base import check_values
from minipara.methods.ia3 import IA3, IA3Config
from minipara.methods.lora import Lora, LoraConfig
from minipara.model.config import ModelArgs, read_json_object
from minipara.model.projections import HF_MODULES, PROJECTIONS, in_sizes, out_sizes

MODULES = {m: p for p, m in HF_MODULES.items()}  # HF module (relative to a decoder layer) -> our projection
_TENSOR = re.compile(
    r"(?:.*\.)?layers\.(?P<layer>\d+)\.(?P<module>self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)"
    r"\.(?P<kind>lora_A|lora_B|ia3_l)(?:\.default)?(?:\.weight)?"
)

# Config fields whose non-default values change what the adapter computes, with the reason.
_LORA_REFUSED = {
    "modules_to_save": "it also trains whole modules (modules_to_save)",
    "use_dora": "it is DoRA (use_dora), whose magnitude vectors minipara's LoRA does not have",
    "rank_pattern": "it uses per-module ranks (rank_pattern)",
    "alpha_pattern": "it uses per-module alphas (alpha_pattern)",
    "layers_to_transform": "it adapts only some layers (layers_to_transform)",
    "exclude_modules": "it excludes modules from its targets (exclude_modules)",
    "lora_bias": "its lora_B has a bias (lora_bias)",
    "layer_replication": "it replicates base layers (layer_replication)",
    "target_parameters": "it adapts parameters rather than modules (target_parameters)",
    "trainable_token_indices": "it also trains token embeddings (trainable_token_indices)",
    "alora_invocation_tokens": "it is an activated LoRA (alora_invocation_tokens)",
    "use_qalora": "it is QA-LoRA (use_qalora)",
    "use_bdlora": "it is a block-diagonal LoRA (use_bdlora)",
    "arrow_config": "it routes between several LoRAs (arrow_config)",
    "kasa_config": "it is KaSA (kasa_config)",
    "monteclora_config": "it is MonteCLoRA (monteclora_config)",
    "velora_config": "it is VeLoRA (velora_config)",
    "fan_in_fan_out": "its weights are stored transposed for Conv1D layers (fan_in_fan_out)",
}
_IA3_REFUSED = {k: _LORA_REFUSED[k] for k in ("modules_to_save", "exclude_modules", "fan_in_fan_out")}
# Initialisations that rewrite the base weights (W - BA): the adapter only fits that changed base.
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def load_peft_adapter(path, args: ModelArgs):
    """The minipara Lora or IA3 adapter (float32, CPU) equal to the PEFT adapter in `path`,
    for a base model with `args`."""
    path = Path(path)
    cfg = _config(path)
    kind = cfg.get("peft_type")
    if kind not in ("LORA", "IA3"):
        raise UserError(f"{path}: PEFT adapter type {kind!r} is not supported; minipara imports LORA and IA3")
    tensors = _tensors(path)
    refused = _LORA_REFUSED if kind == "LORA" else _IA3_REFUSED
    for key, why in refused.items():
        if _is_set(cfg.get(key)):
            raise UserError(f"{path}: cannot import this {kind} adapter exactly: {why}")
    parts = _parts(path, tensors, args)
    targets = _matching(path, cfg.get("target_modules"), "target_modules")
    adapter = (_lora if kind == "LORA" else _ia3)(path, cfg, tensors, parts, targets, args)
    check_values(adapter, str(path))
    return adapter


def _is_set(value) -> bool:
    """Whether a config field holds something other than PEFT's "off" defaults
    (layers_to_transform may be the int 0, which is set)."""
    return value is not None and value is not False and value not in ([], {}, "")


def _config(path: Path) -> dict:
    f = path / "adapter_config.json"
    if not f.is_file():
        raise UserError(f"{path} is not a PEFT adapter directory: {f.name} is missing")
    return read_json_object(f)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    f = path / "adapter_model.safetensors"
    if not f.is_file():
        if (path / "adapter_model.bin").is_file():
            # A .bin is a pickle, which can run code when loaded: never open one.
            raise UserError(
                f"{path} holds adapter_model.bin (a pickle, which minipara does not load); re-save the "
                "adapter with save_pretrained(..., safe_serialization=True) to get adapter_model.safetensors"
            )
        raise UserError(f"{path} has no adapter_model.safetensors")
    try:
        with safe_open(str(f), framework="pt") as h:
            return {k: h.get_tensor(k) for k in h.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{f} is damaged or truncated ({e})") from None


def _parts(path: Path, tensors: dict, args: ModelArgs) -> dict[tuple[int, str, str], str]:
    """(layer, projection, lora_A|lora_B|ia3_l) -> tensor name, refusing any other tensor."""
    out = {}
    for name in sorted(tensors):
        m = _TENSOR.fullmatch(name)
        if m is None:
            raise UserError(
                f"{path}: tensor {name} adapts something other than a layer's attention/MLP "
                "projections, which minipara cannot import"
            )
        i = int(m["layer"])
        if i >= args.n_layers:
            raise UserError(
                f"{path}: tensor {name} is for layer {i}, but the model has {args.n_layers} layers "
                "(adapter made for another base model?)"
            )
        key = (i, MODULES[m["module"]], m["kind"])
        if key in out:
            raise UserError(f"{path}: tensors {out[key]} and {name} are the same adapter weight")
        out[key] = name
    return out


def _matching(path: Path, spec, field: str) -> set[str]:
    """Our projections that a PEFT target_modules/feedforward_modules value selects, with
    PEFT's matching rules (a string is a full-match regex over module names; a list entry
    matches a module name equal to it or ending in '.' + it)."""
    names = {f"model.layers.0.{m}": p for m, p in MODULES.items()}
    if not spec:
        return set()
    if spec == "all-linear":
        return set(PROJECTIONS)
    if not isinstance(spec, (str, list)) or isinstance(spec, list) and not all(isinstance(t, str) for t in spec):
        raise UserError(f"{path}: {field} must be a string or a list of strings, got {spec!r}")
    if isinstance(spec, str):
        try:
            return {p for n, p in names.items() if re.fullmatch(spec, n)}
        except re.error as e:
            raise UserError(f"{path}: {field} {spec!r} is not a valid regular expression ({e})") from None
    found = set()
    for t in spec:
        hit = {p for n, p in names.items() if n == t or n.endswith("." + t)}
        if not hit:
            raise UserError(
                f"{path}: {field} entry {t!r} is not one of the projections minipara adapts "
                f"({', '.join(m.split('.')[1] for m in MODULES)})"
            )
        found |= hit
    return found


def _expect(path: Path, parts: dict, tensors: dict, key: tuple, shape: tuple, args: ModelArgs) -> torch.Tensor:
    """The tensor for (layer, projection, kind), checked to have `shape`; taken out of `parts`."""
    i, p, kind = key
    if key not in parts:
        sfx = ".weight" if kind.startswith("lora") else ""
        raise UserError(f"{path}: tensor base_model.model.model.layers.{i}.{HF_MODULES[p]}.{kind}{sfx} is missing")
    name = parts.pop(key)
    if tuple(tensors[name].shape) != shape:
        raise UserError(
            f"{path}: tensor {name} has shape {list(tensors[name].shape)}, this {args.model_type} "
            f"model needs {list(shape)} (adapter made for another base model?)"
        )
    return tensors[name].float()


def _leftover(path: Path, parts: dict):
    if parts:
        name = next(iter(parts.values()))
        raise UserError(f"{path}: tensor {name} is not for a module in the config's target_modules")


def _lora(path, cfg, tensors, parts, targets, args) -> Lora:
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise UserError(
            f"{path}: this LoRA was initialised with {init!r}, which changes the base weights; re-save "
            "it with save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA"
        )
    if cfg.get("bias", "none") != "none":
        raise UserError(f"{path}: cannot import this LORA adapter exactly: it trains biases (bias={cfg['bias']!r})")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        raise UserError(f"{path}: adapter_config.json needs a positive integer 'r' and a number 'lora_alpha'")
    if not targets:
        raise UserError(f"{path}: target_modules selects none of the projections minipara adapts")
    try:  # LoraConfig checks each value's type and range (a JSON true is no alpha, NaN no number)
        config = LoraConfig(r=r, alpha=alpha, targets=tuple(sorted(targets)), rslora=cfg.get("use_rslora") or False)
    except UserError as e:
        raise UserError(f"{path}: adapter_config.json: {e}") from None
    ad = Lora(config, args)
    ins, outs = in_sizes(args), out_sizes(args)
    with torch.no_grad():
        for i in range(args.n_layers):
            for p in ad.config.targets:
                ad.a[p][i] = _expect(path, parts, tensors, (i, p, "lora_A"), (r, ins[p]), args).T
                ad.b[p][i] = _expect(path, parts, tensors, (i, p, "lora_B"), (outs[p], r), args).T
    _leftover(path, parts)
    return ad


def _ia3(path, cfg, tensors, parts, targets, args) -> IA3:
    ff = _matching(path, cfg.get("feedforward_modules"), "feedforward_modules")
    if ff - targets:
        raise UserError(f"{path}: feedforward_modules must be a subset of target_modules")
    if ff - {"down"}:
        p = sorted(ff - {"down"})[0]
        raise UserError(
            f"{path}: {HF_MODULES[p]} is a feedforward module, so PEFT scales its input, which output "
            "scaling cannot express; only down_proj may be a feedforward module"
        )
    # down's input is act(gate) * up, so scaling it equals scaling the up output.
    ours = {"up" if p == "down" and p in ff else p for p in targets}
    if not ours:
        raise UserError(f"{path}: target_modules selects none of the projections minipara adapts")
    ad = IA3(IA3Config(targets=tuple(ours)), args)
    outs = out_sizes(args)
    with torch.no_grad():
        for i in range(args.n_layers):
            for p in targets:
                if p in ff:  # (1, in) on the input of down_proj
                    ad.scale["up"][i] *= _expect(path, parts, tensors, (i, p, "ia3_l"), (1, args.ffn_dim), args)[0]
                else:
                    ad.scale[p][i] *= _expect(path, parts, tensors, (i, p, "ia3_l"), (outs[p], 1), args)[:, 0]
    _leftover(path, parts)
    return ad
