"""Incremental detokenisation (minipara/serve/detokenize.py): after every new token, the text
equals decoding the whole list, for this project's tokenizers (SentencePiece with byte
fallback, tokenizer.json byte-level BPE), on any text and on arbitrary token ids."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipara.io.tokenizer import JsonTokenizer, Tokenizer
from minipara.io.weights import ensure_default_model, ensure_model
from minipara.serve.detokenize import Detokenizer, piece


@pytest.fixture(scope="module", params=["gemma-3-270m", "smollm2-135m-instruct"])
def tok(request):
    if request.param == "gemma-3-270m":
        return Tokenizer(ensure_default_model())
    return JsonTokenizer(ensure_model(request.param))


@pytest.fixture(scope="module")
def partial(tok):
    """Ids that decode alone to an incomplete character (byte tokens)."""
    return [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"]


def check(tok, ids):
    d = Detokenizer()
    for n in range(1, len(ids) + 1):
        assert d.text(ids[:n], tok.decode) == tok.decode(ids[:n]), (ids, n)


TEXTS = [
    "The year 2024 had 366 days.",
    "naïve café — “quotes” 日本語 🙂🙂 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading spaces\tand\ttabs\n\nnew lines  ",
    "def f(x):\n    return x**2  # squared",
    "<start_of_turn>user\nhi<end_of_turn><|im_start|>user<|im_end|>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_the_text_of_every_prefix_equals_decoding_it_whole(tok, text):
    check(tok, tok.encode(text))


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_any_texts_tokens(tok, text):
    check(tok, tok.encode(text))


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_arbitrary_token_ids(tok, partial, data):
    """What a model may sample: any ids, among them byte tokens that make no character alone."""
    assert len(partial) >= 64
    any_id, byte_id = st.integers(0, tok.vocab_size - 1), st.sampled_from(partial)
    check(tok, data.draw(st.lists(st.one_of(any_id, byte_id, byte_id), max_size=24)))


def test_each_token_decodes_a_bounded_window(tok):
    """The point of it: a token costs a decode of a few tokens, however long the text, also
    where characters are split over byte tokens (no falling back to decoding everything)."""
    ids = tok.encode(" ".join(TEXTS) * 20)
    decoded = []

    def decode(x):
        decoded.append(len(x))
        return tok.decode(x)

    d = Detokenizer()
    for n in range(1, len(ids) + 1):
        d.text(ids[:n], decode)
    assert len(ids) > 500 and max(decoded) <= 16


@pytest.mark.parametrize("text", TEXTS)
def test_a_logprobs_piece_is_what_the_token_adds_to_all_the_text_before_it(tok, text):
    ids = tok.encode(text * 3)
    for j, t in enumerate(ids):
        whole = tok.decode(ids[:j])
        assert piece(ids, j, t, tok.decode) == tok.decode([*ids[:j], t])[len(whole) :], j
    if "\ufffd" not in "".join(tok.decode([t]) for t in ids):  # (byte tokens have no text of their own)
        assert "".join(piece(ids, j, t, tok.decode) for j, t in enumerate(ids)) == tok.decode(ids)


def test_a_context_whose_text_changes_falls_back_to_decoding_everything():
    """A decode that is not a prefix of a longer one's (made up: the last token rewrites the text)."""

    def decode(ids):
        return "".join(map(str, ids)) if ids[-1:] != [0] else "rewritten"

    d = Detokenizer()
    ids = [1, 2, 3, 4, 5, 6]
    for n in range(1, 7):
        assert d.text(ids[:n], decode) == decode(ids[:n])
    assert d.text([*ids, 0], decode) == "rewritten"
    assert d.text([*ids, 0, 7], decode) == "12345607"
