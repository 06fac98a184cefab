"""Prompt-aware methods: PARA, PEDRO, PARADE (vector generators) and IAPT (soft tokens).

Each generator must see the prompt only, run once per request (at prefill), and leave
decoding as cheap as the bare model's; the PARA family must start as the identity.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, assert_decode_matches_full_forward, prompt_batch, shared_tiny_model, tiny_args, tol
from hypothesis import given, settings
from hypothesis import strategies as st

from minipara.errors import UserError
from minipara.methods import build_adapter
from minipara.methods.parade import squash
from minipara.methods.rational import rational
from minipara.model.config import ModelArgs
from minipara.model.projections import out_sizes
from minipara.model.shapes import SHAPES

pytestmark = pytest.mark.usefixtures("one_thread")

PARA_FAMILY = ("para", "pedro", "parade")
METHODS = PARA_FAMILY + ("iapt",)
NORMS = ("rms", "none")  # input_norm: what the generators read of h (docs/methods.md, "Generator inputs")
# Defaults and variants of the papers' ablations (poolers, targets and r, sharing, activations).
VARIANTS = [
    ("para", {}),
    ("para", {"pooler": "mean", "up_bias": False}),
    ("para", {"pooler": "max", "targets": "qkvgu"}),
    ("pedro", {}),
    ("pedro", {"targets": "qv", "r": 24}),
    ("pedro", {"pooler": "mean", "up_bias": False}),
    ("parade", {}),
    ("parade", {"pooler": "last"}),
    ("parade", {"targets": "qkvgu", "r": 8, "up_bias": False}),
    ("iapt", {}),
    ("iapt", {"share_every": 2, "m": 16}),
    ("iapt", {"pooler": "mean", "activation": "gelu"}),
    ("iapt", {"share_every": 1, "soft_tokens": 2, "activation": "relu"}),
    ("iapt", {"activation": "gelu-relu"}),
    ("pedro", {"activation": "relu-gelu"}),
]


def rms_normed(h: torch.Tensor, eps: float) -> torch.Tensor:
    """docs/methods.md's h / sqrt(mean(h^2) + eps) over the features, in float32, written out."""
    h = h.float()
    return h / (h.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def trained(method: str, family: str, seed: int = 0, **options):
    """An adapter with random "trained-looking" weights: vectors away from 1, rational
    activations off GELU, capsule routing and IAPT's attention far from uniform."""
    ad = build_adapter(method, tiny_args(family), **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ad.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.startswith("act."):
                p.add_(r * 0.02)
            elif name == "gen.b_up":
                p.add_(r * 0.1)
            elif name == "caps.v":
                p.copy_(r)
            else:  # weights (layers/groups, fan_in, fan_out...): O(1) outputs
                p.copy_(r * 0.5 / p.shape[-2] ** 0.5)
    return ad.to(DEVICE)


def record(ad, monkeypatch) -> list:
    """Make `ad` log (layer, state) for every generator run."""
    calls, run = [], ad.layer_state

    def logged(i, h, pool_mask, model):
        state = run(i, h, pool_mask, model)
        calls.append((i, state))
        return state

    monkeypatch.setattr(ad, "layer_state", logged)
    return calls


def parts(state) -> dict:
    """A LayerState's tensors by name, prefix keys/values included."""
    out = dict(state.tensors())
    if state.prefix_k is not None:
        out["prefix_k"], out["prefix_v"] = state.prefix_k, state.prefix_v
    return out


# ---- identity at init -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, options",
    [("para", {}), ("para", {"up_bias": False}), ("pedro", {}), ("parade", {}), ("parade", {"pooler": "last"})],
)
@pytest.mark.parametrize("norm", NORMS)
def test_zero_init_is_identity(family, method, options, norm):
    options = {**options, "input_norm": norm}
    model = shared_tiny_model(family)
    tokens, valid, prompt = prompt_batch(0, [7, 4, 9], 3)
    with torch.no_grad():
        base = model(tokens, valid=valid)
        out = model(
            tokens, valid=valid, pool_mask=prompt, adapter=build_adapter(method, model.args, **options).to(DEVICE)
        )
    assert torch.equal(base, out)  # W_up = 0: every vector is exactly 1, and y * 1 is y


def test_iapt_is_not_identity_and_shifts_text_positions():
    model = shared_tiny_model("llama")
    ad = build_adapter("iapt", model.args).to(DEVICE)
    assert ad.n_prefix == 4
    tokens, valid, _ = prompt_batch(0, [6], 0)
    with torch.no_grad():
        assert not torch.allclose(model(tokens, valid=valid), model(tokens, valid=valid, adapter=ad))


@pytest.mark.parametrize(
    "method, options", [("para", {}), ("pedro", {}), ("parade", {}), ("para", {"targets": "qkvgu"})]
)
def test_l_q_acts_on_models_with_a_query_key_norm(method, options):
    """A uniform l_q (and l_k) of 3 sharpens every attention head. Applied before Gemma 3's
    per-head RMS norm it would be divided away (logits move ~1e-6); after the norm it moves
    Gemma's logits by the same order as LLaMA's (docs/methods.md, Query/key norm)."""
    moved = {}
    for family in ("llama", "gemma"):
        model = shared_tiny_model(family)
        ad = build_adapter(method, model.args, **options).to(DEVICE)
        ahead = model.args.q_dim + (model.args.kv_dim if "k" in ad.targets else 0)  # l_q (and l_k) lead v
        with torch.no_grad():
            ad.gen.b_up[:, :ahead] = 3.0
            tokens, valid, prompt = prompt_batch(0, [7, 4, 9], 3)
            base = model(tokens, valid=valid)
            out = model(tokens, valid=valid, pool_mask=prompt, adapter=ad)
        moved[family] = (out - base)[valid].abs().max().item()
    assert moved["llama"] > 0.05, moved
    assert moved["gemma"] > 0.2 * moved["llama"], moved


# What each targets option scales, in the order its vectors lie in v (and b_up, in files):
# written out here, not read from the code under test.
VECTOR_LAYOUT = {"qvu": ("q", "v", "up"), "qkvgu": ("q", "k", "v", "gate", "up"), "qv": ("q", "v")}


def scaled_by_hand(model, targets: list, tokens, valid):
    """The bare model's logits with each layer's projection outputs scaled as docs/methods.md
    says (PARA; Query/key norm), by forward hooks on the base modules alone: targets[i][proj]
    (width,) multiplies q, k and v (the q|k|v output; on a model with a per-head query/key
    norm, q and k are scaled at that norm's output instead, before RoPE), gate and up (the
    gate|up output)."""
    a, hooks = model.args, []

    def fused(vecs: dict, names: tuple, widths: tuple):
        """Scale the parts `names` (of widths) of a fused linear's output."""

        def hook(module, inputs, out):
            parts = out.split(widths, dim=-1)
            return torch.cat([p * vecs[n].to(p.dtype) if n in vecs else p for n, p in zip(names, parts)], -1)

        return hook

    def heads(v):
        """Scale a per-head norm's output (B, T, heads, head_dim) by v (heads * head_dim,)."""
        return lambda module, inputs, out: out * v.to(out.dtype).view(out.shape[-2], out.shape[-1])

    for i, blk in enumerate(model.layers):
        vecs, att = targets[i], blk.attention
        at_proj = {k: v for k, v in vecs.items() if k == "v" or not a.qk_norm}
        hooks.append(att.wqkv.register_forward_hook(fused(at_proj, ("q", "k", "v"), (a.q_dim, a.kv_dim, a.kv_dim))))
        if a.qk_norm:
            hooks += [
                norm.register_forward_hook(heads(vecs[p]))
                for p, norm in (("q", att.q_norm), ("k", att.k_norm))
                if p in vecs
            ]
        hooks.append(blk.ffn.w_gate_up.register_forward_hook(fused(vecs, ("gate", "up"), (a.ffn_dim, a.ffn_dim))))
    try:
        with torch.no_grad():
            return model(tokens, valid=valid)
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("which", ["q only", "every target"])
@pytest.mark.parametrize(
    "method, options",
    [("para", {}), ("para", {"targets": "qkvgu"}), ("para", {"targets": "qv"}), ("pedro", {}), ("parade", {})],
)
def test_each_vector_scales_its_own_projection(family, method, options, which):
    """Non-uniform vectors (every element its own, RoPE pairs included) checked against the
    base model with the named projections scaled by hand: l_q scales the query part only
    (scaling the keys instead gives other scores once l_q is not uniform: RoPE rotates pairs
    of dimensions that l_q scales differently, and GQA shares a key among query heads), l_k
    the keys, l_v the values, l_g and l_u the gate and up halves. On Gemma 3, q and k are
    scaled after their per-head norm. W_up = 0 makes the vectors b_up exactly."""
    model = shared_tiny_model(family)
    ad = build_adapter(method, model.args, **options).to(DEVICE)
    sizes, layout = out_sizes(model.args), VECTOR_LAYOUT[options.get("targets", "qvu")]
    g = torch.Generator().manual_seed(5)
    targets = []
    with torch.no_grad():
        for i in range(model.args.n_layers):
            vecs = {
                t: (torch.rand(sizes[t], generator=g) + 0.5 if which == "every target" or t == "q" else None)
                for t in layout
            }
            ad.gen.b_up[i] = torch.cat([torch.ones(sizes[t]) if v is None else v for t, v in vecs.items()]).to(DEVICE)
            targets.append({t: v.to(DEVICE) for t, v in vecs.items() if v is not None})
    tokens, valid, prompt = prompt_batch(0, [7, 4, 9], 3)
    with torch.no_grad():
        got = model(tokens, valid=valid, pool_mask=prompt, adapter=ad)
    want = scaled_by_hand(model, targets, tokens, valid)
    base = model(tokens, valid=valid)
    assert (want - base)[valid].abs().max() > 0.05  # the scaling matters
    assert (got - want)[valid].abs().max() < tol(1e-4)


# ---- decode equivalence -----------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    family=st.sampled_from(["llama", "gemma"]),
    variant=st.sampled_from(VARIANTS),
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3),
    extra=st.integers(1, 4),
    seed=st.integers(0, 1000),
    norm=st.sampled_from(NORMS),
)
def test_decode_matches_full_forward(family, variant, lengths, extra, seed, norm):
    method, options = variant
    model, ad = shared_tiny_model(family), trained(method, family, seed, input_norm=norm, **options)
    assert_decode_matches_full_forward(model, ad, seed, lengths, extra)


