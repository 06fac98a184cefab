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

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from minipara import cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
    assert code == 2, ([str(x) for x in argv[-6:]], err)
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
@pytest.mark.parametrize(
    "changes, words",
    [
        (dict(hidden_size="abc"), ("hidden_size must be an integer", '"abc"')),
        (dict(num_hidden_layers=3.0), ("num_hidden_layers must be an integer", "3.0")),
        (dict(num_hidden_layers="3"), ("num_hidden_layers must be an integer",)),
        (dict(num_hidden_layers=0), ("num_hidden_layers must be at least 1",)),
        (dict(num_attention_heads=True), ("num_attention_heads must be an integer", "true")),
        (dict(rms_norm_eps="1e-5"), ("rms_norm_eps must be a finite number",)),
        (dict(rms_norm_eps=-1e-5), ("rms_norm_eps must be positive",)),
        (dict(rope_theta="abc"), ("rope_theta must be a finite number",)),
        (
            dict(rope_scaling={"rope_type": "llama3", "original_max_position_embeddings": 64}),
            ("lacks the field 'factor'",),
        ),
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
    ],
)
def test_bad_config_values(model_dir, tmp_path, capsys, changes, words):
    d = copy_with(model_dir, tmp_path, config_edit(**changes))
    refused("generate", ["hello", "--model", d], capsys, "config.json", *words, watch=[tmp_path])


def test_good_config_values_still_load():
    from minipara.model.config import ModelArgs

    base = {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "rope_theta": 10000,
        "pad_token_id": -1,
        "head_dim": None,
        "eos_token_id": [2, 3],
        "rope_scaling": {"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": 64},
    }
    a = ModelArgs.from_hf(base)
    assert (a.head_dim, a.eos_ids, a.pad_id, a.rope_theta, a.rope_scaling["factor"]) == (12, (2, 3), 0, 10000, 8)


