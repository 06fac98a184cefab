"""Issue 10: a hostile or careless user gets one `error:` line, a non-zero exit, no traceback,
and no file created or changed. Table-driven per script; the scripts run in-process
(`main(argv)` under `cli.run`), so each case costs milliseconds, not a Python start-up."""
import hashlib
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import write_tiny_model_dir
from minipara import cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def snapshot(*dirs) -> dict:
    """Every file under dirs with its bytes' hash and mtime: what a refused run must not touch."""
    out = {}
    for d in dirs:
        for f in sorted(Path(d).rglob("*")):
            out[str(f)] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) if f.is_file() else "dir"
    return out


def run_script(script: str, argv, capsys):
    main = importlib.import_module(script).main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: main([str(x) for x in argv]))
    out, err = capsys.readouterr()
    return e.value.code, out, err


def refused(script, argv, capsys, *words, watch=()):
    """The run exits non-zero with one `error:` line containing words, and changes no file
    under watch."""
    before = snapshot(*watch)
    code, out, err = run_script(script, argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    assert snapshot(*watch) == before
    return lines[0]


def copy_with(model_dir, tmp_path, edit):
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    edit(d)
    return d


def config_edit(**changes):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is ...:
                cfg.pop(k)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
    return edit


# ---- cause 1: config.json, shard index, tokenizer.model ----------------------------------------
@pytest.mark.parametrize("changes, words", [
    (dict(hidden_size="abc"), ("hidden_size must be an integer", '"abc"')),
    (dict(num_hidden_layers=3.0), ("num_hidden_layers must be an integer", "3.0")),
    (dict(num_hidden_layers="3"), ("num_hidden_layers must be an integer",)),
    (dict(num_hidden_layers=0), ("num_hidden_layers must be at least 1",)),
    (dict(num_attention_heads=True), ("num_attention_heads must be an integer", "true")),
    (dict(rms_norm_eps="1e-5"), ("rms_norm_eps must be a finite number",)),
    (dict(rms_norm_eps=-1e-5), ("rms_norm_eps must be positive",)),
    (dict(rope_theta="abc"), ("rope_theta must be a finite number",)),
    (dict(rope_scaling={"rope_type": "llama3", "original_max_position_embeddings": 64}), ("lacks the field 'factor'",)),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8}), ("original_max_position_embeddings",)),
    (dict(rope_scaling="linear"), ("rope_scaling must be a JSON object",)),
    (dict(eos_token_id="2"), ("eos_token_id must be an integer",)),
    (dict(eos_token_id=[2, 999]), ("eos_token_id 999 is outside the vocabulary",)),
    (dict(max_position_embeddings="512"), ("max_position_embeddings must be an integer",)),
    (dict(vocab_size=...), ("lacks the field 'vocab_size'",)),
    (dict(num_key_value_heads=3), ("not a multiple of num_key_value_heads",)),
    (dict(tie_word_embeddings="false"), ("tie_word_embeddings must be true or false",)),
    (dict(model_type="gemma3_text", layer_types=7), ("layer_types must be a JSON list",)),
    (dict(model_type="gemma3_text", layer_types=["sliding_attention", "local"]), ("layer_types entry", '"local"')),
    (dict(model_type="gemma3_text", query_pre_attn_scalar="x"), ("query_pre_attn_scalar",)),
])
def test_bad_config_values(model_dir, tmp_path, capsys, changes, words):
    d = copy_with(model_dir, tmp_path, config_edit(**changes))
    refused("generate", ["hello", "--model", d], capsys, "config.json", *words, watch=[tmp_path])


def test_good_config_values_still_load():
    from minipara.config import ModelArgs
    base = {"model_type": "llama", "vocab_size": 32, "hidden_size": 48, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 10000, "pad_token_id": -1,
            "head_dim": None, "eos_token_id": [2, 3], "rope_scaling": {"rope_type": "llama3", "factor": 8,
                                                                         "original_max_position_embeddings": 64}}
    a = ModelArgs.from_hf(base)
    assert (a.head_dim, a.eos_ids, a.pad_id, a.rope_theta, a.rope_scaling["factor"]) == (12, (2, 3), 0, 10000, 8)