# ---- prompt-only pooling ----------------------------------------------------------------------


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("method", METHODS)
def test_states_come_from_the_prompt_alone(family, method, norm, monkeypatch):
    """Teacher-forced states (response appended, extra left and right padding) equal the
    prefill's from each prompt alone; a different response changes nothing at all."""
    model, ad = shared_tiny_model(family), trained(method, family, 3, input_norm=norm)
    lengths, L = [5, 2, 7], model.args.n_layers
    calls = record(ad, monkeypatch)
    tf = []
    for seed in (1, 2):  # same prompts, other responses (and response lengths per row)
        tokens, valid, prompt = prompt_batch(11, lengths, 4, pad=2)
        g = torch.Generator().manual_seed(seed)
        resp = ~prompt & valid
        tokens = torch.where(resp, torch.randint(3, 97, tokens.shape, generator=g).to(DEVICE), tokens)
        cut = (resp & (torch.rand(tokens.shape, generator=g).to(DEVICE) < 0.3)).int().cummax(1).values.bool()
        valid = valid & ~cut  # right padding after a random response length
        with torch.no_grad():
            model(tokens, valid=valid, adapter=ad, pool_mask=prompt)
        tf.append([parts(s) for _, s in calls[-L:]])
    for a, b in zip(*tf):
        assert all(torch.equal(a[k], b[k]) for k in a)
    P = tokens.shape[1] - 4
    for row, n in enumerate(lengths):
        alone = tokens[row : row + 1, P - n : P]
        cache = model.new_cache(1, ad.n_prefix + n, n_prefix=ad.n_prefix)
        with torch.no_grad():
            model(alone, cache=cache, adapter=ad)
        for i, (_, s) in enumerate(calls[-L:]):
            ref, got = parts(s), tf[0][i]
            assert ref.keys() == got.keys() and ref
            for k in ref:
                err = (got[k][row : row + 1] - ref[k]).abs() / ref[k].abs().clamp(min=1)
                assert err.max() < tol(1e-5), (i, k)  # padding reorders sums


