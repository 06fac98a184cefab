"""Adapter files: exact round trips for every method, and a clear refusal for every bad file."""

import json
import os
import sys
import types

import pytest
import torch
from conftest import DEVICE, perturbed, tiny_args, tiny_model
from safetensors import safe_open
from safetensors.torch import save_file

from minipara.errors import UserError
from minipara.io import adapters as adapter_io
from minipara.io.adapters import adapter_info, load_adapter, save_adapter
from minipara.methods import METHODS, build_adapter


@pytest.fixture
def saved(tmp_path):
    """A PARA adapter saved for the tiny LLaMA: (path, adapter)."""
    args = tiny_args("llama")
    ad = perturbed(build_adapter("para", args))
    path = tmp_path / "para.safetensors"
    save_adapter(path, ad, args)
    return path, ad


def rewrite(path, meta=None, tensors=None):
    """Re-save `path` with metadata entries replaced (None deletes) and tensors edited."""
    with safe_open(str(path), framework="pt") as f:
        old_meta, old = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for k, v in (meta or {}).items():
        old_meta.pop(k) if v is None else old_meta.__setitem__(k, v)
    for k, v in (tensors or {}).items():
        old.pop(k) if v is None else old.__setitem__(k, v)
    os.remove(path)
    save_file(old, str(path), metadata=old_meta)


def refused(path, args=None, *words):
    with pytest.raises(UserError) as e:
        load_adapter(path, args or tiny_args("llama"))
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


@pytest.mark.parametrize("method", METHODS)
def test_round_trip_is_exact(method, family, tmp_path):
    model = tiny_model(family)
    args = model.args
    ad = perturbed(build_adapter(method, args), seed=1).to(DEVICE)
    path = tmp_path / f"{method}.safetensors"
    save_adapter(path, ad, args)
    back = load_adapter(path, args)
    assert type(back) is type(ad) and back.config == ad.config
    a, b = ad.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k]) for k in a)
    back = back.to(DEVICE)
    tokens = torch.randint(3, args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, :3] = False
    with torch.no_grad():
        assert torch.equal(model(tokens, valid=valid, adapter=ad), model(tokens, valid=valid, adapter=back))
    info = adapter_info(path)
    assert info["method"] == method and info["format_version"] == 1
    assert info["params"] == sum(p.numel() for p in ad.state_dict().values())
    assert info["base"]["model_type"] == args.model_type and info["base"]["n_layers"] == args.n_layers
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind


def test_refuses_what_is_not_an_adapter_file(tmp_path, saved):
    path, _ = saved
    refused(tmp_path / "missing.safetensors", None, "does not exist")
    refused(tmp_path, None, "not a file")
    (tmp_path / "tiny").write_bytes(b"abc")
    refused(tmp_path / "tiny", None, "not a safetensors file")
    (tmp_path / "garbage").write_bytes(b"this is a text file, not tensors\n" * 5)
    refused(tmp_path / "garbage", None, "not a safetensors file")
    data = path.read_bytes()
    (tmp_path / "cut_header").write_bytes(data[:60])
    refused(tmp_path / "cut_header", None, "damaged or truncated")
    (tmp_path / "cut_data").write_bytes(data[:-7])
    refused(tmp_path / "cut_data", None, "damaged or truncated")
    (tmp_path / "bad_json").write_bytes(data[:9] + b"\x00" + data[10:])
    refused(tmp_path / "bad_json", None, "damaged", "header")
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    refused(plain, None, "not a minipara adapter")
    save_file({"w": torch.zeros(3)}, str(plain), metadata={"format": "pt"})
    refused(plain, None, "not a minipara adapter")
    for bad in (plain, tmp_path / "garbage"):
        with pytest.raises(UserError):
            adapter_info(bad)


