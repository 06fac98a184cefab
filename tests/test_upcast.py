"""16-bit models on a CPU without 16-bit matrix instructions run long inputs' layers in float32
(model.upcast_layers): the results stay those of the model, closer to float32 arithmetic,
and the KV cache and adapter states stay in the model's dtype for decoding. The tests force
that path (model.fast_16bit_matmul), so they run whatever this CPU has."""

import pytest
import torch
from conftest import prefill_then_decode, tiny_model

import minipara.model.transformer as model_mod
from minipara.methods import build_adapter


@pytest.fixture(autouse=True)
def slow_16bit_cpu(monkeypatch):
    monkeypatch.setattr(model_mod, "fast_16bit_matmul", lambda dtype: False)


def test_upcast_only_where_16bit_matmuls_are_slow(monkeypatch):
    x = torch.zeros(1, 64, 8, dtype=torch.bfloat16)
    assert model_mod.upcast_layers(x)
    monkeypatch.setattr(model_mod, "fast_16bit_matmul", lambda dtype: dtype == torch.bfloat16)
    assert not model_mod.upcast_layers(x)  # e.g. AVX512-BF16 or AMX: bf16 runs as it is
    assert model_mod.upcast_layers(x.half())  # fp16 needs AMX-FP16
    assert not model_mod.upcast_layers(x.float())


def test_long_bf16_input_runs_in_float32_and_decodes_on_in_bf16(monkeypatch, family):
    m16 = tiny_model(family, seed=1, dtype=torch.bfloat16).cpu()
    m32 = tiny_model(family, seed=1, dtype=torch.bfloat16).cpu().float()
    m32.setup_rope()
    tokens = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    assert model_mod.upcast_layers(m16.tok_embeddings(tokens)) and not model_mod.upcast_layers(
        m16.tok_embeddings(tokens[:, :1])
    )  # a decode step stays in bf16
    ref = m32(tokens, hidden_only=True)
    err = {}
    for name, threshold in (("upcast", model_mod.UPCAST_MIN_TOKENS), ("bf16", 10**9)):
        monkeypatch.setattr(model_mod, "UPCAST_MIN_TOKENS", threshold)
        cache = m16.new_cache(2, 48)
        got = m16(tokens, cache=cache, hidden_only=True)
        assert got.dtype == torch.bfloat16 and cache.k0.dtype == torch.bfloat16
        err[name] = (got.float() - ref).abs().mean().item()
    assert err["upcast"] < 0.75 * err["bf16"], err


@pytest.mark.parametrize("method", ["para", "iapt", "lora"])
def test_upcast_prefill_then_bf16_decode_equals_full_forward(family, method):
    model = tiny_model(family, seed=2, dtype=torch.bfloat16).cpu()
    ad = build_adapter(method, model.args)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    tokens = torch.randint(3, 97, (2, 44), generator=torch.Generator().manual_seed(1))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    prompt_only = valid.clone()
    prompt_only[:, 36:] = False  # what the prefill's poolers see
    with torch.no_grad():
        full = model(tokens, valid=valid, adapter=ad, pool_mask=prompt_only)
    got = prefill_then_decode(model, ad, tokens, valid, 36)
    assert got.dtype == torch.bfloat16
    assert (got - full)[valid].float().abs().max() < 0.125  # conftest.tol's 16-bit bound
