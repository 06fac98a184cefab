"""Continuous batching (minipara/engine.py): requests that join and leave a running batch, each
with its own adapter of any method, get the tokens they get when run alone through generate()."""

import random
import threading

import pytest
from conftest import DEVICE, exact_only, perturbed, tiny_model

from minipara.decode.generation import GenerationConfig, generate
from minipara.methods import METHODS, build_adapter
from minipara.serve.engine import Engine, Request

pytestmark = pytest.mark.usefixtures("one_thread")


def run_engine(engine, reqs):
    """Submit all requests to a started engine at once; {index: (tokens, text, reason)}."""
    done, results = threading.Event(), {}

    def emitter(i):
        parts = []

        def emit(kind, value):
            if kind == "text":
                parts.append(value)
            else:
                results[i] = (reqs[i].tokens, "".join(parts), value)
                if len(results) == len(reqs):
                    done.set()

        return emit

    for i, req in enumerate(reqs):
        req.emit = emitter(i)
        engine.submit(req)
    assert done.wait(60), f"only {len(results)} of {len(reqs)} requests finished"
    return results


def text_of(ids):
    return " ".join(map(str, ids))


@exact_only
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_mixed_methods_join_and_leave_as_if_alone(family):
    """Twenty-four requests over every method (and none), of different prompt lengths and token
    limits, through 3 rows and a cache small enough to be compacted: each
    request's tokens equal generate()'s for it alone; some sample with a seed."""
    model = tiny_model(family)
    options = {"ptuning_v2": dict(prefix_len=6)}  # the default 64 would need a longer cache
    adapters = [None] + [
        perturbed(build_adapter(m, model.args, **options.get(m, {})), seed=i).to(DEVICE) for i, m in enumerate(METHODS)
    ]
    rng = random.Random(0)
    reqs, alone = [], []
    for i in range(24):
        ad = adapters[i % len(adapters)]
        prompt = [model.args.bos_id] + [rng.randrange(3, 97) for _ in range(rng.randrange(1, 12))]
        cfg = GenerationConfig(
            max_new_tokens=rng.randrange(1, 14), eos_ids=(7,), temperature=0.9 if i % 5 == 4 else 0.0, seed=i
        )
        reqs.append(Request(prompt, cfg, ad))
        alone.append(generate(model, [prompt], cfg, adapter=ad)[0])
    engine = Engine(model, text_of, max_batch=3, slots=36)
    engine.start()
    try:
        results = run_engine(engine, reqs)
    finally:
        engine.stop()
    for i, want in enumerate(alone):
        tokens, text, reason = results[i]
        assert tokens == want, f"request {i} ({reqs[i].adapter and reqs[i].adapter.method})"
        assert text == text_of(want[:-1] if want[-1] == 7 else want)
        assert reason == ("stop" if want[-1] == 7 else "length")
    assert engine.compactions >= 1 and engine.cache.length <= 36
    # The adapters act: most requests' tokens differ from the bare model's.
    bare = [generate(model, [r.prompt], r.cfg)[0] for r in reqs if r.adapter is not None]
    assert sum(b != a for b, a in zip(bare, [a for a, r in zip(alone, reqs) if r.adapter is not None])) > 8


def test_stop_strings_and_cancel():
    model = tiny_model("llama")
    engine = Engine(model, text_of, max_batch=2, slots=64)
    engine.start()
    try:
        cfg = GenerationConfig(max_new_tokens=12, eos_ids=())
        want = generate(model, [[1, 5, 6]], cfg)[0]
        stop = text_of(want[3:5])
        ((tokens, text, reason),) = run_engine(engine, [Request([1, 5, 6], cfg, stop=[stop])]).values()
        full = text_of(want)
        assert reason == "stop" and text == full[: full.find(stop)]
        # A cancelled request leaves its row; the next request runs.
        long = Request([1, 5], GenerationConfig(max_new_tokens=40, eos_ids=()))
        long.emit = lambda kind, value: long.cancel()
        engine.submit(long)
        ((tokens, _, reason),) = run_engine(engine, [Request([1, 5, 6], cfg)]).values()
        assert tokens == want and engine.active() == 0 and len(long.tokens) < 40
    finally:
        engine.stop()


def drive(engine, arrivals: dict):
    """Run the engine in this thread: before iteration t, submit arrivals[t] (lists of
    request groups); until everything submitted has finished."""
    last = max(arrivals)
    for t in range(last + 1):
        for group in arrivals.get(t, []):
            engine.submit(*group)
        engine.iteration()
    while engine.iteration():
        pass