@pytest.mark.parametrize(
    "index, words",
    [
        ({"weight_map": ["a"]}, ("weight_map must be an object",)),
        ({"weight_map": {"model.norm.weight": 5}}, ("weight_map must be an object",)),
        ({"weight_map": {"model.norm.weight": "nope.safetensors"}}, ("names the shard 'nope.safetensors'",)),
        ({"weight_map": {"model.norm.weight": "../model/model.safetensors"}}, ("names the shard",)),
        ([], ("must hold a JSON object",)),
    ],
)
def test_bad_shard_index(model_dir, tmp_path, capsys, index, words):
    def edit(d):
        (d / "model.safetensors").rename(d / "shard-1.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    d = copy_with(model_dir, tmp_path, edit)
    refused("generate", ["hello", "--model", d], capsys, *words, watch=[tmp_path])


@pytest.mark.parametrize(
    "content, words", [(b"", ("not a SentencePiece model",)), (b"garbage" * 20, ("not a SentencePiece model",))]
)
def test_bad_tokenizer_model(model_dir, tmp_path, capsys, content, words):
    d = copy_with(model_dir, tmp_path, lambda d: (d / "tokenizer.model").write_bytes(content))
    refused("generate", ["hello", "--model", d], capsys, "tokenizer.model", *words, watch=[tmp_path])


def test_tokenizer_larger_than_vocabulary(model_dir, tmp_path, capsys):
    def edit(d):  # a 20-entry model: the 26-piece tokenizer's ids 20..25 have no embedding
        config_edit(vocab_size=20)(d)
        t = load_file(d / "model.safetensors")
        t = {
            k: v[:20].contiguous() if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in t.items()
        }
        save_file(t, d / "model.safetensors")

    d = copy_with(model_dir, tmp_path, edit)
    refused("generate", ["red cat", "--model", d], capsys, "26 tokens", "vocabulary has 20", watch=[tmp_path])


def test_data_files_report_path_and_line(tmp_path):
    """Cause 2: a GLUE tsv field over csv's 131,072-character limit, and non-UTF-8 bytes in a
    gzip-compressed file, are reported as path:line."""
    import gzip

    from minipara.errors import UserError
    from minipara.train.tasks import _build, _jsonl, _table

    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\nfine\t1\n" + "x" * 140_000 + "\t0\n")
    with pytest.raises(UserError, match=r"train.tsv:3: field larger than field limit"):
        list(_table(tsv, "\t"))
    gz = tmp_path / "train.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"a": 1}\n{"a": "\xff"}\n'))
    with pytest.raises(UserError, match=r"train.jsonl.gz:2: not UTF-8"):
        list(_jsonl(gz))
    arr = tmp_path / "rows.jsonl"  # a line that is valid JSON but not an object
    arr.write_text('{"prompt": "red", "response": "yes"}\n["red", "yes"]\n')
    with pytest.raises(UserError, match=r"rows.jsonl:2: expected a JSON object"):
        _build(arr, _jsonl(arr), lambda row: row["prompt"])


# ---- cause 3: NaN in the weights ---------------------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight(model_dir, tmp_path, capsys, value):
    def edit(d):
        t = load_file(d / "model.safetensors")
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = value
        save_file(t, d / "model.safetensors")

    d = copy_with(model_dir, tmp_path, edit)
    refused(
        "generate",
        ["hello", "--model", d],
        capsys,
        "model.layers.1.mlp.up_proj.weight",
        "NaN or infinite",
        watch=[tmp_path],
    )


def test_integer_weight_is_refused(model_dir, tmp_path, capsys):
    def edit(d):
        t = load_file(d / "model.safetensors")
        t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
        save_file(t, d / "model.safetensors")

    refused(
        "generate",
        ["hello", "--model", copy_with(model_dir, tmp_path, edit)],
        capsys,
        "model.norm.weight",
        "int32",
        watch=[tmp_path],
    )


def test_weights_fingerprint_names_the_values(model_dir, tmp_path):
    from minipara.io.checkpoints import load_model

    same = load_model(model_dir).weights_id
    assert load_model(model_dir, "bfloat16").weights_id == same  # the file's values, whatever the copy's dtype

    def edit(d):
        t = load_file(d / "model.safetensors")
        t["model.layers.0.self_attn.q_proj.weight"] *= 1.01
        save_file(t, d / "model.safetensors")

    assert load_model(copy_with(model_dir, tmp_path, edit)).weights_id != same


def test_conversion_without_room_says_how_much_and_writes_nothing(tmp_path, monkeypatch):
    import shutil as shutil_module
    from types import SimpleNamespace

    from gguf import GGMLQuantizationType

    from minipara.errors import UserError
    from minipara.io import weights

    norm = np.ones(640, dtype=np.float32)
    reader = SimpleNamespace(
        tensors=[
            SimpleNamespace(name="output_norm.weight", data=norm, shape=[640], tensor_type=GGMLQuantizationType.F32)
        ]
    )
    out = tmp_path / "weights" / "gemma-3-270m.tmp-1"
    out.mkdir(parents=True)
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda p: usage._replace(free=norm.nbytes - 1))
    with pytest.raises(
        UserError, match=r"needs 0\.00 GiB in .*weights, which has 0\.00 GiB free.*MINIPARA_WEIGHTS_DIR"
    ):
        weights.save_weights(reader, out / "model.safetensors", lambda *a, **k: None)
    assert not any(out.iterdir())
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda p: usage._replace(free=norm.nbytes))
    weights.save_weights(reader, out / "model.safetensors", lambda *a, **k: None)  # just enough room
    assert load_file(out / "model.safetensors")["model.norm.weight"].eq(0).all()  # Gemma's "1 +" taken out


# ---- cause 2 and 3 and 11: generate.py inputs and flags ------------------------------------------
def test_generate_flags(model_dir, tmp_path, capsys):
    from minipara.io.adapters import save_adapter
    from minipara.methods import build_adapter
    from minipara.model.config import ModelArgs

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
        (["hi", "--length-penalty", "1e308", "--beams", "2", *m], ("--length-penalty must be between",)),
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
    from minipara.io.adapters import save_adapter
    from minipara.methods import build_adapter
    from minipara.model.config import ModelArgs

    args = ModelArgs.from_dir(model_dir)
    b = tmp_path / "b.safetensors"
    save_adapter(b, build_adapter("para", args), args)
    prompts = tmp_path / "p.txt"
    prompts.write_text("red cat\nblue dog\n")
    code, out, err = run_script(
        "generate",
        ["--prompts", prompts, "--adapters", f"-,{b}", "--model", model_dir, "--max-new-tokens", "2", "--json"],
        capsys,
    )
    assert code == 0, err
    assert len(out.strip().splitlines()) == 2


