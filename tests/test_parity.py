"""minipara's forward, cache and generation against HF transformers on tiny random checkpoints."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from conftest import DEVICE, DTYPE, exact_only, tiny_model, tol  # noqa: E402

from minipara.decode.generation import Decoder, GenerationConfig, _beam_search, generate, left_pad  # noqa: E402
from minipara.io.checkpoints import load_model  # noqa: E402

VOCAB = 128


def hf_llama(kv_heads: int, tie: bool, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_gemma3(seed: int, window: int = 8):
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=VOCAB,
        sliding_window=window,
        max_position_embeddings=256,
        query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
    )
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises Gemma norms to zero ((1 + w) = 1): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


def hf_gemma1(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.GemmaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        hidden_activation="gelu_pytorch_tanh",
    )
    model = transformers.GemmaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0, 0.3)
    return model


CASES = {
    "llama-mha-untied": lambda: hf_llama(4, False, 0),
    "llama-gqa-tied": lambda: hf_llama(2, True, 1),
    "llama-mqa-untied": lambda: hf_llama(1, False, 2),
    "gemma3-sliding": lambda: hf_gemma3(3),
    "gemma1": lambda: hf_gemma1(5),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    hf = CASES[request.param]()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf.to(DEVICE, DTYPE), load_model(path, DTYPE, DEVICE)


def padded_batch(seed: int, lengths: list[int]):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    tokens = torch.randint(3, VOCAB, (len(lengths), T), generator=g)
    valid = torch.arange(T)[None] >= T - torch.tensor(lengths)[:, None]
    return tokens.to(DEVICE), valid.to(DEVICE)


def test_logits_match_hf_on_left_padded_batch(pair):
    hf, ours = pair
    tokens, valid = padded_batch(0, [23, 9, 17])  # longer than the sliding window of 8
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # what HF's generate() passes for left padding
    with torch.no_grad():
        ref = hf(tokens, attention_mask=valid.long(), position_ids=pos).logits
        got = ours(tokens, valid=valid)
    assert (ref - got)[valid].abs().max() < tol(1e-4)


def test_logits_match_hf_on_right_padded_batch(pair):
    hf, ours = pair
    tokens, valid = padded_batch(1, [20, 12])
    valid, tokens = valid.flip(1), tokens.flip(1)  # right padding
    with torch.no_grad():
        ref = hf(tokens, attention_mask=valid.long()).logits
        got = ours(tokens, valid=valid)
    assert (ref - got)[valid].abs().max() < tol(1e-4)


@exact_only
def test_greedy_generation_matches_hf(pair):
    hf, ours = pair
    tokens, valid = padded_batch(2, [11, 6])
    with torch.no_grad():
        ref = hf.generate(
            tokens,
            attention_mask=valid.long(),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )[:, tokens.shape[1] :]
    prompts = [t[v].tolist() for t, v in zip(tokens, valid)]
    got = generate(ours, prompts, GenerationConfig(max_new_tokens=32, eos_ids=()))
    assert got == ref.tolist()


@exact_only
@pytest.mark.parametrize("eos", [None, 5])
def test_beam_search_matches_hf(pair, eos):
    hf, ours = pair
    tokens, valid = padded_batch(3, [9, 14])
    with torch.no_grad():
        ref = hf.generate(
            tokens,
            attention_mask=valid.long(),
            max_new_tokens=12,
            num_beams=3,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=eos,
            length_penalty=1.0,
        )
    ref = ref[:, tokens.shape[1] :].tolist()
    ref = [r[: r.index(eos) + 1] if eos in r else r for r in ref]  # HF pads after EOS
    prompts = [t[v].tolist() for t, v in zip(tokens, valid)]
    got = generate(ours, prompts, GenerationConfig(max_new_tokens=12, beams=3, eos_ids=(eos,) if eos else ()))
    assert got == ref


@pytest.fixture(scope="module")
def stop_pair(tmp_path_factory):
    hf = hf_llama(2, True, 1)
    path = tmp_path_factory.mktemp("stop")
    hf.save_pretrained(path)
    return hf.to(DEVICE, DTYPE), load_model(path, DTYPE, DEVICE)


@exact_only
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_eos=st.integers(0, 8),
    first_tokens=st.booleans(),
    beams=st.integers(2, 4),
    lengths=st.lists(st.integers(2, 12), min_size=1, max_size=3),
)
def test_beam_search_stops_as_hf_does(stop_pair, seed, n_eos, first_tokens, beams, lengths):
    """The search ends where HF's does, with the same hypotheses, having run at most one more
    model step: the stop test reads each step's flag one step late (generation.py,
    _beam_search). `first_tokens` makes every row's best first tokens EOS ids, so that the
    searches end at once."""
    hf, ours = stop_pair
    tokens, valid = padded_batch(seed, lengths)
    eos = set(random.Random(seed).sample(range(3, VOCAB), n_eos))
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        if first_tokens:
            first = hf(tokens, attention_mask=valid.long(), position_ids=pos).logits[:, -1]
            eos |= {int(t) for t in first.topk(beams).indices.flatten()}
        eos = sorted(eos) or [2]
        out = hf.generate(
            tokens,
            attention_mask=valid.long(),
            max_new_tokens=12,
            num_beams=beams,
            do_sample=False,
            pad_token_id=0,
            length_penalty=1.0,
            eos_token_id=eos,
            return_dict_in_generate=True,
            output_scores=True,
        )
    ref, hf_steps = out.sequences, len(out.scores)  # one score per step HF ran
    ref = [r[: next((j + 1 for j, t in enumerate(r) if t in eos), len(r))] for r in ref[:, tokens.shape[1] :].tolist()]
    dec, steps = Decoder(ours), []
    step = dec.beam_step
    dec.beam_step = lambda *a: steps.append(1) or step(*a)
    prompts = [t[v].tolist() for t, v in zip(tokens, valid)]
    got = generate(ours, prompts, GenerationConfig(max_new_tokens=12, beams=beams, eos_ids=tuple(eos)), decoder=dec)
    assert got == ref
    assert hf_steps <= len(steps) + 1 <= hf_steps + 1  # (+ 1: the first token comes from the prefill)
    if first_tokens:
        assert hf_steps == 1


@settings(max_examples=20, deadline=None)
@given(
    family=st.sampled_from(["llama", "gemma"]),
    lengths=st.lists(st.integers(1, 14), min_size=1, max_size=4),
    split=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_cached_decode_equals_full_forward(family, lengths, split, seed):
    """Prefill a prefix, decode the rest one token at a time: same logits as one full forward."""
    model = tiny_model(family)
    g = torch.Generator().manual_seed(seed)
    extra = 5
    T = max(lengths) + extra
    tokens = torch.randint(3, model.args.vocab_size, (len(lengths), T), generator=g).to(DEVICE)
    valid = (torch.arange(T)[None] >= (max(lengths) - torch.tensor(lengths))[:, None]).to(DEVICE)
    with torch.no_grad():
        full = model(tokens, valid=valid)
        cache = model.new_cache(len(lengths), T + 3)
        p = max(lengths) - 1 + min(split, extra)
        outs = [model(tokens[:, :p], valid=valid[:, :p], cache=cache)]
        for j in range(p, T):
            outs.append(model(tokens[:, j : j + 1], cache=cache))
    got = torch.cat(outs, 1)
    assert (got - full)[valid].abs().max() < tol(1e-5)


@exact_only
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_one_beam_equals_greedy(family):
    """The beam-search code path with one beam picks the greedy tokens."""
    model = tiny_model(family, seed=4)
    prompts = [[1, 5, 9, 13, 40], [1, 7, 8]]
    greedy = generate(model, prompts, GenerationConfig(max_new_tokens=16, eos_ids=()))
    dec = Decoder(model)
    tokens, valid = left_pad(prompts, 0, DEVICE)
    cache, logits = dec.prefill(tokens, valid, tokens.shape[1] + 16)
    assert _beam_search(dec, cache, logits, GenerationConfig(max_new_tokens=16, beams=1), ()) == greedy
