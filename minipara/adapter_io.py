"""Adapter files: one `.safetensors` file per adapter, no pickle.

The file holds the adapter's state_dict tensors and a string metadata header:

    format          "minipara-adapter"
    format_version  "1"
    method          registry name (minipara.methods.METHODS)
    config          JSON of the method's config dataclass
    base            JSON fingerprint of the base model: model_type, n_layers, dim, vocab_size
                    and config_hash, the sha256 of the canonical JSON of all ModelArgs fields
    base_args       that canonical JSON itself, so a mismatch can name the differing fields

Loading checks each of these and refuses a file that does not fit with a one-line
UserError saying what is wrong. A directory holding `adapter_config.json` is a PEFT
adapter and goes through minipara.peft_import.
"""
import dataclasses
import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelArgs
from .errors import UserError
from .methods import METHODS, method_class
from .methods.base import config_dict

FORMAT = "minipara-adapter"
FORMAT_VERSION = 1
FINGERPRINT = ("model_type", "n_layers", "dim", "vocab_size")


def canonical_args(args: ModelArgs) -> str:
    """All ModelArgs fields as canonical JSON (tuples become lists, keys sorted)."""
    return json.dumps(dataclasses.asdict(args), sort_keys=True, separators=(",", ":"))


def base_fingerprint(args: ModelArgs) -> dict:
    fp = {k: getattr(args, k) for k in FINGERPRINT}
    fp["config_hash"] = hashlib.sha256(canonical_args(args).encode()).hexdigest()
    return fp


