"""tokenizer.json checkpoints (the `tokenizers` library), chosen when there is no tokenizer.model,
with LLaMA 3's header-turn chat template: ids equal to transformers' AutoTokenizer."""

import json

import pytest

from minipara.io.tokenizer import JsonTokenizer, encode_example, end_id, load_tokenizer, resolve_template

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEXTS = [
    "Hello world",
    "What is 2+2? Answer in one word.",
    "  spaced  out  ",
    "line one\nline two",
    "café, naïve, 東京",
    "The red dog and the blue cat.",
]


def write_llama3_dir(d, chat: bool):
    """A LLaMA-3-style tokenizer.json (byte-level BPE trained on a few sentences; BOS added by its
    post-processor) and tokenizer_config.json, with or without the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = TEXTS * 3 + ["the quick brown fox jumps over the lazy dog " * 3, "user assistant system answer"]
    tk.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", tk.token_to_id("<|begin_of_text|>"))]
    )
    d.mkdir(parents=True, exist_ok=True)
    tk.save(str(d / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    if chat:
        cfg["chat_template"] = LLAMA3_TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("chat", [True, False])
def test_llama3_ids_equal_autotokenizer(tmp_path, chat):
    d = write_llama3_dir(tmp_path / "tok", chat)
    tok, hf = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert isinstance(tok, JsonTokenizer) and tok.add_bos and tok.bos_id == hf.bos_token_id
    assert resolve_template("auto", "llama", d) == ("llama3" if chat else "none")
    for text in TEXTS:
        prompt, response = encode_example(tok, "none", text, "ok")
        assert prompt == hf(text)["input_ids"], text  # BOS from the post-processor, as transformers adds it
        prompt, response = encode_example(tok, "llama3", text, "Four.")
        messages = [{"role": "user", "content": text}]
        # Without a chat template of its own, the fixed LLaMA 3 format gives what the official template does.
        want = transformers.AutoTokenizer.from_pretrained(write_llama3_dir(tmp_path / "ref", True)).apply_chat_template(
            messages, add_generation_prompt=True
        )
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        if text == text.strip():  # the official template trims the message; the fixed format keeps it
            assert prompt == want, text
        assert prompt.count(tok.bos_id) == 1 and response[-1] == end_id(tok, "llama3") == tok.token_id("<|eot_id|>")


def test_tokenizer_model_wins_over_tokenizer_json(tmp_path):
    from conftest import write_tiny_model_dir

    d = write_tiny_model_dir(tmp_path)
    write_llama3_dir(d, chat=False)
    assert not isinstance(load_tokenizer(d), JsonTokenizer)  # both present: SentencePiece, as before
    (d / "tokenizer.model").unlink()
    assert isinstance(load_tokenizer(d), JsonTokenizer)


@pytest.mark.parametrize("chat", [True, False])
def test_conversations_equal_apply_chat_template(tmp_path, chat):
    """encode_chat (the server's chat format for these models): several turns, as transformers renders them."""
    from minipara.io.tokenizer import encode_chat

    tok = load_tokenizer(write_llama3_dir(tmp_path / "tok", chat))
    ref = transformers.AutoTokenizer.from_pretrained(write_llama3_dir(tmp_path / "ref", True))
    talk = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And 3+3?"},
    ]
    want = ref.apply_chat_template(talk, add_generation_prompt=True)
    assert encode_chat(tok, "llama3", talk) == list(want["input_ids"] if hasattr(want, "keys") else want)
    assert encode_chat(tok, "llama3", talk[1:2]) == encode_example(tok, "llama3", "What is 2+2?")[0]