@exact_only
def test_static_steps_never_recompile_and_match_alone():
    """After warm-up, a long random mix of requests (every method and none, prompt lengths,
    token limits, greedy and sampled with top-k/top-p, n > 1, cancellations) joining and
    leaving compiles nothing more, and every answer equals generate()'s for it alone."""
    model = tiny_model("llama")
    options = {"ptuning_v2": dict(prefix_len=6)}
    adapters = [None] + [
        perturbed(build_adapter(m, model.args, **options.get(m, {})), seed=i).to(DEVICE) for i, m in enumerate(METHODS)
    ]
    graphs = []

    def counting(gm, example_inputs):  # a torch.compile backend that runs the traced graph as is
        graphs.append(gm)
        return gm.forward

    engine = Engine(model, text_of, max_batch=4, slots=40, buckets=(1, 2, 3), compile=counting)
    engine.warmup([a for a in adapters if a is not None])
    warm = len(graphs)
    # Two structures (the element-wise kinds, what a batch without LoRA runs, the bare model's
    # too; and those with LoRA), each traced twice for the four buckets: for one row, and once
    # with a symbolic batch size for the others.
    assert len(engine.structures) == 2 and warm == 2 * 2
    rng = random.Random(1)
    arrivals, reqs, alone = {}, [], []
    for i in range(30):
        ad = rng.choice(adapters)
        prompt = [model.args.bos_id] + [rng.randrange(3, 97) for _ in range(rng.randrange(1, 10))]
        sampled = rng.random() < 0.4
        cfg = GenerationConfig(
            max_new_tokens=rng.randrange(1, 12),
            eos_ids=(7,),
            temperature=rng.choice([0.7, 1.3]) if sampled else 0.0,
            top_k=rng.choice([0, 5]),
            top_p=rng.choice([1.0, 0.8]),
            seed=i,
        )
        n = rng.choice([1, 1, 1, 2]) if sampled else 1
        group = [Request(prompt, cfg, ad) for _ in range(n)]
        arrivals.setdefault(rng.randrange(60), []).append(group)
        reqs += group
        # Choice c of a request draws from stream c of its seed, as row c of a batch does.
        alone += generate(model, [prompt] * n, cfg, adapter=ad)
    drive(engine, arrivals)
    assert len(graphs) == warm, "a step was compiled after warm-up"
    for i, (req, want) in enumerate(zip(reqs, alone)):
        assert req.tokens == want, f"request {i} ({req.adapter and req.adapter.method}, {req.cfg})"
    assert engine.compactions >= 1 and engine.prefills < len(reqs)  # some prefills were batched


class Poisoned(Engine):
    """Before every step, the free rows get garbage: NaN adapter states and sampling settings,
    huge cache entries and an out-of-range position."""

    def _step(self):
        for r, req in enumerate(self.rows):
            if req is None:
                for i in range(self.model.args.n_layers):
                    for buf in self.cache.kv(i):
                        buf[r] = 1e4
                for buf in self.states.bufs.values():
                    buf[:, r] = float("nan")
                for name in ("temperature", "top_p"):
                    self.io[name][r] = float("nan")
                self.io["tokens"][r], self.io["top_k"][r], self.cache.next_pos[r] = 96, -3, 10**6
        super()._step()


@exact_only
@pytest.mark.parametrize("compile", [None, "eager"])
def test_padding_rows_never_leak_into_real_rows(compile):
    """Rows padded up to a bucket compute on garbage; the real rows' tokens do not change,
    also where the traced step applies kinds of states a real row does not use (compile)."""
    staggered(lambda model: Poisoned(model, text_of, max_batch=4, slots=48, buckets=(4,), compile=compile))


def staggered(make_engine):
    """Eight requests (the bare model, PARA, LoRA; greedy and sampled; growing prompts and
    token limits) joining a running engine one by one; each gets generate()'s tokens for it
    alone. The engine, made by make_engine(model), is warmed up first when compiled."""
    model = tiny_model("gemma")
    ads = [perturbed(build_adapter(m, model.args), seed=i).to(DEVICE) for i, m in enumerate(["para", "lora"])]
    engine = make_engine(model)
    if engine.compiled:
        engine.warmup(ads)
    reqs, want, arrivals = [], [], {}
    for i in range(8):
        cfg = GenerationConfig(max_new_tokens=3 + 2 * i, eos_ids=(), temperature=0.8 * (i % 2), top_p=0.9, seed=i)
        prompt = [model.args.bos_id] + list(range(5, 9 + i))
        reqs.append(Request(prompt, cfg, ads[i % 2] if i % 3 else None))
        want.append(generate(model, [prompt], cfg, adapter=reqs[-1].adapter)[0])
        arrivals.setdefault(3 * i, []).append([reqs[-1]])
    drive(engine, arrivals)
    for i, (req, w) in enumerate(zip(reqs, want)):
        assert req.tokens == w, f"request {i}"
    return engine


@exact_only
@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs")
def test_every_bucket_replays_a_cuda_graph():
    """The compiled step mutates its inputs in place (tokens, positions, the cache): inductor
    records CUDA graphs only where every such input is marked static, else it runs the step
    without them, silently. No bucket may be skipped, and the tokens are generate()'s."""
    from torch._dynamo.utils import counters

    counters.clear()
    staggered(lambda model: Engine(model, text_of, max_batch=4, slots=48, buckets=(1, 2), compile="inductor"))
    assert not counters["inductor"]["cudagraph_skips"]