def save_adapter(path, adapter, model_args: ModelArgs, template: str | None = None):
    """Write `adapter` to `path` atomically: a temporary file in the same folder, then
    os.replace, so readers see the old file or the complete new one, never half a file.
    `template`: the prompt template it was trained with, so generation can use the same."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: give a file name such as {path / 'adapter.safetensors'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Clones: safetensors refuses tensors that share memory, and wants them contiguous on the CPU.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "method": adapter.method,
        "config": json.dumps(config_dict(adapter.config), sort_keys=True),
        "base": json.dumps(base_fingerprint(model_args), sort_keys=True),
        "base_args": canonical_args(model_args),
    }
    if template is not None:
        meta["template"] = template
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; an adapter is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _read_header(path: Path) -> tuple[dict, dict]:
    """(metadata, {tensor name: shape}) of a safetensors file, with a precise error for
    files that are not one or are damaged."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        if len(head) < 8:
            raise UserError(f"{path} is not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] != b"{":
            raise UserError(f"{path} is not a safetensors file")
        if 8 + n > size:
            raise UserError(f"{path} is damaged or truncated: its header claims {n} bytes, "
                            f"the file has {size - 8} after the length")
        raw = head[8:] + f.read(n - 1)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} has a damaged safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a damaged safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    try:
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    except (TypeError, KeyError):
        raise UserError(f"{path} has a damaged safetensors header (a tensor entry lacks its shape)") from None
    return meta, shapes


def _checked(path) -> tuple[Path, dict, dict, dict]:
    """Path, metadata, tensor shapes and config of a minipara adapter file, whose format,
    version, method and config are checked (not yet against a model)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"adapter file {path} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is not a file (an adapter is one .safetensors file, "
                        "or a PEFT directory with adapter_config.json)")
    meta, shapes = _read_header(path)
    if "format" not in meta:
        raise UserError(f"{path} is a safetensors file but not a minipara adapter (no 'format' in its metadata)")
    if meta["format"] != FORMAT:
        raise UserError(f"{path} is not a minipara adapter (format {meta['format']!r})")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise UserError(f"{path} has a damaged header: format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer minipara (adapter format {version}); this version "
                        f"reads format {FORMAT_VERSION} and older: upgrade minipara")
    method = meta.get("method")
    if method not in METHODS:
        raise UserError(f"{path} holds an adapter of unknown method {method!r}; known methods: {', '.join(METHODS)}")
    for key in ("config", "base"):
        try:
            value = json.loads(meta.get(key, ""))
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise UserError(f"{path} has a damaged header: '{key}' is missing or not a JSON object")
    return path, meta, shapes, json.loads(meta["config"])


def _config(cls, config: dict, path):
    """The method's config dataclass from the stored fields (JSON lists back to tuples)."""
    fields = {f.name: f for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise UserError(f"{path}: config field(s) {', '.join(unknown)} of method {cls.method} are unknown "
                        "to this version of minipara (written by a newer one?)")
    for k, v in config.items():
        if isinstance(v, list) and "tuple" in str(fields[k].type):
            config[k] = tuple(v)
    try:
        return cls.config_cls(**config)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{path}: bad {cls.method} config: {e}") from None


def _check_base(path, meta: dict, args: ModelArgs):
    saved, here = json.loads(meta["base"]), base_fingerprint(args)

    def describe(fp):
        vocab = f", vocabulary {fp.get('vocab_size')}" if saved.get("vocab_size") != here["vocab_size"] else ""
        return f"{fp.get('model_type')} with {fp.get('n_layers')} layers, dim {fp.get('dim')}{vocab}"
    if any(saved.get(k) != here[k] for k in FINGERPRINT):
        raise UserError(f"{path}: adapter was trained for {describe(saved)}; this model is {describe(here)}")
    if saved.get("config_hash") != here["config_hash"]:
        detail = ""
        try:
            old, new = json.loads(meta["base_args"]), json.loads(canonical_args(args))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            detail = ": " + "; ".join(f"{k} {old.get(k)!r} in the adapter, {new.get(k)!r} here" for k in diff)
        except (KeyError, json.JSONDecodeError, AttributeError):
            pass
        raise UserError(f"{path}: adapter was trained for a {here['model_type']} model of the same shape "
                        f"but the model configs differ{detail}")


def load_adapter(path, model_args: ModelArgs):
    """The adapter stored at `path` (float32, on the CPU), built for `model_args`; refuses a
    file that is damaged, not an adapter, or made for another base model."""
    p = Path(path)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return _load_peft(p, model_args)
    path, meta, shapes, config = _checked(p)
    _check_base(path, meta, model_args)
    cls = method_class(meta["method"])
    try:
        adapter = cls(_config(cls, config, path), model_args)
    except (ValueError, UserError) as e:  # a config the method refuses
        raise UserError(f"{path}: bad {cls.method} config: {e}") from None
    want = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    missing, extra = sorted(set(want) - set(shapes)), sorted(set(shapes) - set(want))
    if missing:
        k = missing[0]
        raise UserError(f"{path}: tensor {k} {list(want[k])} is missing from the file")
    if extra:
        k = extra[0]
        raise UserError(f"{path}: unexpected tensor {k} {list(shapes[k])} (not part of a {cls.method} adapter)")
    wrong = [k for k in sorted(want) if shapes[k] != want[k]]
    if wrong:
        k = wrong[0]
        raise UserError(f"{path}: tensor {k} has shape {list(shapes[k])} in the file, "
                        f"this {cls.method} config needs {list(want[k])}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"{path} is damaged or truncated ({e})") from None
    with torch.no_grad():
        adapter.load_state_dict(tensors, strict=True)
    adapter.template = meta.get("template")  # the prompt template it was trained with, if recorded
    return adapter


def _load_peft(path: Path, model_args: ModelArgs):
    try:
        from .peft_import import load_peft_adapter
    except ImportError as e:
        if e.name != f"{__package__}.peft_import":
            raise  # the module exists but is broken: a bug, not a user mistake
        raise UserError(f"{path} is a PEFT adapter directory, but this minipara cannot import PEFT "
                        "adapters (minipara.peft_import is missing)") from None
    return load_peft_adapter(path, model_args)


def adapter_info(path) -> dict:
    """What an adapter file holds, without building it: method, config, base fingerprint,
    parameter count and format version (for the command-line scripts). A PEFT directory
    gives its adapter_config.json and the count of its adapter_model.safetensors."""
    p = Path(path)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        try:
            config = json.loads((p / "adapter_config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{p / 'adapter_config.json'} is not valid JSON") from None
        if not isinstance(config, dict):
            raise UserError(f"{p / 'adapter_config.json'} must hold a JSON object")
        weights = p / "adapter_model.safetensors"
        shapes = _read_header(weights)[1] if weights.is_file() else {}
        return {"method": str(config.get("peft_type", "")).lower(), "config": config,
                "base": {"model": config.get("base_model_name_or_path")},
                "params": sum(math.prod(s) for s in shapes.values()), "format_version": "peft"}
    path, meta, shapes, config = _checked(p)
    return {"method": meta["method"], "config": config, "base": json.loads(meta["base"]),
            "params": sum(math.prod(s) for s in shapes.values()), "format_version": int(meta["format_version"])}