@pytest.mark.parametrize("norm", NORMS)
def test_capsule_pooler_is_the_spec_on_the_prompt_slice(norm):
    """The batched, masked capsule pooler equals docs/methods.md's formulas (PARADE) run on each row's prompt alone."""
    ad = trained("parade", "llama", 4, input_norm=norm)
    h = torch.randn(3, 9, ad.args.dim, device=DEVICE) * 30  # a residual stream far from unit scale
    _, _, mask = prompt_batch(0, [4, 9, 1], 0)
    got = ad.pooled(1, h, mask)
    W_cap, v = ad.caps.w_cap[1], ad.caps.v[1]
    read = rms_normed(h, ad.args.norm_eps) if norm == "rms" else h
    for b in range(3):
        hp = read[b][mask[b]] @ ad.gen.w_down[1]  # (T_b, r)
        m = torch.stack([hp @ W_cap[k] for k in range(4)], 1)  # (T_b, K, r/K)
        logit = hp @ v.T
        for _ in range(2):
            s = (logit.softmax(0)[..., None] * m).sum(0)  # (K, r/K)
            n = s.norm(dim=-1, keepdim=True)
            c = n**2 / (1 + n**2) * s / n
            logit = logit + (c[None] * m).sum(-1)
        assert (got[b] - c.flatten()).abs().max() < 1e-5 * c.abs().max().clamp(min=1)
    zero = torch.zeros(2, 3, requires_grad=True)
    squash(zero).sum().backward()
    assert torch.equal(squash(zero), zero) and torch.isfinite(zero.grad).all()


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("options", [{}, {"pooler": "mean"}])
def test_iapt_soft_tokens_are_the_spec_on_the_prompt_slice(options, norm):
    """Batched, masked soft tokens equal docs/methods.md's formulas (IAPT) on each row's prompt alone, with
    layers 0-1 and 2 (a smaller last group) sharing W_down, W_up and R."""
    ad = trained("iapt", "gemma", 5, share_every=2, input_norm=norm, **options)
    h = torch.randn(2, 8, ad.args.dim, device=DEVICE) * (1 if norm == "none" else 30)
    _, _, mask = prompt_batch(0, [3, 8], 0)
    read = rms_normed(h, ad.args.norm_eps) if norm == "rms" else h
    for i in range(ad.args.n_layers):
        g = i // 2
        got = ad.soft_tokens(i, h, mask)
        for b in range(2):
            u = read[b][mask[b]] @ ad.w_down[g]
            if options.get("pooler") == "mean":
                p = u.mean(0).expand(4, -1)
            else:
                p = (u @ ad.w_sa[i]).softmax(0).T @ u
            s = rational(p, ad.act[g].a, ad.act[g].b) @ ad.w_up[g]
            assert (got[b] - s).abs().max() < 1e-5


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("pooler", ["last", "mean", "max"])
@pytest.mark.parametrize("method", ["para", "pedro", "parade"])
def test_vector_generator_is_the_spec_on_the_prompt_slice(method, pooler, norm):
    """PARA's pooled input, z = pool(norm(h)) @ W_down, on each row's prompt alone: with
    input_norm rms every position is divided by its own RMS before pooling (for max and
    mean, that is not the pooled vector normalised)."""
    ad = trained(method, "gemma", 8, pooler=pooler, input_norm=norm)
    h = torch.randn(3, 9, ad.args.dim, device=DEVICE) * torch.linspace(1, 50, 9, device=DEVICE)[:, None]
    _, _, mask = prompt_batch(0, [4, 9, 1], 0)
    got = ad.pooled(2, h, mask)
    read = rms_normed(h, ad.args.norm_eps) if norm == "rms" else h
    for b in range(3):
        x = read[b][mask[b]]
        pooled = {"last": x[-1], "mean": x.mean(0), "max": x.amax(0)}[pooler]
        want = pooled @ ad.gen.w_down[2]
        assert (got[b] - want).abs().max() < 1e-5 * want.abs().max().clamp(min=1)


