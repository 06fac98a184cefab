"""Shared test fixtures: tiny random models of both families (no files, no downloads)."""
import pytest
import torch

from minipara.config import ModelArgs
from minipara.model import Transformer

TINY = {
    "llama": dict(model_type="llama", vocab_size=97, dim=48, n_layers=3, n_heads=4, n_kv_heads=2,
                  head_dim=12, ffn_dim=64, norm_eps=1e-5, attn_scale=12 ** -0.5, bos_id=1, eos_ids=(2,)),
    "gemma": dict(model_type="gemma3_text", vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=1,
                  head_dim=16, ffn_dim=48, norm_eps=1e-6, activation="gelu_tanh", norm_offset=1.0,
                  embed_scale=True, qk_norm=True, sandwich_norm=True, attn_scale=16 ** -0.5,
                  rope_theta=1e6, sliding_window=5, sliding=(True, False, True), bos_id=2, eos_ids=(1,)),
}


def tiny_args(family: str) -> ModelArgs:
    return ModelArgs(**TINY[family])


def tiny_model(family: str, seed: int = 0, dtype=torch.float32) -> Transformer:
    """A frozen random model whose activations stay O(1) (weights ~ N(0, 1/fan_in))."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(tiny_args(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.0 if model.args.norm_offset else 1.0))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.requires_grad_(False)
    return model.to(dtype).eval()


@pytest.fixture(params=["llama", "gemma"])
def family(request):
    return request.param
