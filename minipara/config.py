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

from .errors import UserError

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
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        """Build from the dict of an HF `config.json` (old and new rope spellings)."""
        mt = cfg.get("model_type")
        if mt == "gemma3" and "text_config" in cfg:  # multimodal wrapper: use its text part
            cfg, mt = cfg["text_config"], "gemma3_text"
        if mt not in SUPPORTED:
            raise UserError(f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED)}")
        try:
            return _READERS[mt](cfg)
        except KeyError as e:
            raise UserError(f"config.json for {mt} lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_dir(cls, path) -> "ModelArgs":
        path = Path(path)
        f = path / "config.json"
        if not path.is_dir():
            raise UserError(f"model directory {path} does not exist")
        if not f.is_file():
            raise UserError(f"{f} is missing: a model directory needs an HF config.json")
        return cls.from_hf(read_json_object(f))


def read_json_object(f: Path) -> dict:
    """A JSON file that must hold an object (HF and PEFT config files)."""
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{f} must hold a JSON object")
    return cfg


def _common(cfg: dict) -> dict:
    n_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    eos = cfg.get("eos_token_id")
    return dict(
        model_type=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        ffn_dim=cfg["intermediate_size"],
        attention_bias=bool(cfg.get("attention_bias", False)),
        bos_id=cfg.get("bos_token_id") if cfg.get("bos_token_id") is not None else 1,
        eos_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        pad_id=cfg.get("pad_token_id") if cfg.get("pad_token_id") is not None else 0,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
    )


# What every Gemma generation shares: (1 + w) norms, embeddings scaled by sqrt(dim), GELU-tanh.
_GEMMA_TRAITS = dict(activation="gelu_tanh", norm_offset=1.0, embed_scale=True)


def _rope(cfg: dict, kind: str | None = None) -> dict:
    """The rope dict of one layer kind, whether written as `rope_parameters` (new) or flat (old)."""
    rp = cfg.get("rope_parameters")
    if rp and kind and kind in rp:
        rp = rp[kind]
    if rp and "rope_type" in rp or rp and "rope_theta" in rp:
        return dict(rp)
    scaling = dict(cfg.get("rope_scaling") or {})
    return {**scaling, "rope_theta": cfg.get("rope_theta", 10000.0)}


def _llama(cfg: dict) -> ModelArgs:
    common = _common(cfg)
    rope = _rope(cfg)
    rtype = rope.get("rope_type", rope.get("type", "default"))
    if rtype not in ("default", "llama3"):
        raise UserError(f"rope_scaling type {rtype!r} is not supported; supported: default, llama3")
    return ModelArgs(
        **common,
        max_seq_len=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        activation="silu",
        attn_scale=common["head_dim"] ** -0.5,
        rope_theta=rope.get("rope_theta", 10000.0),
        rope_local_theta=rope.get("rope_theta", 10000.0),
        rope_scaling=rope if rtype == "llama3" else None,
    )


def _gemma(cfg: dict) -> ModelArgs:
    """Gemma 1: LLaMA layout with (1 + w) norms, scaled embeddings and GELU-tanh."""
    common = _common(cfg)
    theta = _rope(cfg).get("rope_theta", 10000.0)
    return ModelArgs(
        **common,
        max_seq_len=cfg.get("max_position_embeddings", 8192),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        **_GEMMA_TRAITS,
        attn_scale=common["head_dim"] ** -0.5,
        rope_theta=theta,
        rope_local_theta=theta,
    )


def _gemma3(cfg: dict) -> ModelArgs:
    common = _common(cfg)
    n = common["n_layers"]
    types = cfg.get("layer_types")
    if types is None:  # older configs give only the period: every Nth layer is global
        period = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6))
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n:
        raise UserError(f"config.json: layer_types has {len(types)} entries for {n} layers")
    if cfg.get("attn_logit_softcapping") or cfg.get("final_logit_softcapping"):
        raise UserError("Gemma 3 configs with logit soft-capping are not supported")
    glob, loc = _rope(cfg, "full_attention"), _rope(cfg, "sliding_attention")
    if glob.get("rope_type", "default") != "default":
        # Gemma 3 long-context checkpoints use linear scaling of the global rope.
        if glob.get("rope_type") != "linear":
            raise UserError(f"Gemma 3 rope_type {glob.get('rope_type')!r} is not supported")
    local_theta = loc.get("rope_theta") if "rope_parameters" in cfg else cfg.get("rope_local_base_freq", 10000.0)
    return ModelArgs(
        **common,
        max_seq_len=cfg.get("max_position_embeddings", 131072),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        **_GEMMA_TRAITS,
        qk_norm=True,
        sandwich_norm=True,
        attn_scale=cfg.get("query_pre_attn_scalar", 256) ** -0.5,
        rope_theta=glob.get("rope_theta", 1_000_000.0),
        rope_local_theta=local_theta or 10000.0,
        rope_scaling=glob if glob.get("rope_type") == "linear" else None,
        sliding_window=cfg.get("sliding_window", 4096),
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
