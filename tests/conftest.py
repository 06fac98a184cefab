"""Shared test fixtures: tiny random models of both families (no files, no downloads).

MINIPARA_TEST_DEVICE=cuda and MINIPARA_TEST_DTYPE=bfloat16 run the same tests on a GPU in
bfloat16; `tol(x)` then loosens a float32 tolerance to what bfloat16 arithmetic allows.
bfloat16 keeps 8 significant bits: one rounding of a logit near 4 (the largest these tiny
models make) moves it by up to 2^-8 * 4 = 0.016, and two computations that round at
different points (fused vs unfused, cached vs full, merged vs unmerged weights) differ by
several such steps. The 16-bit tolerance is 0.125 absolute: eight roundings at |logit| = 4.
"""
import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("MINIPARA_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("MINIPARA_TEST_DTYPE", "float32"))
LOW_PRECISION = DTYPE != torch.float32


def tol(float32_tol: float) -> float:
    """The tolerance to use: as given in float32, 0.125 (absolute, on logits) in 16-bit."""
    return 0.125 if LOW_PRECISION else float32_tol


exact_only = pytest.mark.skipif(LOW_PRECISION, reason="token-for-token equality needs float32: "
                                "16-bit rounding flips near-ties between random logits")

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


def tiny_model(family: str, seed: int = 0, dtype=None) -> Transformer:
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
    model = model.to(DEVICE, dtype or DTYPE).eval()
    model.setup_rope()  # keep RoPE frequencies in float32 after the cast
    return model


@pytest.fixture(params=["llama", "gemma"])
def family(request):
    return request.param


def prefill_then_decode(model, adapter, tokens, valid, prompt_len: int):
    """Logits (B, T, V) from prefilling tokens[:, :prompt_len] with the adapter, then decoding
    the rest one token at a time through the cache (decode runs no generator)."""
    n_pre = adapter.n_prefix if adapter is not None else 0
    with torch.no_grad():
        cache = model.new_cache(tokens.shape[0], n_pre + tokens.shape[1], n_prefix=n_pre)
        outs = [model(tokens[:, :prompt_len], valid=valid[:, :prompt_len], cache=cache, adapter=adapter)]
        outs += [model(tokens[:, j:j + 1], cache=cache) for j in range(prompt_len, tokens.shape[1])]
    return torch.cat(outs, 1)
