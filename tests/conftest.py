"""Shared test fixtures: tiny random models of both families (no files, no downloads).

MINIPARA_TEST_DEVICE=cuda and MINIPARA_TEST_DTYPE=bfloat16 run the same tests on a GPU in
bfloat16; `tol(x)` then loosens a float32 tolerance to what bfloat16 arithmetic allows.
bfloat16 keeps 8 significant bits: one rounding of a logit near 4 (the largest these tiny
models make) moves it by up to 2^-8 * 4 = 0.016, and two computations that round at
different points (fused vs unfused, cached vs full, merged vs unmerged weights) differ by
several such steps. The 16-bit tolerance is 0.125 absolute: eight roundings at |logit| = 4.
"""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("MINIPARA_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("MINIPARA_TEST_DTYPE", "float32"))
LOW_PRECISION = DTYPE != torch.float32


def tol(float32_tol: float) -> float:
    """The tolerance to use: as given in float32, 0.125 (absolute, on logits) in 16-bit."""
    return 0.125 if LOW_PRECISION else float32_tol


exact_only = pytest.mark.skipif(
    LOW_PRECISION,
    reason="token-for-token equality needs float32: 16-bit rounding flips near-ties between random logits",
)

from minipara.model.config import ModelArgs
from minipara.model.transformer import Transformer

TINY = {
    "llama": dict(
        model_type="llama",
        vocab_size=97,
        dim=48,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        head_dim=12,
        ffn_dim=64,
        norm_eps=1e-5,
        attn_scale=12**-0.5,
        bos_id=1,
        eos_ids=(2,),
    ),
    "gemma": dict(
        model_type="gemma3_text",
        vocab_size=97,
        dim=32,
        n_layers=3,
        n_heads=4,
        n_kv_heads=1,
        head_dim=16,
        ffn_dim=48,
        norm_eps=1e-6,
        activation="gelu_tanh",
        norm_offset=1.0,
        embed_scale=True,
        qk_norm=True,
        sandwich_norm=True,
        attn_scale=16**-0.5,
        rope_theta=1e6,
        sliding_window=5,
        sliding=(True, False, True),
        bos_id=2,
        eos_ids=(1,),
    ),
}


def tiny_args(family: str) -> ModelArgs:
    return ModelArgs(**TINY[family])


def tiny_model(family: str, seed: int = 0, dtype=None) -> Transformer:
    """A frozen random model whose activations stay O(1) (weights ~ N(0, 1/fan_in))."""
    g = torch.Generator().manual_seed(seed)
    model = Transformer(tiny_args(family))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (0.0 if model.args.norm_offset else 1.0))
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.requires_grad_(False)
    model = model.to(DEVICE, dtype or DTYPE).eval()
    model.setup_rope()  # keep RoPE frequencies in float32 after the cast
    return model


@pytest.fixture(params=["llama", "gemma"])
def family(request):
    return request.param


_SHARED = {}


def shared_tiny_model(family: str) -> Transformer:
    """tiny_model(family), made once per test session (tests must not modify it)."""
    if family not in _SHARED:
        _SHARED[family] = tiny_model(family)
    return _SHARED[family]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP's waiting
    threads make their tests many times slower. Use with pytest.mark.usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturbed(ad, seed: int = 0, std: float = 0.3):
    """Make an adapter look trained: tensors still at a constant init (zeros, ones) get noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * std)
    return ad


def count_ops(fn) -> int:
    """Ops that launch work (not views) while fn() runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with CountOps() as c:
        fn()
    return c.n


def prompt_batch(seed: int, lengths: list[int], extra: int, pad: int = 0, vocab: int = 97):
    """Prompts of `lengths`, left-padded to the longest plus `pad`, then `extra` response tokens:
    tokens, valid, prompt mask."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths) + pad
    tokens = torch.randint(3, vocab, (len(lengths), P + extra), generator=g)
    valid = torch.arange(P + extra)[None] >= P - torch.tensor(lengths)[:, None]
    prompt = valid & (torch.arange(P + extra)[None] < P)
    return tokens.to(DEVICE), valid.to(DEVICE), prompt.to(DEVICE)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny HF-format LLaMA directory (write_tiny_model_dir), one per test module."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


def prefill_then_decode(model, adapter, tokens, valid, prompt_len: int):
    """Logits (B, T, V) from prefilling tokens[:, :prompt_len] with the adapter, then decoding
    the rest one token at a time through the cache (decode runs no generator)."""
    n_pre = adapter.n_prefix if adapter is not None else 0
    with torch.no_grad():
        cache = model.new_cache(tokens.shape[0], n_pre + tokens.shape[1], n_prefix=n_pre)
        outs = [model(tokens[:, :prompt_len], valid=valid[:, :prompt_len], cache=cache, adapter=adapter)]
        outs += [model(tokens[:, j : j + 1], cache=cache) for j in range(prompt_len, tokens.shape[1])]
    return torch.cat(outs, 1)


def assert_decode_matches_full_forward(model, adapter, seed: int, lengths: list[int], extra: int):
    """Prefilling prompt_batch's prompts and decoding its response tokens through the cache gives
    the full forward's logits at every valid position."""
    tokens, valid, prompt = prompt_batch(seed, lengths, extra)
    with torch.no_grad():
        full = model(tokens, valid=valid, adapter=adapter, pool_mask=prompt)
    cached = prefill_then_decode(model, adapter, tokens, valid, max(lengths))
    assert (cached - full)[valid].abs().max() < tol(1e-5)


def write_tiny_model_dir(d):
    """Write an HF-format LLaMA directory into d: config.json, model.safetensors with random
    weights, and a 26-piece SentencePiece tokenizer.model. Returns d."""
    import io
    import json

    import sentencepiece as spm
    from safetensors.torch import save_file

    from minipara.io.checkpoints import hf_names

    words = "yes no red blue green cat dog sun moon is the a big small".split()
    text = [" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(200)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_writer=buf,
        vocab_size=26,
        model_type="unigram",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    cfg = {
        "model_type": "llama",
        "vocab_size": 32,
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 12,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    from minipara.io.checkpoints import hf_state_dict

    model = Transformer(ModelArgs.from_hf(cfg))
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for ours in hf_names(model.args):  # the order the weights were always drawn in
            p = params[ours]
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5 if p.dim() == 2 else torch.ones(p.shape))
    tensors = hf_state_dict(model)
    save_file(tensors, d / "model.safetensors")
    return d


def hf_base(family: str, path):
    """A tiny random HF transformers model of the family (llama or gemma: Gemma 3), saved to `path`."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        )
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            vocab_size=128,
            sliding_window=4,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"],
        )
        hf = transformers.Gemma3ForCausalLM(cfg)
        with torch.no_grad():  # HF's zero Gemma norms would hide norm bugs
            for name, p in hf.named_parameters():
                if "norm" in name:
                    p.normal_(0, 0.3)
    hf.eval().save_pretrained(path)
    return hf