def test_refuses_a_file_for_another_base_model(saved):
    path, _ = saved
    msg = refused(path, tiny_args("gemma"), "llama with 3 layers, dim 48", "gemma3_text with 3 layers, dim 32")
    assert msg.index("llama") < msg.index("gemma3_text")  # trained for ...; this model is ...
    other = tiny_args("llama")
    other.rope_theta = 5e5  # same shape, different config
    refused(path, other, "configs differ", "rope_theta")


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"format_version": "2"}, ("newer minipara", "format 2", "upgrade")),
        ({"method": "dora"}, ("unknown method 'dora'", ", ".join(METHODS))),
        ({"method": None}, ("unknown method None",)),
        (
            {"config": json.dumps({"r": 12, "pooler": "last", "targets": "qvu", "up_bias": True, "gamma": 2})},
            ("gamma", "unknown to this version"),
        ),
        ({"config": json.dumps({"targets": "xyz"})}, ("bad para config", "xyz")),
        ({"config": "{not json"}, ("damaged", "config")),
        ({"base": None}, ("damaged", "base")),
    ],
)
def test_refuses_a_bad_header(saved, edit, words):
    path, _ = saved
    rewrite(path, meta=edit)
    refused(path, None, *words)


def test_refuses_missing_unexpected_and_misshaped_tensors(saved):
    path, ad = saved
    name, t = next(iter(ad.state_dict().items()))
    shape = list(t.shape)
    rewrite(path, tensors={name: torch.zeros(shape[0], shape[1] + 1, *shape[2:])})
    refused(path, None, name, str(shape), str([shape[0], shape[1] + 1, *shape[2:]]))
    rewrite(path, tensors={name: None})
    refused(path, None, name, "missing", str(shape))
    rewrite(path, tensors={name: t, "extra.weight": torch.zeros(2, 5)})
    refused(path, None, "unexpected tensor extra.weight", "[2, 5]")


def test_peft_directory_goes_through_peft_import(tmp_path, monkeypatch):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    fake = types.ModuleType("minipara.io.peft_import")
    fake.load_peft_adapter = lambda path, args: ("peft", path, args)
    monkeypatch.setitem(sys.modules, "minipara.io.peft_import", fake)
    args = tiny_args("llama")
    assert load_adapter(tmp_path, args) == ("peft", tmp_path, args)
    monkeypatch.setitem(sys.modules, "minipara.io.peft_import", None)  # as if the module did not exist
    refused(tmp_path, args, "PEFT adapter directory", "peft_import")
    info = adapter_info(tmp_path)
    assert info["method"] == "lora" and info["params"] == 0


def test_save_is_atomic(tmp_path, monkeypatch, saved):
    path, ad = saved
    args = tiny_args("llama")
    good = path.read_bytes()

    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # a few bytes, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(adapter_io, "_write_safetensors", half_write)
    with pytest.raises(OSError):
        save_adapter(path, perturbed(build_adapter("para", args), seed=5), args)
    assert path.read_bytes() == good  # the old file is untouched
    with pytest.raises(OSError):
        save_adapter(tmp_path / "new.safetensors", ad, args)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no half file, no temporary file
    monkeypatch.undo()
    save_adapter(tmp_path / "sub" / "again.safetensors", ad, args)  # makes the folder
    assert os.listdir(tmp_path / "sub") == ["again.safetensors"]
    with pytest.raises(UserError, match="is a directory"):
        save_adapter(tmp_path, ad, args)


def test_saved_file_has_ordinary_permissions(tmp_path):
    args = tiny_args("llama")
    path = tmp_path / "a.safetensors"
    save_adapter(path, build_adapter("para", args), args)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_training_template_travels_with_the_file(tmp_path):
    args = tiny_args("llama")
    save_adapter(tmp_path / "t.safetensors", build_adapter("para", args), args, template="llama2")
    save_adapter(tmp_path / "n.safetensors", build_adapter("para", args), args)
    assert load_adapter(tmp_path / "t.safetensors", args).template == "llama2"
    assert load_adapter(tmp_path / "n.safetensors", args).template is None