def test_generate_into_a_closed_pipe_is_quiet(model_dir):
    # `true` exits at once, long before Python has started: every write meets a closed pipe.
    cmd = (
        f"{sys.executable} generate.py 'red cat' --model {model_dir} --max-new-tokens 2 | true; "
        'echo "status ${PIPESTATUS[0]}"'
    )
    run = subprocess.run(["bash", "-c", cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.stderr == "", run.stderr[-2000:]
    assert run.stdout.strip() == "status 141", run.stdout


# ---- causes 4 and 9: adapter files, PEFT configs, reproducible bytes ------------------------------
def rewrite_header(path, edit):
    """Rewrite a safetensors file's JSON header through edit(header) (tensor bytes unchanged)."""
    import struct

    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def meta_edit(**changes):
    def edit(h):
        h["__metadata__"].update(changes)

    return edit


def config_field(**changes):
    def edit(h):
        cfg = json.loads(h["__metadata__"]["config"])
        cfg.update(changes)
        h["__metadata__"]["config"] = json.dumps(cfg)

    return edit


@pytest.mark.parametrize(
    "method, edit, words",
    [
        ("para", lambda h: h.__setitem__("__metadata__", ["x"]), ("__metadata__ must map names to strings",)),
        ("para", meta_edit(format_version=None), ("__metadata__ must map",)),
        ("para", meta_edit(format_version="0"), ("format_version '0'",)),
        ("para", meta_edit(format_version="-7"), ("format_version '-7'",)),
        ("para", meta_edit(config={"r": 12}), ("__metadata__ must map",)),
        ("para", config_field(r="abc"), ("option r must be at least 1 (an integer)",)),
        ("para", config_field(r=-1), ("option r must be at least 1 (an integer)",)),
        ("para", config_field(r=2.5), ("option r",)),
        ("para", config_field(r=None), ("option r",)),
        ("para", config_field(up_bias="false"), ("option up_bias must be true or false",)),
        ("lora", config_field(alpha="x"), ("option alpha must be a finite number",)),
        ("lora", config_field(rslora="no"), ("option rslora must be true or false",)),
        ("lora", config_field(targets=5), ("option targets",)),
        (
            "para",
            lambda h: h[next(k for k in h if k != "__metadata__")].__setitem__("dtype", "I64"),
            ("holds I64 values", "floating point"),
        ),
    ],
)
def test_bad_adapter_metadata(tmp_path, method, edit, words):
    from conftest import tiny_args

    from minipara.errors import UserError
    from minipara.io.adapters import load_adapter, save_adapter
    from minipara.methods import build_adapter

    args = tiny_args("llama")
    path = tmp_path / "a.safetensors"
    save_adapter(path, build_adapter(method, args), args)
    rewrite_header(path, edit)
    with pytest.raises(UserError) as e:
        load_adapter(path, args)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_tensor(tmp_path, value, monkeypatch):
    from conftest import tiny_args

    import minipara.io.adapters
    from minipara.errors import UserError
    from minipara.io.adapters import load_adapter, save_adapter
    from minipara.methods import build_adapter

    args = tiny_args("llama")
    ad = build_adapter("lora", args)
    with torch.no_grad():
        ad.b["v"][1, 0, 3] = value
    monkeypatch.setattr(minipara.io.adapters, "check_values", lambda *a: None)  # save refuses it now: write it anyway
    save_adapter(tmp_path / "a.safetensors", ad, args)
    monkeypatch.undo()
    with pytest.raises(UserError, match="NaN or infinite"):
        load_adapter(tmp_path / "a.safetensors", args)


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"target_modules": 5}, ("target_modules must be a string or a list of strings",)),
        ({"lora_alpha": True}, ("option alpha must be a finite number",)),
        ({"lora_alpha": float("nan")}, ("option alpha must be a finite number",)),
        ({"r": True}, ("option r must be at least 1 (an integer)",)),
        ({"use_rslora": "no"}, ("rslora must be true or false",)),
    ],
)
def test_bad_peft_config(tmp_path, changes, words):
    from conftest import tiny_args

    from minipara.errors import UserError
    from minipara.io.adapters import load_adapter

    args = tiny_args("llama")
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **changes}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    t = {}
    for i in range(args.n_layers):
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        t[f"{p}.lora_A.weight"] = torch.zeros(2, args.dim)
        t[f"{p}.lora_B.weight"] = torch.zeros(args.q_dim, 2)
    save_file(t, tmp_path / "adapter_model.safetensors")
    with pytest.raises(UserError) as e:
        load_adapter(tmp_path, args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_adapter_files_are_byte_identical_across_processes(tmp_path):
    """safetensors keeps metadata in a hash map: the key order changed from process to process."""
    code = (
        "import sys; sys.path.insert(0, 'tests'); import torch; from conftest import tiny_args; "
        "from minipara.methods import build_adapter; from minipara.io.adapters import save_adapter; "
        "a = tiny_args('llama'); torch.manual_seed(0); "
        "save_adapter(sys.argv[1], build_adapter('lora', a), a, template='none', weights_id='0123')"
    )
    for name in ("a", "b", "c"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], cwd=ROOT, check=True, timeout=120)
    files = [(tmp_path / n).read_bytes() for n in "abc"]
    assert files[0] == files[1] == files[2]
    import struct

    (n,) = struct.unpack("<Q", files[0][:8])
    header = files[0][8 : 8 + n].rstrip(b" ")
    assert header == json.dumps(json.loads(header), sort_keys=True, separators=(",", ":")).encode()


