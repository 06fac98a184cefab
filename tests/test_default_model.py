"""The default model: its conversion from the GGUF (checked through HF transformers, the
reference implementation), its tokenizer and the chat templates.

The first test run converts the model (about 30 s on 2 CPU cores); later runs reuse it.
"""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minipara.errors import UserError
from minipara.io.tokenizer import Tokenizer, apply_template, encode_example
from minipara.io.weights import hf_name


@pytest.fixture(scope="module")
def default_dir():
    from minipara.io.weights import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="module")
def tok(default_dir):
    return Tokenizer(default_dir)


def test_tensor_names_map_to_hf():
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.17.attn_output.weight") == "model.layers.17.self_attn.o_proj.weight"
    assert hf_name("blk.0.ffn_norm.weight") == "model.layers.0.pre_feedforward_layernorm.weight"
    assert hf_name("blk.3.post_ffw_norm.weight") == "model.layers.3.post_feedforward_layernorm.weight"
    with pytest.raises(ValueError):
        hf_name("blk.0.attn_qkv.weight")


def test_converted_directory(default_dir):
    for f in ("config.json", "model.safetensors", "tokenizer.model"):
        assert (default_dir / f).is_file()
    cfg = json.loads((default_dir / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["num_hidden_layers"] == 18 and cfg["head_dim"] == 256
    assert cfg["layer_types"].count("full_attention") == 3 and cfg["layer_types"][5] == "full_attention"


@pytest.fixture(scope="module")
def hf_model(default_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(default_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize(
    "prompt, expected", [("The capital of France is the city of", "Paris"), ("Water boils at", "100")]
)
def test_hf_transformers_continues_correctly(hf_model, tok, prompt, expected):
    ids = torch.tensor([tok.encode(prompt, bos=True)])
    out = hf_model.generate(ids, max_new_tokens=12, do_sample=False)
    assert expected in tok.decode(out[0, ids.shape[1] :].tolist())


@pytest.fixture(scope="module")
def model(default_dir):
    from minipara.io.checkpoints import load_model

    return load_model(default_dir)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("The capital of France is the city of", " Paris. It is the most visited"),
        ("Water boils at", " 100 degrees Celsius."),
    ],
)
def test_minipara_continues_correctly(model, tok, prompt, expected):
    """minipara's own stack, loaded the ordinary HF way: the continuation HF transformers gives."""
    from minipara.decode.generation import GenerationConfig, generate

    out = generate(model, [tok.encode(prompt, bos=True)], GenerationConfig(max_new_tokens=8))
    assert tok.decode(out[0]).startswith(expected)


def test_minipara_and_hf_agree_on_the_default_model(model, hf_model, tok):
    ids = torch.tensor([tok.encode("The capital of France is the city of", bos=True)])
    with torch.no_grad():
        assert (model(ids) - hf_model(ids).logits).abs().max() < 1e-4  # float32; |logits| reach 24


# Any Unicode text except surrogates (not encodable as UTF-8) and U+2581, the "▁" SentencePiece
# writes for a space, which therefore decodes to " ".
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"), max_size=80)


@settings(max_examples=200, deadline=None)
@given(s=TEXT)
def test_tokenizer_round_trips_text(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_tokenizer_round_trips_whitespace_and_emoji(tok):
    s = "  Two  spaces,\ttabs\n\nnew lines, ünïcödé, 日本語 and 😀🇫🇷.\n"
    assert tok.decode(tok.encode(s)) == s
    assert tok.encode(s, bos=True)[0] == tok.bos_id == 2


def test_chat_markers_are_single_tokens(tok):
    assert tok.encode("<start_of_turn>") == [tok.token_id("<start_of_turn>")]
    assert tok.encode("<end_of_turn>") == [tok.token_id("<end_of_turn>")]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)


@pytest.mark.parametrize("template", ["llama2", "gemma", "none"])  # the SentencePiece families' templates
def test_encode_example(tok, template):
    prompt_ids, response_ids = encode_example(tok, template, "What is 2+2?", "4")
    end = tok.token_id("<end_of_turn>") if template == "gemma" else tok.eos_id
    assert prompt_ids[0] == tok.bos_id and prompt_ids.count(tok.bos_id) == 1
    assert response_ids[-1] == end and tok.decode(response_ids[:-1]).strip() == "4"
    assert encode_example(tok, template, "What is 2+2?")[0] == prompt_ids  # inference sees the same prompt
    prompt_text, response_text = apply_template(template, "What is 2+2?", "4")
    assert "What is 2+2?" in prompt_text and "4" in response_text


def test_gemma_template_tokens(tok):
    prompt_ids, _ = encode_example(tok, "gemma", "Hi", "Hello")
    sot, eot = tok.token_id("<start_of_turn>"), tok.token_id("<end_of_turn>")
    assert prompt_ids == [tok.bos_id, sot, *tok.encode("user\nHi"), eot, *tok.encode("\n"), sot, *tok.encode("model\n")]


def test_unknown_template(tok):
    with pytest.raises(UserError, match="llama2, gemma, chatml, llama3, none"):
        encode_example(tok, "alpaca", "x")
    with pytest.raises(UserError, match="<|im_end|>, a token this model's tokenizer does not have"):
        encode_example(tok, "chatml", "x", "y")