@pytest.mark.parametrize("method", METHODS)
def test_rms_input_norm_reads_the_direction_of_h_not_its_scale(method):
    """With input_norm rms a generator's output does not change when the residual stream is
    scaled (Gemma 3's grows to a norm of ~3e4); with none it does."""
    h = torch.randn(2, 6, tiny_args("llama").dim, device=DEVICE)
    _, _, mask = prompt_batch(0, [4, 6], 0)

    def out(norm, scale):
        ad = trained(method, "llama", 9, input_norm=norm)
        with torch.no_grad():
            return ad.soft_tokens(1, h * scale, mask) if method == "iapt" else ad.pooled(1, h * scale, mask)

    assert (out("rms", 1000.0) - out("rms", 1.0)).abs().max() < 1e-4 * out("rms", 1.0).abs().max()
    assert (out("none", 1000.0) - out("none", 1.0)).abs().max() > 0.1 * out("none", 1000.0).abs().max()


@pytest.mark.parametrize("method", METHODS)
def test_input_norm_is_stored_in_the_adapter_file(method, tmp_path):
    """The default is rms, and the file records the setting: a none adapter loads as none."""
    from minipara.io.adapters import adapter_info, load_adapter, save_adapter

    args = tiny_args("llama")
    assert build_adapter(method, args).config.input_norm == "rms"
    for norm in NORMS:
        save_adapter(tmp_path / f"{norm}.safetensors", build_adapter(method, args, input_norm=norm), args)
        assert adapter_info(tmp_path / f"{norm}.safetensors")["config"]["input_norm"] == norm
        assert load_adapter(tmp_path / f"{norm}.safetensors", args).config.input_norm == norm