def test_adapter_on_other_weights_warns(model_dir, tmp_path, capsys):
    """Cause 12: same config, other weights (a fine-tune, a chat variant): allowed, with a warning."""
    from minipara.io.adapters import save_adapter
    from minipara.io.checkpoints import load_model
    from minipara.methods import build_adapter

    model = load_model(model_dir)
    path = tmp_path / "a.safetensors"
    save_adapter(path, build_adapter("para", model.args), model.args, weights_id=model.weights_id)

    def edit(d):
        t = load_file(d / "model.safetensors")
        t["model.layers.0.mlp.up_proj.weight"] *= 1.5
        save_file(t, d / "model.safetensors")

    other = copy_with(model_dir, tmp_path, edit)
    args = ["red cat", "--adapter", path, "--max-new-tokens", "2", "--model"]
    code, out, err = run_script("generate", [*args, model_dir], capsys)
    assert code == 0 and err == "", err
    code, out, err = run_script("generate", [*args, other], capsys)
    assert code == 0, err
    assert err.startswith("warning: ") and "other weights" in err and len(err.strip().splitlines()) == 1, err


# ---- causes 3, 5, 6, 7, 8: train.py ------------------------------------------------------------
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = [{"prompt": f"the {c} cat", "response": "yes" if c == "red" else "no"} for c in ["red", "blue"] * 4]
    for name in ("train", "dev"):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "long.jsonl").write_text(json.dumps({"prompt": "red cat " * 200, "response": "yes"}) + "\n")
    (d / "bad.jsonl").write_bytes(b'{"prompt": "red", "response": "yes"}\n{"prompt": "bl\xffue", "response": "no"}\n')
    return d


def train_args(model_dir, data_dir, out, *extra, method="para"):
    return [
        "--method",
        method,
        "--task",
        "custom",
        "--model",
        model_dir,
        "--train",
        data_dir / "train.jsonl",
        "--dev",
        data_dir / "dev.jsonl",
        "--out",
        out,
        "--batch-size",
        "4",
        "--max-steps",
        "1",
        "--eval-beams",
        "1",
        "--max-eval",
        "2",
        *extra,
    ]


