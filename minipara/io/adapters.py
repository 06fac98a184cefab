"""Adapter files: one `.safetensors` file per adapter, no pickle.

The file holds the adapter's state_dict tensors and a string metadata header:

    format          "minipara-adapter"
    format_version  "1"
    method          registry name (minipara.methods.METHODS)
    config          JSON of the method's config dataclass
    base            JSON record of the base model (minipara.io.identity): model_type, n_layers, dim,
                    vocab_size, config_hash (sha256 of the canonical JSON of all ModelArgs fields)
                    and weights (a fingerprint of the checkpoint's values)
    base_args       that canonical JSON itself, so a mismatch can name the differing fields

The header's JSON is written with sorted keys, so identical adapters are identical files.
Loading checks each of these and refuses a file that does not fit with a one-line
UserError saying what is wrong; other weights of the same architecture only warn.
Tensors must be floating point and finite. A directory holding `adapter_config.json` is a PEFT
adapter and goes through minipara.io.peft_import.
"""

import dataclasses
import json
import math
import re
import struct
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from minipara.errors import UserError
from minipara.io.checkpoints import all_finite
from minipara.io.files import atomic_write
from minipara.io.identity import base_record, canonical_args, compare_base
from minipara.methods import METHODS, construct, method_class
from minipara.methods.base import config_dict
from minipara.model.config import ModelArgs

FORMAT = "minipara-adapter"
FORMAT_VERSION = 1
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


class BaseModelWarning(UserWarning):
    """An adapter made on other weights of the same architecture (say, the base model's adapter
    on its chat variant): allowed, but the user should know."""


def save_adapter(path, adapter, model_args: ModelArgs, template: str | None = None, weights_id: str | None = None):
    """Write `adapter` to `path` atomically (readers see the old file or the complete new one).
    `template`: the prompt template it was trained with, so generation can use the same;
    `weights_id`: the base model's weights fingerprint (Transformer.weights_id)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory: give a file name such as {path / 'adapter.safetensors'}")
    # Clones: safetensors refuses tensors that share memory, and wants them contiguous on the CPU.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter.state_dict().items()}
    meta = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "method": adapter.method,
        "config": json.dumps(config_dict(adapter.config), sort_keys=True),
        "base": json.dumps(base_record(model_args, weights_id), sort_keys=True),
        "base_args": canonical_args(model_args),
    }
    if template is not None:
        meta["template"] = template
    atomic_write(path, lambda tmp: _write_safetensors(tensors, tmp, meta))


def _write_safetensors(tensors: dict, filename: str, metadata: dict):
    """safetensors' own bytes with the header's JSON keys sorted: its writer keeps metadata in a
    hash map, whose order changes from run to run, so identical adapters made different files."""
    data = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the tensor data to 8 bytes
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(memoryview(data)[8 + n :])


def _read_header(path: Path) -> tuple[dict, dict, dict]:
    """(metadata, {tensor name: shape}, {tensor name: dtype}) of a safetensors file, with a precise error for
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
            raise UserError(
                f"{path} is damaged or truncated: its header claims {n} bytes, the file has {size - 8} after the length"
            )
        raw = head[8:] + f.read(n - 1)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} has a damaged safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a damaged safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise UserError(f"{path} has a damaged safetensors header (__metadata__ must map names to strings)")
    try:
        shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        dtypes = {k: v["dtype"] for k, v in header.items()}
    except (TypeError, KeyError):
        raise UserError(f"{path} has a damaged safetensors header (a tensor entry lacks its shape or dtype)") from None
    return meta, shapes, dtypes