# ---- one generator run per request; decoding costs the same whatever the generator's size ------


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("since", ["all", "prompt_end"])
@pytest.mark.parametrize("method", METHODS)
def test_generators_run_once_per_request_also_with_beams(family, method, since, norm, monkeypatch):
    """Prefill on 2 prompts, expand to 3 beams each (load_rows), 5 decode steps with beam
    reorders (of every slot, or, as beam search does, of the slots after the shared
    prompt only): every layer's generator ran exactly once, and each step's logits equal
    a full forward over that beam's tokens."""
    model, ad = shared_tiny_model(family), trained(method, family, 6, input_norm=norm)
    calls = record(ad, monkeypatch)
    tokens, valid, _ = prompt_batch(6, [6, 3], 0)
    P, steps, n_pre = tokens.shape[1], 5, ad.n_prefix
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cache = model.new_cache(2, n_pre + P + steps, n_prefix=n_pre)
        model(tokens, valid=valid, cache=cache, adapter=ad)
        beams = model.new_cache(6, n_pre + P + steps, n_prefix=n_pre)
        beams.load_rows(cache, torch.arange(2).repeat_interleave(3).to(DEVICE))
        seqs, ok = tokens.repeat_interleave(3, 0), valid.repeat_interleave(3, 0)
        history = []
        for _ in range(steps):
            rows = (torch.arange(2).repeat_interleave(3) * 3 + torch.randint(0, 3, (6,), generator=g)).to(DEVICE)
            beams.reorder(rows, since=0 if since == "all" else n_pre + P)
            new = torch.randint(3, 97, (6, 1), generator=g).to(DEVICE)
            seqs, ok = torch.cat([seqs[rows], new], 1), torch.cat([ok[rows], torch.ones_like(new, dtype=torch.bool)], 1)
            history.append((seqs, ok, model(new, cache=beams)[:, -1]))
    assert sorted(i for i, _ in calls) == list(range(model.args.n_layers))
    prompt = torch.arange(P + steps, device=DEVICE) < P
    with torch.no_grad():
        for seqs, ok, logits in history:
            full = model(seqs, valid=ok, adapter=ad, pool_mask=ok & prompt[: seqs.shape[1]])
            assert (full[:, -1] - logits).abs().max() < tol(1e-5)