def test_train_refusals(model_dir, data_dir, tmp_path, capsys):
    w = tmp_path / "w"
    w.mkdir()
    out = w / "a.safetensors"
    (w / "report-only.report.json").write_text("{}")
    (w / "file").write_text("x")
    t = data_dir / "train.jsonl"
    d = dict(model_dir=model_dir, data_dir=data_dir)
    cases = [
        (train_args(**d, out=out, method="iapt") + ["--soft-tokens", "600"], ("600 prefix slots",)),
        (train_args(**d, out=out, method="ptuning_v2") + ["--prefix-len", "1000"], ("1000 prefix slots",)),
        (train_args(model_dir, data_dir, out) + ["--train", data_dir / "long.jsonl"], ("train example 1",)),
        (train_args(**d, out=out) + ["--train", data_dir / "bad.jsonl"], ("bad.jsonl:2", "not UTF-8")),
        (train_args(**d, out=out) + ["--resume"], ("--resume: no checkpoint",)),
        (train_args(**d, out=out) + ["--lr", "nan"], ("--lr", "finite")),
        (train_args(**d, out=out) + ["--lr", "inf"], ("--lr", "finite")),
        (train_args(**d, out=out) + ["--arch-lr", "nan"], ("--arch-lr", "finite")),
        (train_args(**d, out=out) + ["--seed", "100000000000000000000000"], ("--seed",)),
        (train_args(**d, out=out) + ["--max-new-tokens", "-3"], ("--max-new-tokens must be at least 1",)),
        (train_args(**d, out=out) + ["--max-new-tokens", "0"], ("--max-new-tokens must be at least 1",)),
        (train_args(**d, out=out) + ["--r", "0"], ("--r must be at least 1 (an integer)",)),
        (train_args(**d, out=out) + ["--batch-size", "0"], ("--batch-size must be at least 1",)),
        (train_args(**d, out=out, method="lora") + ["--alpha", "nan"], ("--alpha must be a finite number",)),
        (train_args(**d, out=""), ("--out is empty",)),
        (train_args(**d, out=out) + ["--r", "abc"], ("--r needs an integer",)),
        (train_args(**d, out=t) + ["--force"], ("is the --train file",)),
        (train_args(**d, out=w / "run.ckpt"), ("would both be",)),
        (train_args(**d, out=data_dir / "x.safetensors") + ["--dev", data_dir / "x.log.jsonl"], ("is the --dev file",)),
        (train_args(**d, out=w / "report-only.safetensors", method="none"), ("report-only.report.json exists",)),
        (train_args(**d, out=w / "file" / "a.safetensors"), ("not a writable folder",)),
        (
            train_args(**d, out=w / "new" / "deeper" / "a.safetensors", method="iapt") + ["--soft-tokens", "600"],
            ("600 prefix slots",),
        ),
    ]
    (data_dir / "x.log.jsonl").write_text((data_dir / "dev.jsonl").read_text())
    for argv, words in cases:
        refused("train", argv, capsys, *words, watch=[w, data_dir])


