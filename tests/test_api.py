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