@pytest.mark.parametrize(
    "method, small, large",
    [
        ("para", {"r": 4}, {"r": 24}),
        ("pedro", {"r": 4}, {"r": 24}),
        ("parade", {"r": 4}, {"r": 24}),
        ("iapt", {"m": 8, "share_every": 1}, {"m": 64, "share_every": 3}),
    ],
)
def test_decode_state_does_not_depend_on_generator_size(method, small, large):
    """What a decode step reads (cache buffers and the stored per-layer states) has the same
    shapes for a small and a large generator: decode cost is independent of r and m."""
    model = shared_tiny_model("llama")
    tokens, valid, _ = prompt_batch(7, [5, 2], 0)

    def footprint(options):
        ad = trained(method, "llama", 7, **options)
        cache = model.new_cache(2, ad.n_prefix + 8, n_prefix=ad.n_prefix)
        with torch.no_grad():
            model(tokens, valid=valid, cache=cache, adapter=ad)
        shapes = {name: tuple(b.shape) for name, b in cache.named_buffers()}
        shapes.update({key: tuple(t.shape) for key, t in cache.packed.items()})
        shapes.update(
            {
                (i, key): tuple(t.shape)
                for i, s in enumerate(cache.states)
                if s is not None
                for key, t in parts(s).items()
            }
        )
        return shapes

    assert footprint(small) == footprint(large)


# ---- parameters -------------------------------------------------------------------------------


def test_parameter_counts_on_llama2_7b_shape():
    args = ModelArgs(**SHAPES["llama-2-7b"])

    def count(method, **options):
        with torch.device("meta"):
            ad = build_adapter(method, args, **options)
        arch = getattr(ad, "arch_parameters", lambda: [])()
        return sum(p.numel() for p in ad.parameters()), sum(p.numel() for p in arch)

    para = count("para")[0]
    assert count("para", up_bias=False)[0] == 32 * (4096 * 12 + 12 * 19200) == 8_945_664  # the papers' 8.9M
    assert para == 32 * (4096 * 12 + 12 * 19200 + 19200) == 9_560_064
    assert count("pedro") == (para + 32 * 12, 32 * 12)
    parade = count("parade")[0]
    assert parade == para + 32 * (12 * 12 + 4 * 12) == 9_566_208 and abs(parade - para) / para < 0.01
    # PARADE-3 / PARADE-4 without b_up: the paper's 9.8M and 9.4M (plus the capsules)
    assert count("parade", targets="qkvgu", r=8, up_bias=False)[0] == 9_830_400 + 32 * (8 * 8 + 4 * 8)
    assert count("parade", targets="qv", r=24, up_bias=False)[0] == 9_437_184 + 32 * (24 * 24 + 4 * 24)
    # IAPT: the paper's formula (docs/methods.md, IAPT) (16.8M; the paper says 8.4M) plus R's 12 per sharing group
    assert count("iapt") == (8 * 2 * 4096 * 256 + 32 * 256 * 4 + 8 * 12, 8 * 12) == (16_810_080, 96)
    assert count("iapt", share_every=16, m=1024)[0] == 2 * 2 * 4096 * 1024 + 32 * 1024 * 4 + 2 * 12
    assert count("iapt", share_every=1, m=64)[0] == 32 * 2 * 4096 * 64 + 32 * 64 * 4 + 32 * 12
    assert count("iapt", share_every=5)[1] == 7 * 12  # 32 layers in groups of 5: the last has 2
    assert count("iapt", activation="gelu") == (8 * 2 * 4096 * 256 + 32 * 256 * 4, 0)
    assert count("iapt", pooler="mean")[0] == 8 * 2 * 4096 * 256 + 8 * 12  # no W_sa


