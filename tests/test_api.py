"""The public Python API (minipara.load, LanguageModel): README's example runs, and generation
through the API is the low-level generate() with the library's template, stop and truncation rules."""

import re
from pathlib import Path

import pytest

import minipara
from minipara.decode.generation import GenerationConfig, generate
from minipara.io.tokenizer import encode_example

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm(model_dir):
    return minipara.load(model_dir)


def readme_example() -> str:
    section = ROOT.joinpath("README.md").read_text().split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(model_dir, tmp_path, monkeypatch):
    """README's Python section, run as written, on the tiny model in place of the default one."""
    import minipara.io.weights

    monkeypatch.setattr(minipara.io.weights, "ensure_model", lambda name, quiet=False: model_dir)
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)
    assert (tmp_path / "runs/para-copa.safetensors").is_file()
    assert scope["result"].step == 2 and len(scope["outs"]) == 2
    assert scope["tenant"].template == "none"  # the tiny model ships no chat template
    assert (tmp_path / "runs/lora-peft/adapter_config.json").is_file()
    assert (tmp_path / "runs/lora-merged/model.safetensors").is_file()


def test_every_public_name_has_a_docstring():
    for name in minipara.__all__:
        obj = getattr(minipara, name)
        if callable(obj):
            assert obj.__doc__, name
    for name, member in vars(minipara.LanguageModel).items():
        if not name.startswith("_") and callable(member):
            assert member.__doc__, name


def test_generate_equals_the_low_level_path(lm, model_dir):
    ids = encode_example(lm.tokenizer, "none", "red cat is")[0]
    want = generate(lm.model, [ids], GenerationConfig(max_new_tokens=6, eos_ids=(2,)))[0]
    out = lm.generate("red cat is", max_new_tokens=6, template="none")
    assert out.prompt_tokens == ids and out.tokens == want
    stopped = want[-1] == 2
    assert out.finish_reason == ("stop" if stopped else "length")
    assert out.text == lm.tokenizer.decode(want[:-1] if stopped else want)


def test_mixed_batch_rows_match_single_requests(lm):
    a = lm.new_adapter("lora", seed=1)
    with __import__("torch").no_grad():
        for p in a.parameters():
            p.normal_(0, 0.3)  # LoRA's B starts at zero: make it change something
    prompts = ["red cat is", "the big dog", "a small sun"]
    mixed = lm.generate(prompts, adapter=[a, None, a], max_new_tokens=5)
    alone = [lm.generate(p, adapter=x, max_new_tokens=5) for p, x in zip(prompts, [a, None, a])]
    assert [m.tokens for m in mixed] == [s.tokens for s in alone]
    assert mixed[0].tokens != lm.generate(prompts[0], max_new_tokens=5).tokens


def test_streamed_pieces_add_up_to_the_text(lm):
    pieces = []
    out = lm.generate("blue moon", max_new_tokens=8, on_text=lambda row, piece: pieces.append((row, piece)))
    assert {r for r, _ in pieces} <= {0} and "".join(p for _, p in pieces) == out.text


def test_truncation_is_the_librarys(lm):
    long = " ".join(["red cat"] * 200)
    with pytest.raises(minipara.UserError) as e:
        lm.generate(long, max_new_tokens=8)
    assert "exceeds the model's context" in str(e.value) and "--" not in str(e.value)
    assert "--truncate" in e.value.flag_message()  # what the scripts print
    out = lm.generate(long, max_new_tokens=8, truncate=True)
    assert len(out.prompt_tokens) == lm.args.max_seq_len - 8 and out.prompt_tokens[0] == lm.tokenizer.bos_id