def _checked(path) -> tuple[Path, dict, dict, dict, dict]:
    """Path, metadata, tensor shapes and dtypes, and config of a minipara adapter file, whose
    format, version, method, config and tensor types are checked (not yet against a model)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"adapter file {path} does not exist")
    if not path.is_file():
        raise UserError(
            f"{path} is not a file (an adapter is one .safetensors file, or a PEFT directory with adapter_config.json)"
        )
    meta, shapes, dtypes = _read_header(path)
    if "format" not in meta:
        raise UserError(f"{path} is a safetensors file but not a minipara adapter (no 'format' in its metadata)")
    if meta["format"] != FORMAT:
        raise UserError(f"{path} is not a minipara adapter (format {meta['format']!r})")
    version = meta.get("format_version", "")
    if not re.fullmatch(r"[1-9][0-9]{0,5}", version):
        raise UserError(f"{path} has a damaged header: format_version {version!r} is not a positive integer")
    if int(version) > FORMAT_VERSION:
        raise UserError(
            f"{path} was written by a newer minipara (adapter format {version}); this version "
            f"reads format {FORMAT_VERSION} and older: upgrade minipara"
        )
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
    bad = next((k for k in sorted(dtypes) if dtypes[k] not in FLOAT_DTYPES), None)
    if bad is not None:
        raise UserError(f"{path}: tensor {bad} holds {dtypes[bad]} values; adapter tensors are floating point")
    return path, meta, shapes, dtypes, json.loads(meta["config"])


def _config(cls, config: dict, path):
    """The method's config dataclass from the stored fields (JSON lists back to tuples); fields
    newer than the file get the value that keeps its behaviour (MethodConfig.before_field), not
    the default. The config class checks each field's type and range."""
    names = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise UserError(
            f"{path}: config field(s) {', '.join(unknown)} of method {cls.method} are unknown "
            "to this version of minipara (written by a newer one?)"
        )
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in cls.config_cls.stored(config).items()}
    try:
        return cls.config_cls(**config)
    except (TypeError, ValueError, UserError) as e:
        raise UserError(f"{path}: bad {cls.method} config: {e}") from None


def check_base(path, meta: dict, args: ModelArgs, weights_id: str | None):
    """Refuse an adapter made for another model; warn for other weights of the same one."""
    refusal, warning = compare_base(json.loads(meta["base"]), meta.get("base_args"), args, weights_id)
    if refusal:
        raise UserError(f"{path}: adapter was {refusal}")
    if warning:
        warnings.warn(f"{path}: adapter was {warning}", BaseModelWarning, stacklevel=3)


def load_adapter(path, model_args: ModelArgs, weights_id: str | None = None):
    """The adapter stored at `path` (float32, on the CPU), built for `model_args`; refuses a
    file that is damaged, not an adapter, or made for another base model. `weights_id`
    (Transformer.weights_id): warn if it was made on other weights of this architecture."""
    p = Path(path)
    if p.is_dir() and (p / "adapter_config.json").is_file():
        return _load_peft(p, model_args)
    path, meta, shapes, _, config = _checked(p)
    check_base(path, meta, model_args, weights_id)
    cls = method_class(meta["method"])
    try:
        adapter = construct(cls, _config(cls, config, path), model_args)
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
        raise UserError(
            f"{path}: tensor {k} has shape {list(shapes[k])} in the file, "
            f"this {cls.method} config needs {list(want[k])}"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"{path} is damaged or truncated ({e})") from None
    bad = next((k for k in sorted(tensors) if not all_finite(tensors[k])), None)
    if bad is not None:
        raise UserError(
            f"{path}: tensor {bad} holds NaN or infinite values; the adapter is damaged (or its training diverged)"
        )
    with torch.no_grad():
        adapter.load_state_dict(tensors, strict=True)
    adapter.template = meta.get("template")  # the prompt template it was trained with, if recorded
    return adapter


def _load_peft(path: Path, model_args: ModelArgs):
    try:
        from minipara.io.peft_import import load_peft_adapter
    except ImportError as e:
        if e.name != f"{__package__}.peft_import":
            raise  # the module exists but is broken: a bug, not a user mistake
        raise UserError(
            f"{path} is a PEFT adapter directory, but this minipara cannot import PEFT "
            "adapters (minipara.io.peft_import is missing)"
        ) from None
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
        return {
            "method": str(config.get("peft_type", "")).lower(),
            "config": config,
            "base": {"model": config.get("base_model_name_or_path")},
            "params": sum(math.prod(s) for s in shapes.values()),
            "format_version": "peft",
        }
    path, meta, shapes, _, config = _checked(p)
    return {
        "method": meta["method"],
        "config": config,
        "base": json.loads(meta["base"]),
        "params": sum(math.prod(s) for s in shapes.values()),
        "format_version": int(meta["format_version"]),
    }