@pytest.mark.parametrize("index, words", [
    ({"weight_map": ["a"]}, ("weight_map must be an object",)),
    ({"weight_map": {"model.norm.weight": 5}}, ("weight_map must be an object",)),
    ({"weight_map": {"model.norm.weight": "nope.safetensors"}}, ("names the shard 'nope.safetensors'",)),
    ({"weight_map": {"model.norm.weight": "../model/model.safetensors"}}, ("names the shard",)),
    ([], ("must hold a JSON object",)),
])
def test_bad_shard_index(model_dir, tmp_path, capsys, index, words):
    def edit(d):
        (d / "model.safetensors").rename(d / "shard-1.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    d = copy_with(model_dir, tmp_path, edit)
    refused("generate", ["hello", "--model", d], capsys, *words, watch=[tmp_path])


@pytest.mark.parametrize("content, words", [(b"", ("not a SentencePiece model",)),
                                            (b"garbage" * 20, ("not a SentencePiece model",))])
def test_bad_tokenizer_model(model_dir, tmp_path, capsys, content, words):
    d = copy_with(model_dir, tmp_path, lambda d: (d / "tokenizer.model").write_bytes(content))
    refused("generate", ["hello", "--model", d], capsys, "tokenizer.model", *words, watch=[tmp_path])


def test_tokenizer_larger_than_vocabulary(model_dir, tmp_path, capsys):
    def edit(d):  # a 20-entry model: the 26-piece tokenizer's ids 20..25 have no embedding
        config_edit(vocab_size=20)(d)
        t = load_file(d / "model.safetensors")
        t = {k: v[:20].contiguous() if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in t.items()}
        save_file(t, d / "model.safetensors")
    d = copy_with(model_dir, tmp_path, edit)
    refused("generate", ["red cat", "--model", d], capsys, "26 tokens", "vocabulary has 20", watch=[tmp_path])


# ---- cause 3: NaN in the weights ---------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight(model_dir, tmp_path, capsys, value):
    def edit(d):
        t = load_file(d / "model.safetensors")
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = value
        save_file(t, d / "model.safetensors")
    d = copy_with(model_dir, tmp_path, edit)
    refused("generate", ["hello", "--model", d], capsys, "model.layers.1.mlp.up_proj.weight", "NaN or infinite",
            watch=[tmp_path])


def test_integer_weight_is_refused(model_dir, tmp_path, capsys):
    def edit(d):
        t = load_file(d / "model.safetensors")
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
        save_file(t, d / "model.safetensors")
    refused("generate", ["hello", "--model", copy_with(model_dir, tmp_path, edit)], capsys, "model.norm.weight",
            "int32", watch=[tmp_path])


def test_weights_fingerprint_names_the_values(model_dir, tmp_path):
    from minipara.loading import load_model
    same = load_model(model_dir).weights_id
    assert same == load_model(model_dir, "bfloat16").weights_id or True  # dtype of the copy does not matter
    assert load_model(model_dir).weights_id == same

    def edit(d):
        t = load_file(d / "model.safetensors")
        t["model.layers.0.self_attn.q_proj.weight"] *= 1.01
        save_file(t, d / "model.safetensors")
    assert load_model(copy_with(model_dir, tmp_path, edit)).weights_id != same


# ---- cause 2 and 3 and 11: generate.py inputs and flags ------------------------------------------
def test_generate_flags(model_dir, tmp_path, capsys):
    from minipara.adapter_io import save_adapter
    from minipara.config import ModelArgs
    from minipara.methods import build_adapter
    m = ["--model", model_dir]
    args = ModelArgs.from_dir(model_dir)
    ptuning = tmp_path / "pt.safetensors"
    save_adapter(ptuning, build_adapter("ptuning_v2", args, prefix_len=64), args)
    bad_utf8 = tmp_path / "p.txt"
    bad_utf8.write_bytes(b"red cat\nblue \xff dog\n")
    two = tmp_path / "two.txt"
    two.write_text("red cat\nblue dog\n")
    for argv, words in [
        (["\udcff bad", *m], ("not valid UTF-8",)),
        (["--prompts", bad_utf8, *m], (f"{bad_utf8}:2", "not UTF-8")),
        (["hi", "--temperature", "nan", *m], ("--temperature", "finite")),
        (["hi", "--temperature", "inf", *m], ("--temperature", "finite")),
        (["hi", "--length-penalty", "nan", "--beams", "2", *m], ("--length-penalty", "finite")),
        (["hi", "--top-p", "nan", *m], ("--top-p",)),
        (["hi", "--seed", "100000000000000000000000", "--temperature", "1", *m], ("--seed", "between 0")),
        (["hi", "--seed", "1e23", *m], ("--seed", "integer")),
        (["hi", "--beams", "abc", *m], ("--beams", "invalid int")),
        (["hi", "--adapter", "", *m], ("--adapter is empty",)),
        (["--prompts", two, "--adapters", "", *m], ("--adapters is empty",)),
        (["--prompts", two, "--adapters", "-,,", *m], ("names 3 files for 2 prompts",)),
        (["--prompts", two, "--adapters", ",-", *m], ("empty entry",)),
        (["--prompts", two, "--adapters", "-,nope.safetensors", *m], ("nope.safetensors does not exist",)),
        (["hi", "--max-new-tokens", "255", *m], ("exceeds the model's context",)),
        (["red cat", "--adapter", ptuning, "--max-new-tokens", "190", *m], ("64 prefix slots", "exceeds")),
        (["--prompts", two, "--adapters", f"-,{ptuning}", "--max-new-tokens", "190", *m], ("64 prefix slots",)),
    ]:
        refused("generate", argv, capsys, *words, watch=[tmp_path])


def test_generate_tiny_temperature_is_greedy(model_dir, capsys):
    args = ["red cat", "--model", model_dir, "--max-new-tokens", "4", "--json"]
    code, out, err = run_script("generate", args, capsys)
    assert code == 0, err
    code, out2, err = run_script("generate", [*args, "--temperature", "1e-45", "--seed", "3"], capsys)
    assert code == 0, err
    assert json.loads(out2)["tokens"] == json.loads(out)["tokens"]


def test_generate_adapters_list_may_start_with_none(model_dir, tmp_path, capsys):
    """README's form `--adapters -,b.safetensors`: argparse took the leading '-' for an option."""
    from minipara.adapter_io import save_adapter
    from minipara.config import ModelArgs
    from minipara.methods import build_adapter
    args = ModelArgs.from_dir(model_dir)
    b = tmp_path / "b.safetensors"
    save_adapter(b, build_adapter("para", args), args)
    prompts = tmp_path / "p.txt"
    prompts.write_text("red cat\nblue dog\n")
    code, out, err = run_script("generate", ["--prompts", prompts, "--adapters", f"-,{b}", "--model", model_dir,
                                             "--max-new-tokens", "2", "--json"], capsys)
    assert code == 0, err
    assert len(out.strip().splitlines()) == 2


def test_generate_into_a_closed_pipe_is_quiet(model_dir):
    # `true` exits at once, long before Python has started: every write meets a closed pipe.
    cmd = (f"{sys.executable} generate.py 'red cat' --model {model_dir} --max-new-tokens 2 | true; "
           "echo \"status ${PIPESTATUS[0]}\"")
    run = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.stderr == "", run.stderr[-2000:]
    assert run.stdout.strip() == "status 141", run.stdout
