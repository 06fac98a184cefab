"""generate.py refuses bad input with one line naming the problem and exit status 2 (no traceback)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def broken_copy(model_dir, tmp_path, edit):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    edit(d)
    return d


def generate(*args):
    run = subprocess.run(
        [sys.executable, "generate.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    return run.returncode, run.stdout, run.stderr


def refused(args, *words):
    code, _, err = generate(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]


def test_generates_with_a_good_model_dir(model_dir):
    code, out, err = generate("red cat", "--model", model_dir, "--max-new-tokens", "3", "--json")
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) == 3


def test_model_directory_missing(tmp_path):
    refused(["hello", "--model", tmp_path / "nope"], "does not exist")


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: (d / "config.json").unlink(), ("config.json", "missing")),
        (lambda d: (d / "config.json").write_text("{not json"), ("config.json", "not valid JSON")),
        (lambda d: (d / "config.json").write_text(json.dumps({"model_type": "gpt2"})), ("gpt2", "supported: llama")),
        (lambda d: (d / "tokenizer.model").unlink(), ("tokenizer.model", "missing")),
        (
            lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]),
            ("damaged or truncated",),
        ),
    ],
)
def test_broken_model_directory(model_dir, tmp_path, edit, words):
    refused(["hello", "--model", broken_copy(model_dir, tmp_path, edit)], *words)


@pytest.mark.parametrize(
    "drop, words", [(True, ("missing tensor", "model.layers.")), (False, ("has shape", "the config needs"))]
)
def test_missing_or_misshaped_tensor(model_dir, tmp_path, drop, words):
    from safetensors.torch import load_file, save_file

    def edit(d):
        t = load_file(d / "model.safetensors")
        name = "model.layers.1.mlp.down_proj.weight"
        if drop:
            del t[name]
        else:
            t[name] = t[name][:, :-1].contiguous()
        save_file(t, d / "model.safetensors")

    refused(["hello", "--model", broken_copy(model_dir, tmp_path, edit)], *words)


def test_bad_options(model_dir):
    refused(["", "--model", model_dir], "empty prompt")
    refused(["hello", "--model", model_dir, "--beams", "0"], "--beams")
    refused(["hello", "--model", model_dir, "--device", "tpu"], "device", "tpu")


def test_context_overflow_is_refused_unless_truncation_is_asked(model_dir):
    long_prompt = " ".join(["red cat"] * 200)  # the tiny model's context is 256 tokens
    refused([long_prompt, "--model", model_dir, "--max-new-tokens", "8"], "exceeds the model's context", "--truncate")
    code, out, err = generate(long_prompt, "--model", model_dir, "--max-new-tokens", "8", "--truncate", "--json")
    assert code == 0, err
    assert len(json.loads(out)["prompt_tokens"]) == 256 - 8


def test_an_adapter_brings_its_training_template(model_dir, tmp_path):
    from minipara.io.adapters import save_adapter
    from minipara.io.tokenizer import Tokenizer, encode_example
    from minipara.methods import build_adapter
    from minipara.model.config import ModelArgs

    args = ModelArgs.from_dir(model_dir)
    path = tmp_path / "a.safetensors"
    save_adapter(path, build_adapter("para", args), args, template="llama2")
    code, out, err = generate("red cat", "--model", model_dir, "--adapter", path, "--max-new-tokens", "2", "--json")
    assert code == 0, err
    assert json.loads(out)["prompt_tokens"] == encode_example(Tokenizer(model_dir), "llama2", "red cat")[0]
    code, out, err = generate(
        "red cat", "--model", model_dir, "--adapter", path, "--max-new-tokens", "2", "--template", "none", "--json"
    )  # an explicit choice still wins
    assert json.loads(out)["prompt_tokens"] == encode_example(Tokenizer(model_dir), "none", "red cat")[0]