def test_train_refuses_an_output_in_use(model_dir, data_dir, tmp_path, capsys):
    from minipara.io.files import OutputLock

    out = tmp_path / "a.safetensors"
    with OutputLock(out):  # another run holds it
        refused(
            "train",
            train_args(model_dir, data_dir, out),
            capsys,
            "being written by another run",
            "pid",
            watch=[tmp_path],
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_refuses_an_output_sharing_side_files_with_a_run(model_dir, data_dir, tmp_path, capsys):
    """a.safetensors and a.pt share a.ckpt, a.log.jsonl and a.report.json: while a run of one
    holds them, a run of the other is refused before it writes anything."""
    from minipara.io.files import OutputLock

    with OutputLock(tmp_path / "a.safetensors"), OutputLock(tmp_path / "a.ckpt"):  # as a run holds them
        refused(
            "train",
            train_args(model_dir, data_dir, tmp_path / "a.pt"),
            capsys,
            "being written by another run",
            watch=[tmp_path],
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_killed_runs_temporary_files_go_with_the_next_run(model_dir, data_dir, tmp_path, capsys):
    """A run killed mid-write (SIGKILL) leaves atomic_write's .<name>.*.tmp files; the next run of
    that output, holding its locks, removes them."""
    out = tmp_path / "a.safetensors"
    stale = [tmp_path / ".a.safetensors.k1ll3d.tmp", tmp_path / ".a.ckpt.k1ll3d.tmp"]
    for f in stale:
        f.write_bytes(b"half")
    code, _, err = run_script("train", train_args(model_dir, data_dir, out), capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.log.jsonl", "a.report.json", "a.safetensors"]


def test_train_resume_refusals_and_repair(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    args = train_args(model_dir, data_dir, out)
    code, _, err = run_script("train", args, capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "a.log.jsonl", "a.report.json", "a.safetensors"]
    good = torch.load(out.with_suffix(".ckpt"), weights_only=True)

    def damaged(edit):
        ck = torch.load(out.with_suffix(".ckpt"), weights_only=True)
        edit(ck)
        torch.save(ck, out.with_suffix(".ckpt"))

    for edit, words in [
        (lambda ck: ck.pop("identity"), ("lacks the record",)),
        (lambda ck: ck["adapter"].__setitem__("gen.w_up", torch.zeros(1, 2)), ("is damaged",)),
        (lambda ck: ck["progress"].__setitem__("step", "seven"), ("step = 'seven'",)),
        (lambda ck: ck["progress"].__setitem__("step", -3), ("step = -3",)),
    ]:
        torch.save(good, out.with_suffix(".ckpt"))
        damaged(edit)
        refused("train", args + ["--resume"], capsys, *words, watch=[tmp_path])

    # Cause 12: the same config with other weights: a run continues on the weights it started on.
    torch.save(good, out.with_suffix(".ckpt"))

    def edit(d):
        t = load_file(d / "model.safetensors")
        t["model.norm.weight"] += 0.5
        save_file(t, d / "model.safetensors")

    other = copy_with(model_dir, tmp_path / "m", edit)
    refused("train", train_args(other, data_dir, out) + ["--resume"], capsys, "other weights", watch=[tmp_path])

    # A finished run whose adapter was deleted: resuming writes it again.
    first = out.read_bytes()
    out.unlink()
    code, _, err = run_script("train", args + ["--resume"], capsys)
    assert code == 0, err
    assert out.read_bytes() == first


def test_identical_runs_write_identical_adapters(model_dir, data_dir, tmp_path, capsys):
    outs = [tmp_path / f"r{i}" / "a.safetensors" for i in range(2)]
    for out in outs:
        code, _, err = run_script("train", train_args(model_dir, data_dir, out), capsys)
        assert code == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()


# ---- cause 10: bench.py flags ------------------------------------------------------------------
def test_bench_refusals(model_dir, tmp_path, capsys):
    m = ["--model", model_dir, "--runs", "1", "--warmup", "0"]
    cases = [
        (["--beams", "abc"], ("--beams 'abc'",)),
        (["--beams", "1,"], ("--beams '1,'",)),
        (["--beams", "0"], ("--beams must be at least 1",)),
        (["--runs", "0"], ("--runs must be at least 1",)),
        (["--new-tokens", "1"], ("--new-tokens must be at least 2",)),
        (["--tenants", "-1"], ("--tenants must be at least 0",)),
        (["--tenants", "1", "--mix", "--methods", "base"], ("--tenants needs at least one adapter method",)),
        (["--json", tmp_path / "missing" / "x.json"], ("--json", "not a writable folder")),
        (["--profile", tmp_path / "missing" / "p.txt"], ("--profile", "not a writable folder")),
        (["--prompt-tokens", "-400"], ("--prompt-tokens must be at least 1",)),
        (["--methods", ","], ("names no method",)),
        (["--prompt-tokens", "250", "--new-tokens", "8", "--methods", "base"], ("exceed the model's context",)),
        (["--prompt-tokens", "190", "--new-tokens", "8", "--methods", "base,ptuning_v2"], ("64 prefix slots",)),
    ]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        cases.append((["--plot", tmp_path / "p.png"], ("--plot needs matplotlib",)))
    for argv, words in cases:
        refused("bench", [*m, *argv], capsys, *words, watch=[tmp_path])
