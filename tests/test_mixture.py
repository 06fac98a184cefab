"""Mixture: one batch, different adapters (and methods) per row, each row as if alone.

Every registered method whose file exists takes part, next to three small test adapters
that cover what the real ones may not: prefixes of different lengths, one prompt-aware
(per-row soft tokens through model.prefix_kv) and one shared by all rows, and a per-row
generated LoRA with a bias.
"""

import pytest
import torch
from conftest import DEVICE, LOW_PRECISION, TINY, count_ops, exact_only, perturbed, tiny_args, tiny_model, tol
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minipara.decode.generation import GenerationConfig, generate
from minipara.errors import UserError
from minipara.methods import METHODS, PROMPT_AWARE, build_adapter
from minipara.methods.base import Adapter
from minipara.methods.mixture import Mixture
from minipara.methods.poolers import pool
from minipara.model.config import ModelArgs
from minipara.model.layer_state import LayerState, lora_delta
from minipara.model.projections import in_sizes, out_sizes, widths

pytestmark = pytest.mark.usefixtures("one_thread")


METHODS_HERE = METHODS


def trained(ad: Adapter, seed: int, std: float = 0.3) -> Adapter:
    return perturbed(ad, seed, std).to(DEVICE)


class SoftPrefix(Adapter):
    """Prompt-aware prefix (IAPT-like): P soft tokens per row from the mean-pooled prompt."""

    method = "test_soft_prefix"

    def __init__(self, args, P: int, seed: int):
        super().__init__(None, args)
        g = torch.Generator().manual_seed(seed)
        self.n_prefix = P
        self.w = nn.Parameter(torch.randn(args.n_layers, args.dim, P * args.dim, generator=g) * args.dim**-0.5)

    def layer_state(self, i, h, pool_mask, model):
        B, P = h.shape[0], self.n_prefix
        soft = (pool(h.float(), pool_mask, "mean") @ self.w[i]).view(B, P, -1).to(h.dtype)
        pos = torch.arange(P, device=h.device).expand(B, P)
        return LayerState.build(self.args, h.dtype, prefix_kv=model.prefix_kv(i, soft, pos))


class SharedPrefix(Adapter):
    """Learned prefix keys/values shared by all rows (P-tuning-v2-like, first dim 1)."""

    method = "test_shared_prefix"

    def __init__(self, args, P: int, seed: int):
        super().__init__(None, args)
        g = torch.Generator().manual_seed(seed)
        self.n_prefix = P
        self.kv = nn.Parameter(torch.randn(2, args.n_layers, 1, args.n_kv_heads, P, args.head_dim, generator=g))

    def layer_state(self, i, h, pool_mask, model):
        return LayerState.build(self.args, h.dtype, prefix_kv=(self.kv[0, i], self.kv[1, i]))


class RowLora(Adapter):
    """Per-row generated LoRA (batched A) on q and down, plus a per-row bias on o."""

    method = "test_row_lora"

    def __init__(self, args, r: int, seed: int):
        super().__init__(None, args)
        g = torch.Generator().manual_seed(seed)
        ins, outs = in_sizes(args), out_sizes(args)
        self.a = nn.ParameterDict(
            {p: nn.Parameter(torch.randn(ins[p], r, generator=g) * ins[p] ** -0.5) for p in ("q", "down")}
        )
        self.b = nn.ParameterDict({p: nn.Parameter(torch.randn(r, outs[p], generator=g) * 0.3) for p in ("q", "down")})
        self.gate = nn.Parameter(torch.randn(args.dim, generator=g) * args.dim**-0.5)
        self.bias = nn.Parameter(torch.randn(args.dim, args.dim, generator=g) * args.dim**-0.5)

    def layer_state(self, i, h, pool_mask, model):
        pooled = pool(h.float(), pool_mask, "last")
        s = torch.tanh(pooled @ self.gate)[:, None, None]
        lora = {p: (self.a[p][None] * (1 + s), self.b[p]) for p in ("q", "down")}
        return LayerState.build(self.args, h.dtype, lora=lora, bias={"o": pooled @ self.bias * 0.1})


def roster(family: str, seed: int = 0) -> list[Adapter]:
    """Every available method (the prompt-aware ones with each input_norm) plus the three test
    adapters, all with trained-looking weights."""
    args = tiny_args(family)
    ads = [trained(build_adapter(m, args), seed + k) for k, m in enumerate(METHODS_HERE)]
    ads += [
        trained(build_adapter(m, args, input_norm="none"), seed + 100 + k)
        for k, m in enumerate(METHODS_HERE)
        if m in PROMPT_AWARE
    ]
    return ads + [
        SoftPrefix(args, 2, seed).to(DEVICE),
        SharedPrefix(args, 3, seed).to(DEVICE),
        RowLora(args, 3, seed).to(DEVICE),
    ]


