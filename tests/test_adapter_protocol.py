"""Every method, and the many-tenant Mixture, offers the interface the model relies on
(minipara/model/adapter.py)."""

import pytest
import torch

from minipara.methods import METHODS, build_adapter
from minipara.methods.mixture import Mixture
from minipara.model.adapter import AdapterLike
from minipara.model.config import ModelArgs

ARGS = ModelArgs(model_type="llama", vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=8, ffn_dim=32)


@pytest.mark.parametrize("method", METHODS)
def test_methods_are_adapters_to_the_model(method):
    ad = build_adapter(method, ARGS)
    assert isinstance(ad, AdapterLike)
    assert ad.prefix_rows(3, torch.device("cpu")).tolist() == [ad.n_prefix] * 3


def test_a_mixture_is_an_adapter_to_the_model():
    mix = Mixture([build_adapter("para", ARGS), build_adapter("ptuning_v2", ARGS, prefix_len=2)], [0, 1, None])
    assert isinstance(mix, AdapterLike)
    assert mix.prefix_rows(3, torch.device("cpu")).tolist() == [0, 2, 0]
