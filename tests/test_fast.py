"""The compiled decode step (fast.py) computes what the eager step computes."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, TINY, exact_only, tiny_args, tiny_model, tol
from torch._inductor.utils import run_and_get_code

from minipara.decode.compiled import BEAM_WINDOW, PrefillGraphs, compile_decoder
from minipara.decode.generation import Decoder, GenerationConfig, generate, left_pad
from minipara.methods import METHODS, PROMPT_AWARE, build_adapter
from minipara.methods.mixture import Mixture
from minipara.model.config import ModelArgs
from minipara.model.transformer import Transformer


def trained_looking(ad, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.2)
    return ad


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gemma", seed=7)
    decoder = compile_decoder(Decoder(model))
    return model, decoder


PROMPTS = [[2, 5, 9, 13, 40, 7, 7, 21], [2, 7, 8]]


def adapter_for(model, method):
    """None, a method's adapter, or "method/none": a prompt-aware one with input_norm none."""
    if method is None:
        return None
    name, _, norm = method.partition("/")
    return trained_looking(build_adapter(name, model.args, input_norm=norm or None).to(DEVICE))


@pytest.mark.parametrize("method", [None, "para", "para/none"])
def test_compiled_decode_logits_equal_eager(setup, method):
    model, fast = setup
    ad = adapter_for(model, method)
    tokens, valid = left_pad(PROMPTS, 0, DEVICE)
    steps = [torch.tensor([3, 4], device=DEVICE), torch.tensor([11, 12], device=DEVICE)]
    out = {}
    for name, dec in (("eager", Decoder(model)), ("compiled", fast)):
        cache, first = dec.prefill(
            tokens, valid, tokens.shape[1] + 10, ad
        )  # the generation tests' cache size: one graph
        out[name] = [first] + [dec.step(cache, s) for s in steps]
    for e, c in zip(out["eager"], out["compiled"]):
        assert (e - c).abs().max() < tol(1e-5)


@exact_only
@pytest.mark.parametrize("method", [None, "para", "para/none"])
@pytest.mark.parametrize("beams", [1, 3])
def test_compiled_generation_equals_eager(setup, method, beams):
    model, fast = setup
    ad = adapter_for(model, method)
    cfg = GenerationConfig(max_new_tokens=10, beams=beams, eos_ids=())
    eager = generate(model, PROMPTS, cfg, adapter=ad)
    assert generate(model, PROMPTS, cfg, adapter=ad, decoder=fast) == eager
    # A second request reuses the compiled step and the cache's buffers.
    assert generate(model, PROMPTS, cfg, adapter=ad, decoder=fast) == eager


@exact_only
def test_request_after_an_adapter_request_gets_no_stale_state(setup):
    """The cache keeps packed adapter buffers for reuse; a later base request must not apply them."""
    model, fast = setup
    cfg = GenerationConfig(max_new_tokens=10, eos_ids=())
    generate(model, PROMPTS, cfg, adapter=adapter_for(model, "para"), decoder=fast)
    assert generate(model, PROMPTS, cfg, decoder=fast) == generate(model, PROMPTS, cfg)


@exact_only
@pytest.mark.parametrize("beams", [1, 3])
def test_every_method_and_mixtures_across_repeated_requests(setup, beams):
    """Requests cycle through every method and two mixtures, three times: each result equals
    eager generation. On CUDA a request shape's second prefill is recorded as a graph and
    later ones replay it, so this also checks that a replay restores the cache's host-side
    state (length, adapter states) and that records do not disturb one another."""
    model, fast = setup
    ads = {m: adapter_for(model, m) for m in list(METHODS) + [f"{m}/none" for m in PROMPT_AWARE]}
    ads["iapt+lora mixed"] = Mixture([ads["iapt"], ads["lora"]], [0, 1])
    ads["para+bare mixed"] = Mixture([ads["para"]], [None, 0])
    ads["para rms+none mixed"] = Mixture([ads["para/none"], ads["para"]], [0, 1])
    ads["iapt none+pedro mixed"] = Mixture([ads["iapt/none"], ads["pedro"]], [0, 1])
    cfg = GenerationConfig(max_new_tokens=6, beams=beams, eos_ids=())
    expected = {name: generate(model, PROMPTS, cfg, adapter=ad) for name, ad in ads.items()}
    for _ in range(3):
        for name, ad in ads.items():
            assert generate(model, PROMPTS, cfg, adapter=ad, decoder=fast) == expected[name], name


