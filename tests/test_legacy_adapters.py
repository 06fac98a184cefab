"""Adapter files written before a config field existed load with the behaviour they had.

tests/data/legacy_adapters/ holds PARA, PEDRO, PARADE and IAPT adapters with trained-looking
weights on both tiny model families, written by the code of 81f7437 (make.py there), with the
logits and greedy tokens they gave then. Loading them now must give the same.
"""

from pathlib import Path

import pytest
import torch
from conftest import DEVICE, exact_only, shared_tiny_model, tol
from safetensors.torch import load_file

from minipara.decode.generation import GenerationConfig, generate
from minipara.io.adapters import load_adapter

HERE = Path(__file__).parent / "data" / "legacy_adapters"
PROMPTS = [[5, 17, 33, 8, 61, 4, 29], [44, 9, 70]]
CASES = [f"{m}-{f}" for f in ("llama", "gemma") for m in ("para", "pedro", "parade", "iapt")]


@pytest.fixture(scope="module")
def expected():
    return load_file(HERE / "expected.safetensors")


def load(case: str):
    family = case.split("-")[1]
    model = shared_tiny_model(family)
    return model, load_adapter(HERE / f"{case}.safetensors", model.args).to(DEVICE)


def logits(model, ad):
    T = max(map(len, PROMPTS))
    tokens = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS], device=DEVICE)
    valid = tokens != 0
    with torch.no_grad():
        return model(tokens, valid=valid, adapter=ad, pool_mask=valid).float().cpu()


@pytest.mark.parametrize("case", CASES)
def test_old_adapter_file_gives_its_old_logits(case, expected):
    """The file has no input_norm (it predates it): it loads as input_norm none, the literal
    form it was trained with, and gives its logits; the default (rms) would not."""
    model, ad = load(case)
    assert ad.config.input_norm == "none"
    want = expected[f"{case}.logits"]
    assert (logits(model, ad) - want).abs().max() < tol(1e-4)
    ad.config.input_norm = "rms"
    assert (logits(model, ad) - want).abs().max() > 1e-2


@exact_only
@pytest.mark.parametrize("case", CASES)
def test_old_adapter_file_gives_its_old_tokens(case, expected):
    model, ad = load(case)
    out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=8, eos_ids=()), adapter=ad)
    assert out == expected[f"{case}.tokens"].tolist()
