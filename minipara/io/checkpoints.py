"""Load HF-format checkpoints (`model.safetensors`, or shards with an index) as they are.

The model is built on the meta device and each parameter is filled from the
file(s) one tensor at a time, so peak memory stays near the model's size. Every
tensor name and shape is checked against the config before anything is copied, and
every value is checked to be finite once copied (a NaN weight would otherwise decode
as silent garbage).
"""

import hashlib
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from minipara.checks import short
from minipara.errors import UserError
from minipara.io import weights  # by module: tests replace weights.ensure_model
from minipara.io.tokenizer import load_tokenizer
from minipara.model.config import ModelArgs, read_json_object
from minipara.model.projections import HF_MODULES
from minipara.model.transformer import Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_device(name) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if not isinstance(name, str):
        raise UserError(f"device must be cpu, cuda or cuda:N, got {short(name)}", ("device",))
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but no CUDA GPU is available; use device cpu", ("device",))
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use cpu, cuda or cuda:N")
    return dev


def parse_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _hf_linears(i: int, projections, kind: str = "weight") -> list[str]:
    return [f"model.layers.{i}.{HF_MODULES[x]}.{kind}" for x in projections]


def hf_names(args: ModelArgs) -> dict[str, list[str]]:
    """Our parameter name -> the HF tensors concatenated (along dim 0) to make it."""
    gemma3 = args.sandwich_norm
    m = {"tok_embeddings.weight": ["model.embed_tokens.weight"], "norm.weight": ["model.norm.weight"]}
    if not args.tie_embeddings:
        m["output.weight"] = ["lm_head.weight"]
    for i in range(args.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        attn = p + "self_attn."
        hf = partial(_hf_linears, i)
        m[o + "attention_norm.weight"] = [p + "input_layernorm.weight"]
        m[o + "attention.wqkv.weight"] = hf("qkv")
        m[o + "attention.wo.weight"] = hf("o")
        if args.attention_bias:
            m[o + "attention.wqkv.bias"] = hf("qkv", "bias")
            m[o + "attention.wo.bias"] = hf("o", "bias")
        m[o + "ffn.w_gate_up.weight"] = hf(["gate", "up"])
        m[o + "ffn.w_down.weight"] = hf(["down"])
        if args.mlp_bias:
            m[o + "ffn.w_gate_up.bias"] = hf(["gate", "up"], "bias")
            m[o + "ffn.w_down.bias"] = hf(["down"], "bias")
        if args.qk_norm:
            m[o + "attention.q_norm.weight"] = [attn + "q_norm.weight"]
            m[o + "attention.k_norm.weight"] = [attn + "k_norm.weight"]
        if gemma3:
            m[o + "post_attention_norm.weight"] = [p + "post_attention_layernorm.weight"]
            m[o + "ffn_norm.weight"] = [p + "pre_feedforward_layernorm.weight"]
            m[o + "post_ffn_norm.weight"] = [p + "post_feedforward_layernorm.weight"]
        else:
            m[o + "ffn_norm.weight"] = [p + "post_attention_layernorm.weight"]
    return m


def _split_sizes(args: ModelArgs, ours: str, rows: int) -> list[int]:
    """How our parameter `ours` (with `rows` rows) splits along dim 0 into its HF tensors."""
    split = {"wqkv": [args.q_dim, args.kv_dim, args.kv_dim], "w_gate_up": [args.ffn_dim, args.ffn_dim]}
    return next((v for k, v in split.items() if f".{k}." in ours), [rows])


def _hf_shapes(model: Transformer, names: dict[str, list[str]]) -> dict[str, tuple]:
    """Expected shape of every HF tensor: our fused parameter split back along dim 0."""
    params = dict(model.named_parameters())
    out = {}
    for ours, theirs in names.items():
        shape = tuple(params[ours].shape)
        for hf, r in zip(theirs, _split_sizes(model.args, ours, shape[0])):
            out[hf] = (r, *shape[1:])
    return out


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under HF names, fused projections split back: what loading reads."""
    params = dict(model.named_parameters())
    out = {}
    for ours, theirs in hf_names(model.args).items():
        p = params[ours].detach()
        for hf, part in zip(theirs, p.split(_split_sizes(model.args, ours, p.shape[0]))):
            out[hf] = part.contiguous()
    return out


def _index(path: Path) -> dict[str, Path]:
    """HF tensor name -> the file holding it."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if index.is_file():
        wmap = read_json_object(index).get("weight_map")
        if not isinstance(wmap, dict) or not all(isinstance(k, str) and isinstance(f, str) for k, f in wmap.items()):
            raise UserError(
                f"{index} is not a valid safetensors index: its weight_map must be an object "
                "mapping tensor names to shard file names"
            )
        shards = {f: path / f for f in wmap.values()}
        for f, p in shards.items():
            if Path(f).name != f or not p.is_file():
                raise UserError(f"{index} names the shard {f!r}, which is not a file in {path}")
        return {k: shards[f] for k, f in wmap.items()}
    if not single.is_file():
        raise UserError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    try:
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{single} is damaged or truncated ({e})") from None


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in t. min and max propagate NaN and expose +-inf in one read of the
    tensor: 25x faster than isfinite(t).all() on the CPU, which writes a mask first."""
    return t.numel() == 0 or all(bool(torch.isfinite(v)) for v in torch.aminmax(t.detach()))


FINGERPRINT_SAMPLES = 1024


def _sample(t: torch.Tensor) -> bytes:
    """A fixed, evenly spaced sample of a tensor's values as float32 bytes: the same weights
    give the same bytes whatever dtype the file stores them in (bf16 -> fp32 is exact)."""
    flat = t.reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
    return flat[::step][:FINGERPRINT_SAMPLES].float().numpy().tobytes()


def _copy_in(param, full) -> torch.Tensor:
    """Copy a checkpoint tensor into a parameter, or this rank's slice of it if it is sharded;
    returns what this process now holds."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):  # every rank read the file: no communication needed
        full = distribute_tensor(
            full.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
        )
        return param.to_local().copy_(full.to_local())
    return param.copy_(full)


def load_model(path, dtype="float32", device="cpu", shard=None) -> Transformer:
    """shard(model): applied on the meta device before any weight is read, e.g. FSDP2's
    fully_shard (distributed.shard_layers); each rank then reads and keeps its slice only."""
    path = Path(path)
    args = ModelArgs.from_dir(path)
    dtype, device = parse_dtype(dtype), parse_device(device) if isinstance(device, str) else device
    with torch.device("meta"):
        model = Transformer(args)
    names = hf_names(args)
    shapes = _hf_shapes(model, names)
    where = _index(path)
    # Tied checkpoints may still carry lm_head.weight; it is the embedding again.
    optional = {"lm_head.weight"} if args.tie_embeddings else set()
    missing = [n for n in shapes if n not in where]
    unexpected = sorted(set(where) - set(shapes) - optional)
    if missing:
        raise UserError(
            f"{path}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if unexpected:
        raise UserError(
            f"{path}: unexpected tensor {unexpected[0]}"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            + f" for a {args.model_type} config"
        )
    model = model.to(dtype)  # on meta: nothing is allocated in float32 first
    if shard is not None:
        model = shard(model)
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    handles = {}
    # The weights' identity, recorded in adapters and checkpoints: every tensor's name, shape and
    # 1024 evenly spaced values. A full hash would read all 13 GB of a 7B model again (~10 s);
    # another checkpoint of the same shape (a fine-tune, a chat variant) differs in nearly every
    # value, so the sample tells them apart at no measurable cost.
    fingerprint = hashlib.sha256()
    try:
        for ours, theirs in names.items():
            parts = []
            for hf in theirs:
                f = where[hf]
                if f not in handles:
                    handles[f] = safe_open(f, "pt", device="cpu")
                if tuple(handles[f].get_slice(hf).get_shape()) != shapes[hf]:
                    got = tuple(handles[f].get_slice(hf).get_shape())
                    raise UserError(f"{f.name}: tensor {hf} has shape {list(got)}, the config needs {list(shapes[hf])}")
                t = handles[f].get_tensor(hf)
                if t.is_complex() or not t.is_floating_point():
                    raise UserError(
                        f"{f.name}: tensor {hf} holds {str(t.dtype).replace('torch.', '')} values; "
                        "a checkpoint's weights are floating point"
                    )
                fingerprint.update(f"{hf}{list(t.shape)}".encode() + _sample(t))
                parts.append(t)
            with torch.no_grad():
                p = _copy_in(params[ours], parts[0] if len(parts) == 1 else torch.cat(parts))
            if not all_finite(p):  # checked once, on the copy; the file's parts only to name the culprit
                bad = next((hf for hf, x in zip(theirs, parts) if not all_finite(x)), None)
                if bad is not None:
                    raise UserError(
                        f"{where[bad]}: tensor {bad} holds NaN or infinite values; the checkpoint is damaged"
                    )
                raise UserError(
                    f"{path}: tensor {theirs[0]} overflows {str(dtype).replace('torch.', '')} "
                    "(values beyond its range); load it in float32 or bfloat16"
                )
    except (SafetensorError, OSError) as e:
        raise UserError(f"a safetensors file in {path} is damaged or truncated ({e})") from None
    finally:
        handles.clear()
    model.setup_rope()  # buffers made on the meta device hold nothing yet
    model.requires_grad_(False)
    model.weights_id = fingerprint.hexdigest()[:16]
    return model.eval()


def load_pretrained(path=None, dtype=torch.float32, device=torch.device("cpu"), shard=None):
    """(model, tokenizer, directory) from an HF-format directory, or a shipped model by name
    (gemma-3-270m, the default when path is None, or smollm2-135m-instruct), converted on first
    use. shard(model): applied before the weights are read (distributed.shard_layers)."""
    if path is None or str(path) in weights.MODELS and not Path(path).exists():
        path = weights.ensure_model(weights.DEFAULT_MODEL if path is None else str(path))
    model, tok = load_model(path, dtype, device, shard), load_tokenizer(path)
    tok.check_fits(model.args.vocab_size)
    return model, tok, path