@pytest.mark.parametrize("method, options", [(m, {}) for m in METHODS] + [("iapt", {"share_every": 2})])
def test_only_adapter_parameters_get_gradients(family, method, options):
    model, ad = shared_tiny_model(family), trained(method, family, 2, **options)
    tokens, valid, prompt = prompt_batch(2, [6, 3], 3)
    logits = model(tokens, valid=valid, adapter=ad, pool_mask=prompt)
    F.cross_entropy(logits[:, :-1][valid[:, 1:]], tokens[:, 1:][valid[:, 1:]]).backward()
    assert all(p.grad is None for p in model.parameters())
    for name, p in ad.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("method", METHODS)
def test_arch_parameters_are_the_rational_ones(method):
    ad = build_adapter(method, tiny_args("llama"))
    arch = {id(p) for p in getattr(ad, "arch_parameters", lambda: [])()}
    assert arch == {id(p) for name, p in ad.named_parameters() if name.startswith("act.")}
    assert len(arch) == {"pedro": 2 * 3, "iapt": 2 * 1}.get(method, 0)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("parade", {"capsules": 5}, "capsules must divide r"),
        ("parade", {"pooler": "first"}, "parade has no pooler"),
        ("iapt", {"pooler": "max"}, "unknown IAPT pooler"),
        ("iapt", {"activation": "tanh"}, "unknown IAPT activation"),
        ("pedro", {"activation": "relu_gelu"}, "unknown PEDRO activation"),
        ("iapt", {"share_every": 0}, "share_every must be at least 1"),
        ("para", {"input_norm": "layer"}, "unknown PARA input_norm 'layer'; use one of rms, none"),
        ("parade", {"input_norm": "RMS"}, "unknown PARADE input_norm"),
        ("iapt", {"input_norm": "off"}, "unknown IAPT input_norm"),
        ("pedro", {"input_norm": 0}, "input_norm must be a string"),
    ],
)
def test_bad_options_are_refused(method, options, message):
    with pytest.raises(UserError, match=message):
        build_adapter(method, tiny_args("llama"), **options)


@pytest.mark.parametrize("method", ["pedro", "iapt"])
@pytest.mark.parametrize(
    "activation, first, last",
    [("relu", F.relu, F.relu), ("gelu", F.gelu, F.gelu), ("relu-gelu", F.relu, F.gelu), ("gelu-relu", F.gelu, F.relu)],
)
def test_fixed_activation_variants(method, activation, first, last):
    """PEDRO-5/6/7 and IAPT-4..7 (docs/methods.md): fixed activations, split by depth at half the layers;
    with no rational left there are no architecture parameters (no bi-level steps)."""
    args = ModelArgs(**{**tiny_args("llama").__dict__, "n_layers": 4})
    ad = build_adapter(method, args, activation=activation)
    z = torch.linspace(-3, 3, 13)
    for layer, want in ((0, first), (1, first), (2, last), (3, last)):
        assert torch.equal(ad.activation(layer, z), want(z)), (layer, activation)
    assert ad.arch_parameters() == [] and not any(n.startswith("act.") for n, _ in ad.named_parameters())
    assert len(build_adapter(method, args).arch_parameters()) > 0  # the default stays the rational
