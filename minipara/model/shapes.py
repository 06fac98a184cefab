"""Named model shapes (the papers' LLaMA-2-7B, LLaMA-3-8B, the default Gemma 3 270M) and
randomly initialised models of them: for speed and memory, where the values do not matter."""

import torch

from minipara.model.config import ModelArgs
from minipara.model.transformer import Transformer

SHAPES = {
    "llama-2-7b": dict(
        model_type="llama",
        vocab_size=32000,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=32,
        head_dim=128,
        ffn_dim=11008,
        norm_eps=1e-5,
        max_seq_len=4096,
        attn_scale=128**-0.5,
    ),
    "llama-3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        ffn_dim=14336,
        norm_eps=1e-5,
        max_seq_len=8192,
        attn_scale=128**-0.5,
        rope_theta=500000.0,
        bos_id=128000,
        eos_ids=(128001,),
    ),
    "gemma-3-270m": dict(
        model_type="gemma3_text",
        vocab_size=262144,
        dim=640,
        n_layers=18,
        n_heads=4,
        n_kv_heads=1,
        head_dim=256,
        ffn_dim=2048,
        norm_eps=1e-6,
        max_seq_len=32768,
        tie_embeddings=True,
        activation="gelu_tanh",
        norm_offset=1.0,
        embed_scale=True,
        qk_norm=True,
        sandwich_norm=True,
        attn_scale=256**-0.5,
        rope_theta=1e6,
        sliding_window=512,
        sliding=tuple((i + 1) % 6 != 0 for i in range(18)),
        bos_id=2,
        eos_ids=(1,),
    ),
}


def random_model(shape: str, dtype, device) -> Transformer:
    """A randomly initialised model of a known shape: speed does not depend on the values."""
    args = ModelArgs(**SHAPES[shape])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(old)
    model.setup_rope()
    return model.requires_grad_(False).eval()
