"""Model arguments, read from a Hugging Face `config.json`.

One dataclass covers the LLaMA and Gemma families; the family differences are
plain fields (norm offset, activation, extra norms, sliding layers), so the
model code has no `if family == ...` branches.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minipara.errors import UserError

SUPPORTED = ("llama", "gemma", "gemma3_text")


@dataclass
class ModelArgs:
    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 128
    ffn_dim: int = 11008
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # "silu" (LLaMA) or "gelu_tanh" (Gemma)
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    embed_scale: bool = False  # Gemma scales embeddings by sqrt(dim)
    qk_norm: bool = False  # Gemma 3: RMSNorm on each query and key head
    sandwich_norm: bool = False  # Gemma 3: norms after attention and FFN too
    attn_scale: float = 128**-0.5  # softmax scale (Gemma: query_pre_attn_scalar ** -0.5)
    rope_theta: float = 10000.0  # global (full-attention) layers
    rope_local_theta: float = 10000.0  # sliding-window layers
    rope_scaling: dict | None = None  # llama3-type frequency scaling, as in config.json
    sliding_window: int | None = None
    sliding: tuple[bool, ...] = field(default_factory=tuple)  # per layer: sliding-window layer?
    bos_id: int = 1
    eos_ids: tuple[int, ...] = (2,)
    pad_id: int = 0

    def __post_init__(self):
        if not self.sliding:
            self.sliding = (False,) * self.n_layers
        self.sliding = tuple(self.sliding)
        self.eos_ids = tuple(self.eos_ids)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        """Build from the dict of an HF `config.json` (old and new rope spellings). Every value
        used is checked for type and range by name, so a bad file is a one-line UserError."""
        c = Fields(cfg, where)
        mt = c.get("model_type", str)
        if mt == "gemma3" and "text_config" in cfg:  # multimodal wrapper: use its text part
            c = Fields(c.get("text_config", dict), f"{where}: text_config")
            mt = "gemma3_text"
        if mt not in SUPPORTED:
            raise UserError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
        return _READERS[mt](c)

    @classmethod
    def from_dir(cls, path) -> "ModelArgs":
        path = Path(path)
        f = path / "config.json"
        if not path.is_dir():
            raise UserError(f"model directory {path} does not exist")
        if not f.is_file():
            raise UserError(f"{f} is missing: a model directory needs an HF config.json")
        return cls.from_hf(read_json_object(f), str(f))


def read_json_object(f: Path) -> dict:
    """A JSON file that must hold an object (HF and PEFT config files)."""
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{f} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f} must hold a JSON object")
    return cfg


_REQUIRED = object()
_KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    dict: "a JSON object",
    list: "a JSON list",
}


class Fields:
    """Typed, range-checked access to a JSON object's fields, by name: the one reader of
    config.json values. null counts as absent (HF writes `"head_dim": null`)."""

    def __init__(self, cfg: dict, where: str):
        self.cfg, self.where = cfg, where

    def __contains__(self, name):
        return self.cfg.get(name) is not None

    def get(self, name: str, kind: type, default=_REQUIRED, low=None, positive=False):
        v = self.cfg.get(name)
        if v is None:
            if default is _REQUIRED:
                raise UserError(f"{self.where} lacks the field {name!r}")
            return default
        return self.check(name, v, kind, low, positive)

    def check(self, name: str, v, kind: type, low=None, positive=False):
        # bool is an int subclass in Python; JSON true is never a count. An integral float (3.0)
        # is not an integer either: HF would keep it a float and fail later. An integer is a
        # number and is kept as written (fingerprints of existing adapters hash these values).
        ok = isinstance(v, (int, float) if kind is float else kind) and not (kind is not bool and isinstance(v, bool))
        if not ok or (kind is float and not math.isfinite(v)):
            what = _KINDS[kind] if kind is not float else "a finite number"
            raise UserError(f"{self.where}: {name} must be {what}, got {json.dumps(v)}")
        if (low is not None and v < low) or (positive and v <= 0):
            raise UserError(
                f"{self.where}: {name} must be {f'at least {low}' if low is not None else 'positive'}, got {v}"
            )
        return v

    def token_id(self, name: str, vocab: int, default):
        v = self.get(name, int, default)
        if v is not None and not 0 <= v < vocab:
            raise UserError(f"{self.where}: {name} {v} is outside the vocabulary (0..{vocab - 1})")
        return v

    def sub(self, name: str) -> "Fields | None":
        v = self.get(name, dict, None)
        return None if v is None else Fields(v, f"{self.where}: {name}")


def _common(c: Fields) -> dict:
    vocab = c.get("vocab_size", int, low=1)
    dim = c.get("hidden_size", int, low=1)
    n_heads = c.get("num_attention_heads", int, low=1)
    n_kv = c.get("num_key_value_heads", int, n_heads, low=1)
    if n_heads % n_kv:
        raise UserError(f"{c.where}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    if "head_dim" not in c and dim % n_heads:
        raise UserError(
            f"{c.where}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads} "
            "(and no head_dim is given)"
        )
    eos = c.cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos_ids = tuple(Fields({"eos_token_id": e}, c.where).token_id("eos_token_id", vocab, None) for e in eos)
    else:
        eos_ids = () if eos is None else (c.token_id("eos_token_id", vocab, None),)
    pad = c.get("pad_token_id", int, 0)
    if pad < 0:  # some LLaMA configs write -1 for "no pad token"
        pad = 0
    return dict(
        model_type=c.get("model_type", str),
        vocab_size=vocab,
        dim=dim,
        n_layers=c.get("num_hidden_layers", int, low=1),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=c.get("head_dim", int, dim // n_heads, low=1),
        ffn_dim=c.get("intermediate_size", int, low=1),
        attention_bias=c.get("attention_bias", bool, False),
        bos_id=c.token_id("bos_token_id", vocab, 1 if vocab > 1 else 0),
        eos_ids=eos_ids,
        pad_id=Fields({"pad_token_id": pad}, c.where).token_id("pad_token_id", vocab, 0),
        norm_eps=c.get("rms_norm_eps", float, 1e-6, positive=True),
    )


# What every Gemma generation shares: (1 + w) norms, embeddings scaled by sqrt(dim), GELU-tanh.
_GEMMA_TRAITS = dict(activation="gelu_tanh", norm_offset=1.0, embed_scale=True)


def _rope(c: Fields, kind: str | None = None) -> dict:
    """The rope dict of one layer kind, whether written as `rope_parameters` (new) or flat (old),
    with the numbers its rope type uses checked."""
    rp = c.sub("rope_parameters")
    if rp is not None and kind and kind in rp:
        rp = rp.sub(kind)
    if rp is None or not ("rope_type" in rp or "rope_theta" in rp):
        scaling = c.sub("rope_scaling") or Fields({}, c.where)
        rp = Fields({**scaling.cfg, "rope_theta": c.cfg.get("rope_theta", 10000.0)}, scaling.where)
    rtype = _rope_type(rp.cfg)
    rp.check("rope_type", rtype, str)
    if "rope_theta" in rp:
        rp.get("rope_theta", float, positive=True)
    if rtype in ("linear", "llama3"):
        rp.get("factor", float, positive=True)
    if rtype == "llama3":
        rp.get("original_max_position_embeddings", int, low=1)
        lo = rp.get("low_freq_factor", float, 1.0, positive=True)
        hi = rp.get("high_freq_factor", float, 4.0, positive=True)
        if hi <= lo:
            raise UserError(f"{rp.where}: high_freq_factor {hi} must exceed low_freq_factor {lo}")
    return {k: v for k, v in rp.cfg.items() if v is not None}


def _rope_type(rope: dict):
    return rope.get("rope_type", rope.get("type", "default"))


def _llama(c: Fields) -> ModelArgs:
    common = _common(c)
    rope = _rope(c)
    rtype = _rope_type(rope)
    if rtype not in ("default", "llama3"):
        raise UserError(f"rope_scaling type {rtype!r} is not supported; supported: default, llama3")
    return ModelArgs(
        **common,
        max_seq_len=c.get("max_position_embeddings", int, 4096, low=1),
        tie_embeddings=c.get("tie_word_embeddings", bool, False),
        mlp_bias=c.get("mlp_bias", bool, False),
        activation="silu",
        attn_scale=common["head_dim"] ** -0.5,
        rope_theta=rope.get("rope_theta", 10000.0),
        rope_local_theta=rope.get("rope_theta", 10000.0),
        rope_scaling=rope if rtype == "llama3" else None,
    )


def _gemma(c: Fields) -> ModelArgs:
    """Gemma 1: LLaMA layout with (1 + w) norms, scaled embeddings and GELU-tanh."""
    common = _common(c)
    theta = _rope(c).get("rope_theta", 10000.0)
    return ModelArgs(
        **common,
        max_seq_len=c.get("max_position_embeddings", int, 8192, low=1),
        tie_embeddings=c.get("tie_word_embeddings", bool, True),
        **_GEMMA_TRAITS,
        attn_scale=common["head_dim"] ** -0.5,
        rope_theta=theta,
        rope_local_theta=theta,
    )


LAYER_TYPES = ("sliding_attention", "full_attention")


def _gemma3(c: Fields) -> ModelArgs:
    common = _common(c)
    n = common["n_layers"]
    types = c.get("layer_types", list, None)
    if types is None:  # older configs give only the period: every Nth layer is global
        period = c.get("sliding_window_pattern", int, c.get("_sliding_window_pattern", int, 6, low=1), low=1)
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n:
        raise UserError(f"{c.where}: layer_types has {len(types)} entries for {n} layers")
    bad = [t for t in types if t not in LAYER_TYPES]
    if bad:
        raise UserError(f"{c.where}: layer_types entry {json.dumps(bad[0])} is not one of {', '.join(LAYER_TYPES)}")
    if c.cfg.get("attn_logit_softcapping") or c.cfg.get("final_logit_softcapping"):
        raise UserError("Gemma 3 configs with logit soft-capping are not supported")
    glob, loc = _rope(c, "full_attention"), _rope(c, "sliding_attention")
    if _rope_type(glob) not in ("default", "linear"):  # long-context checkpoints scale the global rope linearly
        raise UserError(f"Gemma 3 rope_type {_rope_type(glob)!r} is not supported")
    if "rope_parameters" in c:
        local_theta = loc.get("rope_theta", 10000.0)
    else:
        local_theta = c.get("rope_local_base_freq", float, 10000.0, positive=True)
    return ModelArgs(
        **common,
        max_seq_len=c.get("max_position_embeddings", int, 131072, low=1),
        tie_embeddings=c.get("tie_word_embeddings", bool, True),
        **_GEMMA_TRAITS,
        qk_norm=True,
        sandwich_norm=True,
        attn_scale=c.get("query_pre_attn_scalar", float, 256.0, positive=True) ** -0.5,
        rope_theta=glob.get("rope_theta", 1_000_000.0),
        rope_local_theta=local_theta,
        rope_scaling=glob if _rope_type(glob) == "linear" else None,
        sliding_window=c.get("sliding_window", int, 4096, low=1),
        sliding=tuple(t == "sliding_attention" for t in types),
    )


_READERS = {"llama": _llama, "gemma": _gemma, "gemma3_text": _gemma3}


def rope_inv_freq(args: ModelArgs, local: bool) -> torch.Tensor:
    """Inverse RoPE frequencies for global or sliding layers, as HF computes them (float32)."""
    theta = args.rope_local_theta if local else args.rope_theta
    d = args.head_dim
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    sc = None if local else args.rope_scaling
    if sc is None:
        return inv
    if sc.get("rope_type") == "linear":
        return inv / sc["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
    old_len = sc["original_max_position_embeddings"]
    lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > lo_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= hi_wavelen) & (wavelen <= lo_wavelen)
    return torch.where(medium, blended, scaled)