def prompts_for(n: int, seed: int, vocab: int, lo: int = 3, hi: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(3, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
        for _ in range(n)
    ]


def test_roster_mixes_methods_with_and_without_prefix():
    ads = roster("llama")
    assert sum(a.n_prefix > 0 for a in ads) >= 2 and sum(a.n_prefix == 0 for a in ads) >= 2
    assert {"para"} <= {a.method for a in ads}
    assert {a.config.input_norm for a in ads if a.method in PROMPT_AWARE} == {"rms", "none"}


@exact_only
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_mixed_batch_generates_what_each_row_gets_alone(family):
    model = tiny_model(family, seed=1)
    ads = roster(family)
    # Each adapter twice (except the last), then a bare row, shuffled.
    rows = [k for k in range(len(ads)) for _ in range(2 if k < len(ads) - 1 else 1)] + [None]
    rows = [rows[j] for j in torch.randperm(len(rows), generator=torch.Generator().manual_seed(3))]
    prompts = prompts_for(len(rows), 5, model.args.vocab_size)
    cfg = GenerationConfig(max_new_tokens=16, eos_ids=())
    got = generate(model, prompts, cfg, adapter=Mixture(ads, rows))
    alone = [generate(model, [p], cfg, adapter=None if r is None else ads[r])[0] for p, r in zip(prompts, rows)]
    bare = generate(model, prompts, cfg)
    assert got == alone
    changed = [b for b, r in enumerate(rows) if r is not None and got[b] != bare[b]]
    assert len(changed) >= len(rows) // 2, "the adapters should change most rows' outputs"
    assert got[rows.index(None)] == bare[rows.index(None)]


def run_cached(model, adapter, tokens, valid, n_prompt):
    """Logits of a prefill over the first n_prompt columns, then one-token decode steps."""
    B, T = tokens.shape
    cache = model.new_cache(
        B,
        T + (adapter.n_prefix if adapter is not None else 0) + 2,
        n_prefix=adapter.n_prefix if adapter is not None else 0,
    )
    outs = [model(tokens[:, :n_prompt], valid=valid[:, :n_prompt], cache=cache, adapter=adapter)]
    for j in range(n_prompt, T):
        outs.append(model(tokens[:, j : j + 1], cache=cache))
    return torch.cat(outs, 1)


@settings(max_examples=15, deadline=None)
@given(
    family=st.sampled_from(["llama", "gemma"]),
    seed=st.integers(0, 2**16),
    lengths=st.lists(st.integers(1, 10), min_size=2, max_size=7),
    extra=st.integers(1, 4),
)
def test_mixed_prefill_and_decode_logits_match_each_row_alone(family, seed, lengths, extra):
    model = tiny_model(family)
    ads = roster(family, seed)
    g = torch.Generator().manual_seed(seed)
    rows = [None if r == len(ads) else r for r in torch.randint(0, len(ads) + 1, (len(lengths),), generator=g).tolist()]
    mix = Mixture(ads, rows)
    Tp = max(lengths)
    T = Tp + extra
    tokens = torch.randint(3, model.args.vocab_size, (len(lengths), T), generator=g).to(DEVICE)
    valid = (torch.arange(T)[None] >= (Tp - torch.tensor(lengths))[:, None]).to(DEVICE)
    with torch.no_grad():
        got = run_cached(model, mix, tokens, valid, Tp)
        prompt = valid & (torch.arange(T, device=DEVICE) < Tp)
        full = model(tokens, valid=valid, adapter=mix, pool_mask=prompt)
        for b, r in enumerate(rows):
            row = tokens[b : b + 1, valid[b]]
            ref = run_cached(
                model, None if r is None else ads[r], row, torch.ones_like(row, dtype=torch.bool), lengths[b]
            )
            assert (got[b, valid[b]] - ref[0]).abs().max() < tol(1e-5), (b, r)
    assert (got - full)[valid].abs().max() < tol(1e-5)


def lora_tenants(args, n: int, kind: str = "lora"):
    """n LoRA adapters of different ranks: the real method (given unfused, by low_rank), or
    the test one (fused, per row, by layer_state)."""
    if kind == "lora" and "lora" in METHODS_HERE:
        return [trained(build_adapter("lora", args, r=2 + k), k) for k in range(n)]
    return [RowLora(args, 2 + k, k).to(DEVICE) for k in range(n)]


@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("kind", ["lora", "row_lora"])
def test_many_lora_tenants_share_one_gathered_product(family, kind):
    model = tiny_model(family, seed=2)
    ads = lora_tenants(model.args, 4, kind)
    rows = [0, 1, 2, 3, 3, None, 1, 0]
    calls = {k: 0 for k in range(len(ads))}
    hook = "low_rank" if kind == "lora" else "layer_state"  # what the mixture asks each tenant
    for k, a in enumerate(ads):
        orig = getattr(a, hook)
        setattr(a, hook, lambda *x, orig=orig, k=k: (calls.__setitem__(k, calls[k] + 1), orig(*x))[1])
    mix = Mixture(ads, rows)
    prompts = prompts_for(len(rows), 7, model.args.vocab_size)
    cfg = GenerationConfig(max_new_tokens=8, eos_ids=())
    h = torch.randn(len(rows), 6, model.args.dim, device=DEVICE)
    pm = torch.ones(len(rows), 6, dtype=torch.bool, device=DEVICE)
    with torch.no_grad():
        st_mix = mix.layer_state(1, h, pm, model)
        assert st_mix.lora
        for name, (A, Bm) in st_mix.lora.items():
            assert A.dim() == 3 and A.shape[0] == len(rows) and Bm.shape[0] == len(rows)
            for b, r in enumerate(rows):
                split = widths(model.args, name)
                update = lora_delta(A[b], Bm[b], split)  # (in, out): what row b adds, x @ update
                if r is None:
                    assert not Bm[b].any()
                    continue
                a, bm = ads[r].layer_state(1, h[b : b + 1], pm[b : b + 1], model).lora[name]
                want = lora_delta(a.reshape(a.shape[-2:]), bm.reshape(bm.shape[-2:]), split)
                assert (update - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item()), (name, b)
    for k in calls:
        calls[k] = 0
    got = generate(model, prompts, cfg, adapter=mix)
    # One call per adapter, over all of its rows: per prefill for the low-rank pairs (all layers
    # at once), per layer for generated ones; decode calls none.
    per_prefill = 1 if kind == "lora" else model.args.n_layers
    assert all(c == per_prefill for c in calls.values()), calls
    alone = [generate(model, [p], cfg, adapter=None if r is None else ads[r])[0] for p, r in zip(prompts, rows)]
    if not LOW_PRECISION:  # token-for-token equality needs float32
        assert got == alone


def test_lora_tenants_pairs_are_gathered_afresh_at_each_prefill():
    """All layers' pairs are gathered at layer 0 and kept for the others: a later prefill (layer 0
    again) sees an adapter trained in between."""
    model = tiny_model("llama", seed=2)
    ads = lora_tenants(model.args, 2)
    mix = Mixture(ads, [0, 1, None])
    h = torch.randn(3, 5, model.args.dim, device=DEVICE)
    pm = torch.ones(3, 5, dtype=torch.bool, device=DEVICE)
    with torch.no_grad():
        before = [mix.layer_state(i, h, pm, model).lora["down"][1].clone() for i in (0, 1)]
        for b in ads[1].b.values():
            b.mul_(2)
        after = [mix.layer_state(i, h, pm, model).lora["down"][1] for i in (0, 1)]
    for old, new in zip(before, after):
        assert new[1].abs().max() > 0 and torch.equal(new[1], 2 * old[1]) and torch.equal(new[0], old[0])
        assert not new[2].any()


@exact_only
@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_beam_search_on_a_mixed_batch_matches_each_row_alone(family):
    model = tiny_model(family, seed=3)
    ads = roster(family, 11)
    rows = [len(ads) - 1 - k for k in range(len(ads))] + [None]
    prompts = prompts_for(len(rows), 9, model.args.vocab_size)
    cfg = GenerationConfig(max_new_tokens=10, beams=3, eos_ids=(5,))
    got = generate(model, prompts, cfg, adapter=Mixture(ads, rows))
    alone = [generate(model, [p], cfg, adapter=None if r is None else ads[r])[0] for p, r in zip(prompts, rows)]
    assert got == alone


def test_mixture_edges():
    args = tiny_args("llama")
    ads = roster("llama")
    mix = Mixture(ads + [None], [len(ads), None])  # no row uses an adapter
    assert (
        mix.n_prefix == 0
        and mix.layer_state(0, torch.zeros(2, 3, args.dim), torch.ones(2, 3, dtype=torch.bool), None) is None
    )
    prefixed = [a for a in ads if a.n_prefix]
    mix = Mixture(ads, list(range(len(ads))) + [None])
    assert mix.n_prefix == max(a.n_prefix for a in prefixed)
    want = [a.n_prefix for a in ads] + [0]
    assert mix.prefix_rows(len(want), torch.device("cpu")).tolist() == want
    with pytest.raises(ValueError):
        mix.prefix_rows(3, torch.device("cpu"))
    with pytest.raises(UserError):
        Mixture(ads, [len(ads)])
    with pytest.raises(UserError):
        mix.merge(tiny_model("llama"))
    with pytest.raises(UserError, match="same base model"):
        Mixture([ads[0], SoftPrefix(tiny_args("gemma"), 2, 0)], [0, 1])


def ops_per_prefill(method: str, n_tenants: int, n_layers: int = 3) -> int:
    """Ops that launch work (not views) in all layers' states of one prefill of a mixture of n
    tenants over 32 rows, once the mixture has made its row layouts (at its first prefill)."""
    args = ModelArgs(**{**TINY["llama"], "n_layers": n_layers})
    h, pm = torch.randn(32, 5, args.dim), torch.ones(32, 5, dtype=torch.bool)
    mix = Mixture([build_adapter(method, args) for _ in range(n_tenants)], [k % n_tenants for k in range(32)])
    with torch.no_grad():
        return [count_ops(lambda: [mix.layer_state(i, h, pm, None) for i in range(n_layers)]) for _ in range(2)][1]


def test_lora_tenants_stack_in_as_many_ops_for_sixteen_as_for_two():
    """A prefill places LoRA tenants' parts side by side, for all layers at once: its state
    building runs as many ops for 16 tenants as for 2, and for 6 layers as for 3 (fusing each
    tenant's pair first ran 648 a layer for 16: its kernels made most of a 7B's first-token
    excess on a GPU, docs/benchmarks.md; gathering per layer, 41 a layer)."""
    assert ops_per_prefill("lora", 2) == ops_per_prefill("lora", 16) == ops_per_prefill("lora", 16, n_layers=6) < 60


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_same_kind_tenants_run_as_one_generator_call(family):
    """Prompt-aware tenants of one config (PARA, PEDRO, PARADE, IAPT) run their generators as
    one call, each row with its own tenant's parameters; each row still gets what it gets
    alone, prefill and decode. Tenants that differ only in input_norm are separate calls, each
    reading h its own way."""
    model = tiny_model(family, seed=4)
    args = model.args
    kinds = [
        ("para", {}),
        ("para", {"pooler": "mean"}),
        ("pedro", {}),
        ("pedro", {"activation": "relu-gelu"}),
        ("parade", {}),
        ("iapt", {}),
        ("iapt", {"pooler": "mean", "activation": "gelu"}),
        ("parade", {"pooler": "max"}),
        ("para", {"input_norm": "none"}),
        ("pedro", {"input_norm": "none"}),
        ("parade", {"input_norm": "none"}),
        ("iapt", {"input_norm": "none"}),
    ]
    ads = [
        trained(build_adapter(m, args, **kw), 10 * k + j)
        for k, (m, kw) in enumerate(kinds)
        for j in range(3)
        if m in METHODS_HERE
    ]
    ads.pop()  # the last kind has 2 tenants
    with torch.no_grad():  # rational activations start alike (GELU-shaped): make each tenant's its own
        for k, ad in enumerate(ads):
            for act in getattr(ad, "act", []):
                g = torch.Generator().manual_seed(k)
                act.a.add_(torch.randn(act.a.shape, generator=g).to(DEVICE) * 0.1)
                act.b.add_(torch.randn(act.b.shape, generator=g).to(DEVICE) * 0.1)
    rows = [k for k in range(len(ads)) for _ in range(2)] + [None]
    rows = [rows[j] for j in torch.randperm(len(rows), generator=torch.Generator().manual_seed(5))]
    mix = Mixture(ads, rows)
    assert len(mix.calls) == len({(m, tuple(kw.items())) for m, kw in kinds if m in METHODS_HERE})
    g = torch.Generator().manual_seed(6)
    lengths = torch.randint(2, 9, (len(rows),), generator=g)
    Tp = int(lengths.max())
    tokens = torch.randint(3, args.vocab_size, (len(rows), Tp + 3), generator=g).to(DEVICE)
    valid = (torch.arange(Tp + 3)[None] >= (Tp - lengths)[:, None]).to(DEVICE)
    with torch.no_grad():
        got = run_cached(model, mix, tokens, valid, Tp)
        for b, r in enumerate(rows):
            row = tokens[b : b + 1, valid[b]]
            ref = run_cached(
                model, None if r is None else ads[r], row, torch.ones_like(row, dtype=torch.bool), int(lengths[b])
            )
            assert (got[b, valid[b]] - ref[0]).abs().max() < tol(1e-5), (b, r)


def test_para_tenants_make_their_vectors_in_as_many_ops_for_sixteen_as_for_two():
    assert ops_per_prefill("para", 2) == ops_per_prefill("para", 16)