@exact_only
@pytest.mark.parametrize("beams", [2, 4])
def test_captured_beam_search_equals_eager_and_replays_one_graph(setup, monkeypatch, beams):
    """The captured beam step, whose graph holds the search's bookkeeping (Beams.update), finds
    eager's hypotheses, also where EOS ids end the search early; requests with other prompt
    lengths, max_new_tokens, EOS ids and length penalties replay the first one's graph: the
    step index and the settings are data in the graph, not constants."""
    model, fast = setup
    if isinstance(fast.run_prefill, PrefillGraphs):  # CUDA: a prompt shape seen before compiles the
        monkeypatch.setattr(fast, "run_prefill", fast.run_prefill.eager)  # prefill, which is not the step
    steps = []
    step = fast.beam_step
    monkeypatch.setattr(fast, "beam_step", lambda *a: steps.append(1) or step(*a))
    g = torch.Generator().manual_seed(beams)
    graphs, early = None, 0
    for lengths, n_new, lp in [((3, 8), 10, 0.0), ((5, 2), 6, 1.0), ((9, 4), 13, -1.0), ((7, 7), 10, 2.0)]:
        prompts = [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]
        eos = tuple(torch.randperm(94, generator=g)[:40].add(3).tolist())  # 40 of the 94 ids: searches end early
        cfg = GenerationConfig(max_new_tokens=n_new, beams=beams, eos_ids=eos, length_penalty=lp)
        steps.clear()
        assert generate(model, prompts, cfg, decoder=fast) == generate(model, prompts, cfg), cfg
        early += len(steps) < n_new - 1
        if graphs is None:  # the first request compiled this shape's graph
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a request recompiled the step"
    assert early >= 2  # the EOS ids did end searches early


@exact_only
def test_beam_search_past_the_captured_window_equals_eager(setup):
    """Past BEAM_WINDOW new tokens the reorder, and so the search's step, runs eagerly (fast.py)."""
    model, fast = setup
    cfg = GenerationConfig(max_new_tokens=BEAM_WINDOW + 6, beams=3, eos_ids=())
    assert generate(model, PROMPTS, cfg, decoder=fast) == generate(model, PROMPTS, cfg)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs")
@pytest.mark.parametrize("method", [None, "para", "iapt", "lora"])
def test_the_servers_recorded_eager_prefill_equals_eager_and_compiles_nothing(method):
    """The server records the eager prefill (serve/app.py: compiling a prompt shape while
    serving would stall every decoding row): a shape met again is recorded, then replayed, with
    eager's tokens and no compilation at all."""
    from torch._dynamo.utils import counters

    counters.clear()
    model = tiny_model("gemma", seed=7)
    ad = adapter_for(model, method)
    dec = Decoder(model)
    dec.run_prefill = PrefillGraphs(dec.run_prefill, dec.run_prefill)
    cfg = GenerationConfig(max_new_tokens=5, eos_ids=())
    want = generate(model, PROMPTS, cfg, adapter=ad)
    for _ in range(3):  # eager, recorded, replayed
        assert generate(model, PROMPTS, cfg, adapter=ad, decoder=dec) == want
    assert len(dec.run_prefill.records) == 1 and not counters["stats"]["unique_graphs"]


def kernel_count(code: list[str]) -> int:
    """Kernels in inductor's generated code (run_and_get_code's sources)."""
    return sum(len(re.findall(r"= async_compile\.\w+\(", c)) for c in code)


