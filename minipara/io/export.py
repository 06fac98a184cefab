"""Adapters out of minipara, for the tools people already serve with.

- `export_peft`: a LoRA or (IA)^3 adapter as an HF PEFT directory (`adapter_config.json` +
  `adapter_model.safetensors`), which `peft.PeftModel.from_pretrained` loads onto the HF
  model (and vLLM or llama.cpp's converter read). It is the reverse of peft_import.py, with
  the same tensor names: `base_model.model.model.layers.N.<module>.lora_A.weight` (r, in),
  `lora_B.weight` (out, r), `ia3_l` (out, 1).
- `export_merged`: the base model with a LoRA, (IA)^3 or BitFit adapter folded into its
  weights, as an HF-format model directory that transformers loads as it is.

The prompt-aware methods (PARA, PEDRO, PARADE, IAPT) make their parameters from each prompt,
which neither a PEFT file nor a fixed checkpoint can hold: they are refused, as are the
methods PEFT has no exact counterpart for (BitFit, P-tuning v2).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from minipara.errors import UserError
from minipara.io.checkpoints import hf_state_dict
from minipara.methods import PROMPT_AWARE
from minipara.methods.base import check_values
from minipara.model.config import read_json_object
from minipara.model.projections import HF_MODULES

PREFIX = "base_model.model.model.layers"
# Files of a model directory that export_merged writes anew rather than copies.
_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", ".complete")


def _refuse(adapter, what: str, allowed: tuple[str, ...]):
    method = getattr(adapter, "method", type(adapter).__name__)
    if method in PROMPT_AWARE:
        raise UserError(
            f"{method} adapters cannot be exported {what}: they generate their parameters from each "
            "prompt at prefill, which no fixed weights can express; serve them with minipara"
        )
    if method == "mixture":
        raise UserError(f"a mixture of adapters cannot be exported {what}: export each adapter on its own")
    if method not in allowed:
        hint = "; export_merged folds it into the base weights" if method == "bitfit" else ""
        raise UserError(f"{method} adapters cannot be exported {what}: only {', '.join(allowed)} can{hint}")


def export_peft(adapter, out_dir, base_model: str | None = None) -> Path:
    """Write a LoRA or (IA)^3 `adapter` as a PEFT adapter directory `out_dir` (which must not
    exist yet, or be empty); `base_model` is recorded as base_model_name_or_path."""
    _refuse(adapter, "to PEFT", ("lora", "ia3"))
    check_values(adapter, "the adapter to export")
    common = {
        "base_model_name_or_path": base_model,
        "task_type": "CAUSAL_LM",
        "inference_mode": True,
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "revision": None,
    }
    tensors = {}
    targets = list(adapter.config.targets)
    with torch.no_grad():
        if adapter.method == "lora":
            c = adapter.config
            config = {
                "peft_type": "LORA",
                "r": c.r,
                "lora_alpha": c.alpha,
                "use_rslora": c.rslora,
                "lora_dropout": 0.0,
                "bias": "none",
                "init_lora_weights": True,
                **common,
            }
            for p in targets:
                for i in range(adapter.args.n_layers):
                    name = f"{PREFIX}.{i}.{HF_MODULES[p]}"
                    tensors[f"{name}.lora_A.weight"] = adapter.a[p][i].T  # (r, in)
                    tensors[f"{name}.lora_B.weight"] = adapter.b[p][i].T  # (out, r)
        else:
            # minipara scales outputs; PEFT does too for modules outside feedforward_modules.
            config = {"peft_type": "IA3", "feedforward_modules": [], "init_ia3_weights": True, **common}
            for p in targets:
                for i in range(adapter.args.n_layers):
                    tensors[f"{PREFIX}.{i}.{HF_MODULES[p]}.ia3_l"] = adapter.scale[p][i][:, None]  # (out, 1)
    config["target_modules"] = [HF_MODULES[p].split(".")[1] for p in targets]
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}

    def write(tmp: Path):
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    return _write_dir(Path(out_dir), write)


def export_merged(model, adapter, out_dir, source_dir) -> Path:
    """Write `model` with `adapter` (LoRA, (IA)^3 or BitFit; None for none) folded into its
    weights as an HF-format directory `out_dir`: config.json (the one in `source_dir`, with
    the biases BitFit adds declared), model.safetensors in the model's dtype, and the
    tokenizer and other files of `source_dir` copied."""
    if adapter is not None:
        _refuse(adapter, "as a merged model", ("lora", "ia3", "bitfit"))
        check_values(adapter, "the adapter to merge")
        model = adapter.merge(model)
    a = model.args
    if a.mlp_bias and a.model_type != "llama":
        raise UserError(
            f"transformers' {a.model_type} models have no MLP biases, so a BitFit adapter on "
            "gate/up/down cannot be written as their checkpoint: train BitFit with targets q,k,v,o "
            "for this model, or serve the adapter unmerged"
        )
    source = Path(source_dir)
    config = read_json_object(source / "config.json")
    if config.get("model_type") == "gemma3" and "text_config" in config:  # only the text model is kept
        config = {**config["text_config"], "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]}
    config["attention_bias"] = a.attention_bias
    if a.mlp_bias:
        config["mlp_bias"] = True
    dtype = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    config["dtype"] = config["torch_dtype"] = dtype  # the new and the old spelling
    tensors = {k: v.to("cpu") for k, v in hf_state_dict(model).items()}

    def write(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for f in source.iterdir():
            if (
                f.is_file()
                and f.name not in _WEIGHT_FILES
                and not f.name.startswith("model-")
                and f.suffix not in (".gguf", ".bin", ".pt", ".pth")
            ):
                shutil.copy2(f, tmp / f.name)

    return _write_dir(Path(out_dir), write)


def _write_dir(out: Path, write) -> Path:
    """Run write(tmp) in a temporary sibling directory, then rename it to `out`: readers see
    no directory or a complete one. An existing non-empty `out` is never overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty directory: choose a new output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an export is an ordinary directory
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