def test_library_errors_name_parameters_not_flags(lm):
    for kwargs, name in (({"beams": 0}, "beams"), ({"max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(minipara.UserError) as e:
            lm.generate("red", **kwargs)
        assert name in str(e.value) and "--" not in str(e.value)
        assert "--" + name.replace("_", "-") in e.value.flag_message()
    with pytest.raises(minipara.UserError, match="no option 'beam'"):
        lm.generate("red", beam=2)
    with pytest.raises(minipara.UserError, match="2 adapters for 1 prompts"):
        lm.generate(["red"], adapter=[None, None])


@pytest.mark.parametrize(
    "method, options, words",
    [
        ("para", {"r": 10**9}, "parameters"),
        ("lora", {"r": 10**9}, "parameters"),
        ("iapt", {"soft_tokens": 10**6}, "parameters"),
    ],
)
def test_absurd_adapter_sizes_refused(lm, method, options, words):
    """Issue 26: r=10**9 tried to allocate hundreds of GB; refused with the count, allocating nothing."""
    with pytest.raises(minipara.UserError, match=words):
        lm.new_adapter(method, **options)


# ---- issue 26, cause 3: every argument checked at the door, the parameter named ----------------
def other_model_adapter(lm, **changes):
    """A LoRA adapter built for ModelArgs other than lm's."""
    from dataclasses import replace

    from minipara.methods import build_adapter

    return build_adapter("lora", replace(lm.args, **changes))


API_REFUSALS = [
    # (call on lm, the parameter the error names, words in it)
    (lambda lm: lm.generate(123), "prompt", "a string or a list of strings"),
    (lambda lm: lm.generate(["red", 5]), "prompt", "a string or a list of strings"),
    (lambda lm: lm.generate("red", max_new_tokens=1.5), "max_new_tokens", "an integer"),
    (lambda lm: lm.generate("red", max_new_tokens="8"), "max_new_tokens", "an integer"),
    (lambda lm: lm.generate("red", seed=2**70, temperature=1.0), "seed", "from 0 to 4294967295"),
    (lambda lm: lm.generate("red", seed=-1, temperature=1.0), "seed", "from 0 to 4294967295"),
    (lambda lm: lm.generate("red", top_k=2.5, temperature=1.0), "top_k", "an integer"),
    (lambda lm: lm.generate("red", temperature="hot"), "temperature", "a finite number"),
    (lambda lm: lm.generate("red", beams=True), "beams", "an integer"),
    (lambda lm: lm.generate("red", config={"max_new_tokens": 4}), "config", "GenerationConfig"),
    (lambda lm: lm.generate("red", adapter="runs/a.safetensors"), "adapter", "lm.load_adapter(path)"),
    (lambda lm: lm.generate(["red"], adapter=["runs/a.safetensors"]), "adapter", "lm.load_adapter(path)"),
    (lambda lm: lm.generate("red", adapter=lm.model), "adapter", "must be an Adapter"),
    (lambda lm: lm.generate(["red", "cat"], adapter=[None]), "adapter", "1 adapters for 2 prompts"),
    (lambda lm: lm.generate("red", adapter=other_model_adapter(lm, dim=64)), "adapter", "dim 64; this model is"),
    (
        lambda lm: lm.generate("red", adapter=other_model_adapter(lm, rope_theta=1.0)),
        "adapter",
        "rope_theta 1.0 there",
    ),
    (lambda lm: lm.generate("red", template=3), "template", "a string"),
    (lambda lm: lm.generate("red", truncate="yes"), "truncate", "true or false"),
    (lambda lm: lm.generate("red", on_text="print"), "on_text", "a function"),
    (lambda lm: lm.new_adapter(7), "method", "a string"),
    (lambda lm: lm.new_adapter("lora", seed=2**70), "seed", "from 0 to"),
    (lambda lm: lm.new_adapter("lora", seed=1.5), "seed", "from 0 to"),
    (lambda lm: lm.load_adapter(None), "path", "a path"),
    (lambda lm: lm.save_adapter("x.safetensors", "runs/a.safetensors"), "adapter", "lm.load_adapter(path)"),
    (lambda lm: lm.save_adapter(5, lm.new_adapter("lora")), "path", "a path"),
    (lambda lm: lm.export_peft(None, "out"), "adapter", "must be an Adapter"),
    (lambda lm: lm.export_merged(other_model_adapter(lm, n_layers=5), "out"), "adapter", "5 layers"),
    (lambda lm: lm.evaluate(None, "copa", batch=0), "batch", "at least 1"),
    (lambda lm: lm.evaluate(None, "copa", beams=2.0), "beams", "at least 1"),
    (lambda lm: lm.evaluate(None, "copa", max_eval=0), "max_eval", "at least 1"),
    (lambda lm: lm.evaluate("runs/a.safetensors", "copa"), "adapter", "lm.load_adapter(path)"),
    (lambda lm: lm.evaluate(None, 5), "task", "a string"),
    (lambda lm: lm.train("runs/a.safetensors", "copa"), "adapter", "lm.load_adapter(path)"),
    (lambda lm: lm.train(lm.new_adapter("lora"), "copa", lr=1e-3), "config", "TrainConfig"),
    (lambda lm: lm.train(lm.new_adapter("lora"), "copa", config={"lr": 1e-3}), "config", "TrainConfig"),
    (lambda lm: lm.train(lm.new_adapter("lora"), "copa", max_eval=2.5), "max_eval", "at least 1"),
    (lambda lm: minipara.TrainConfig(lr="1e-4"), "lr", "a finite number"),
    (lambda lm: minipara.TrainConfig(max_steps=1.5), "max_steps", "an integer or None"),
    (lambda lm: minipara.TrainConfig(epochs="3"), "epochs", "an integer"),
    (lambda lm: minipara.TrainConfig(select=1), "select", "a string"),
    (lambda lm: minipara.TrainConfig(seed=-1).resolved(10), "seed", "from 0 to"),
    (lambda lm: minipara.load(3), "path", "a path"),
    (lambda lm: minipara.load(lm.path, device=0), "device", "cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize("call, name, words", API_REFUSALS, ids=[f"{i}-{c[1]}" for i, c in enumerate(API_REFUSALS)])
def test_api_arguments_are_checked(lm, call, name, words):
    with pytest.raises(minipara.UserError) as e:
        call(lm)
    assert name in e.value.options and name in str(e.value), str(e.value)
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "options, name, words",
    [
        (dict(lr="1e-4"), "lr", "must be a finite number, got '1e-4'"),
        (dict(max_steps=1.5), "max_steps", "must be an integer or None"),
        (dict(seed=2**70), "seed", "from 0 to 4294967295"),
        (dict(max_eval="10"), "max_eval", "must be at least 1 (an integer) or None"),
        (dict(max_test=-1), "max_test", "must be at least 0 (an integer) or None"),
        (dict(max_new_tokens=2.5), "max_new_tokens", "must be at least 1 (an integer) or None"),
        (dict(resume="yes"), "resume", "must be true or false"),
        (dict(force=1), "force", "must be true or false"),
        (dict(shard_base=None), "shard_base", "must be true or false"),
        (dict(config={"lr": 1e-4}), "config", "must be a minipara.TrainConfig"),
        (dict(template=3), "template", "must be a string"),
        (dict(train=7), "train", "must be a path"),
    ],
)
def test_run_arguments_are_checked(model_dir, tmp_path, options, name, words):
    """minipara.run refuses before it writes anything."""
    with pytest.raises(minipara.UserError) as e:
        minipara.run("lora", "copa", model=model_dir, out=tmp_path / "a.safetensors", progress=False, **options)
    assert name in e.value.options and words in str(e.value), str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "family, changes",
    [
        ("llama", {}),
        ("gemma", {}),
        ("llama", dict(attention_bias=True, mlp_bias=True, tie_embeddings=True)),
        ("gemma", dict(tie_embeddings=True, n_kv_heads=2)),
    ],
)
def test_base_size_by_arithmetic(family, changes, monkeypatch):
    """methods.construct's limit is the base's size, counted from ModelArgs: no model is built
    (not even on the meta device) at each adapter build or load."""
    from dataclasses import replace

    import torch
    from conftest import tiny_args

    from minipara.methods import build_adapter
    from minipara.model import transformer

    args = replace(tiny_args(family), **changes)
    with torch.device("meta"):
        assert transformer.n_params(args) == sum(p.numel() for p in transformer.Transformer(args).parameters())
    monkeypatch.setattr(transformer.Transformer, "__init__", lambda *a: pytest.fail("built a whole model"))
    build_adapter("lora", args)