def test_layers_share_the_compiled_steps_kernels():
    """Each layer's adapter states are inputs of the compiled step of their own, so the middle
    layers of a deeper model add no kernels. (Indexed out of the stacked states inside the
    graph, every layer got kernels of its own: 32 times the compiling and tuning on a 7B.)"""

    def kernels(n_layers):
        args = ModelArgs(**dict(TINY["llama"], n_layers=n_layers))
        model = Transformer(args).to(DEVICE).eval()
        ad = build_adapter("lora", args).to(DEVICE)
        cfg = GenerationConfig(max_new_tokens=2, eos_ids=())
        _, code = run_and_get_code(
            generate, model, PROMPTS[:1], cfg, adapter=ad, decoder=compile_decoder(Decoder(model), graph_prefill=False)
        )
        return kernel_count(code)

    assert kernels(6) == kernels(4)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_prompt_independent_states_compile_into_the_prefills_one_graph(method):
    """States built for all layers at a pass's first layer (LayerPass) trace into the compiled
    prefill without a graph break, equal eager's, and follow the parameters between calls."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model("llama")
    ad = trained_looking(build_adapter(method, model.args).to(DEVICE))
    dec = Decoder(model)
    tokens, valid = left_pad(PROMPTS[:2], 0, DEVICE)
    run = torch.compile(dec.run_prefill)
    with torch.no_grad():
        for _ in range(2):
            eager = dec.run_prefill(dec.cache(2, 16, 0), tokens, valid, ad)
            assert (run(dec.cache(2, 16, 0), tokens, valid, ad) - eager).abs().max() < tol(1e-5)
            for p in ad.parameters():
                p.mul_(1.5)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]


@pytest.mark.parametrize("norm", ["rms", "none"])
def test_a_mixtures_compiled_prefill_equals_eager_and_does_not_grow_with_its_tenants(norm):
    """A mixture's generators run eagerly inside the compiled prefill (traced, their graph grew
    with the tenants: minutes to compile for 16 on a 7B): its logits and adapter states equal
    eager's, and six tenants compile to as many kernels as two."""

    def prefill(n_tenants, compiled):
        torch.manual_seed(n_tenants)
        args = tiny_args("llama")
        model = Transformer(args).to(DEVICE).eval()
        ads = [
            trained_looking(build_adapter(m, args, input_norm=norm if m == "para" else None).to(DEVICE), seed=i)
            for i, m in enumerate(["lora", "para"] * (n_tenants // 2))
        ]
        mix = Mixture(ads, [i % n_tenants for i in range(n_tenants)] + [None])
        dec = Decoder(model)
        tokens, valid = left_pad([[2, 5, 9, 13, 40, 7], [2, 7, 8]] * n_tenants, 0, DEVICE)
        tokens, valid = tokens[: n_tenants + 1], valid[: n_tenants + 1]
        cache = dec.cache(tokens.shape[0], 16, mix.n_prefix)
        run = torch.compile(dec.run_prefill) if compiled else dec.run_prefill
        logits, code = run_and_get_code(run, cache, tokens, valid, mix)
        return logits, cache.states, kernel_count(code)

    eager, eager_states, _ = prefill(2, False)
    logits, states, two = prefill(2, True)
    assert (logits - eager).abs().max() < tol(1e-5)
    for e, c in zip(eager_states, states):
        for k, t in e.tensors().items():
            assert (t - c.tensors()[k]).abs().max() < tol(1e-5), k
    assert prefill(6, True)[2] == two


PERSIST = """
import os, sys
import minipara.serve.app  # imports torch._dynamo, which writes torch's default cache folder into the env
import torch
from minipara.decode.compiled import persistent_caches
persistent_caches()
torch.compile(lambda x: (x * 2 + 1).sin())(torch.ones(3))
print(os.environ["TORCHINDUCTOR_CACHE_DIR"])
"""


@pytest.mark.parametrize("user_set", [False, True])
def test_compiled_kernels_persist_in_the_per_user_cache(tmp_path, user_set):
    """The compiler's caches land in $MINIPARA_COMPILE_CACHE (docs/serving.md), even though
    `import torch._dynamo` has already put torch's temporary default into the environment;
    a TORCHINDUCTOR_CACHE_DIR the user set still wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["MINIPARA_COMPILE_CACHE"] = str(tmp_path / "mine")
    if user_set:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "theirs")
    out = subprocess.run([sys.executable, "-c", PERSIST], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    want = tmp_path / ("theirs" if user_set else "mine/inductor")
    assert out.stdout.split()[-1] == str(want)
    assert any(want.rglob("*.py")), f"nothing compiled into {want}"
