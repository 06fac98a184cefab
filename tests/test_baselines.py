"""Baselines (LoRA, (IA)^3, BitFit, P-tuning v2) and the PEFT importer.

The PEFT round trips use the real `peft` package (a test-only dependency) to make and run
adapters on tiny random HF models, so the names, shapes and maths are PEFT's own.
"""

import json
import math
import shutil
import threading

import pytest
import torch
from conftest import (
    DEVICE,
    TINY,
    assert_decode_matches_full_forward,
    count_ops,
    hf_base,
    prompt_batch,
    shared_tiny_model,
    tiny_args,
    tol,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minipara.errors import UserError
from minipara.methods import build_adapter
from minipara.model.config import ModelArgs
from minipara.model.projections import HF_MODULES
from minipara.model.shapes import SHAPES

IDENTITY = ("lora", "ia3", "bitfit")
ALL = IDENTITY + ("ptuning_v2",)


def trained(method: str, family: str, seed: int = 0):
    """An adapter with random "trained-looking" weights (its zero/one-init tensors perturbed)."""
    torch.manual_seed(seed)
    ad = build_adapter(method, tiny_args(family))
    with torch.no_grad():
        for name, p in ad.named_parameters():
            if name.startswith(("b.", "bias.")):
                p.normal_(0, 0.2)
            elif name.startswith("scale."):
                p.normal_(1, 0.2)
    return ad.to(DEVICE)


@pytest.mark.parametrize("method", IDENTITY)
def test_zero_init_is_identity(family, method):
    model = shared_tiny_model(family)
    tokens, valid, _ = prompt_batch(0, [7, 4, 9], 0)
    with torch.no_grad():
        base = model(tokens, valid=valid)
        out = model(tokens, valid=valid, adapter=build_adapter(method, model.args).to(DEVICE))
    assert torch.equal(base, out)  # y + x A 0, y * 1 and y + 0 are y exactly


def test_ptuning_v2_is_not_identity_and_shifts_positions():
    model = shared_tiny_model("llama")
    ad = build_adapter("ptuning_v2", model.args).to(DEVICE)
    assert ad.n_prefix == 64 and ad.prefix.shape == (3, 2, 2, 64, 12)
    tokens, valid, _ = prompt_batch(0, [6], 0)
    with torch.no_grad():
        assert not torch.allclose(model(tokens, valid=valid), model(tokens, valid=valid, adapter=ad))


@settings(max_examples=15, deadline=None)
@given(
    family=st.sampled_from(["llama", "gemma"]),
    method=st.sampled_from(ALL),
    lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3),
    extra=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_decode_matches_full_forward(family, method, lengths, extra, seed):
    model, ad = shared_tiny_model(family), trained(method, family, seed)
    assert_decode_matches_full_forward(model, ad, seed, lengths, extra)


@pytest.mark.parametrize("method", IDENTITY)
def test_merge_gives_the_unmerged_logits(family, method):
    model, ad = shared_tiny_model(family), trained(method, family, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = ad.merge(model)
    tokens, valid, _ = prompt_batch(1, [9, 5], 0)
    with torch.no_grad():
        ref = model(tokens, valid=valid, adapter=ad)
        got = merged(tokens, valid=valid)
    assert (ref - got)[valid].abs().max() < tol(1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    if method == "bitfit":  # the copy now has biases, and says so
        assert merged.args.attention_bias and merged.args.mlp_bias and not model.args.attention_bias


@settings(max_examples=30, deadline=None)
@given(
    present=st.lists(st.booleans(), min_size=1, max_size=3).filter(any),
    ranks=st.lists(st.integers(1, 5), min_size=3, max_size=3),
    per_row=st.booleans(),
    tokens=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**16),
)
def test_fused_low_rank_pairs_add_each_parts_own_update(present, ranks, per_row, tokens, seed):
    """LayerState's compact low-rank layout (A rank-major over the parts, each part's B in its
    own columns): any mix of present parts and ranks, shared or per row, adds exactly each
    part's x @ A @ B at its own columns, at one token (decode's sums) and at several."""
    from minipara.model.layer_state import fuse_lora, lora_delta, lora_update

    g = torch.Generator().manual_seed(seed)
    widths, d_in, rows = [6, 4, 4][: len(present)], 5, 2
    lead = (rows,) if per_row else ()
    pairs = [
        (
            torch.randn(*lead, d_in, r, generator=g, dtype=torch.float64),
            torch.randn(*lead, r, w, generator=g, dtype=torch.float64),
        )
        if on
        else None
        for on, r, w in zip(present, ranks, widths)
    ]
    x = torch.randn(rows, tokens, d_in, generator=g, dtype=torch.float64)
    want = torch.cat(
        [x @ ab[0] @ ab[1] if ab is not None else x.new_zeros(rows, tokens, w) for ab, w in zip(pairs, widths)], -1
    )
    a, bm = fuse_lora(pairs, widths)
    split = widths if len(widths) > 1 else None
    assert torch.allclose(lora_update(x, a, bm, split), want, atol=1e-12)
    assert torch.allclose(x @ lora_delta(a, bm, split), want, atol=1e-12)


@pytest.mark.parametrize("method", ["ptuning_v2", "para"])
def test_merge_refused_for_prefix_and_prompt_aware_methods(method):
    with pytest.raises(UserError, match="cannot be merged"):
        build_adapter(method, tiny_args("llama")).merge(shared_tiny_model("llama"))


def test_parameter_counts_on_llama2_7b_shape():
    args = ModelArgs(**SHAPES["llama-2-7b"])
    with torch.device("meta"):
        counts = {m: sum(p.numel() for p in build_adapter(m, args).parameters()) for m in ALL}
    assert counts["lora"] == 32 * 4 * (4 * (4096 + 4096) + 3 * (4096 + 11008)) == 9_994_240
    assert counts["ia3"] == 32 * (4096 + 4096 + 11008) == 614_400
    assert counts["bitfit"] == 32 * (4 * 4096 + 2 * 11008 + 4096) == 1_359_872
    assert counts["ptuning_v2"] == 32 * 2 * 32 * 64 * 128 == 16_777_216


@pytest.mark.parametrize("method", ALL)
def test_only_adapter_parameters_get_gradients(family, method):
    model, ad = shared_tiny_model(family), trained(method, family, 2)
    tokens, valid, prompt = prompt_batch(2, [6, 3], 3)
    logits = model(tokens, valid=valid, adapter=ad, pool_mask=prompt)
    torch.nn.functional.cross_entropy(logits[:, :-1][valid[:, 1:]], tokens[:, 1:][valid[:, 1:]]).backward()
    assert all(p.grad is None for p in model.parameters())
    for name, p in ad.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_lora_fuses_all_layers_pairs_once_a_pass():
    """LoRA's pairs do not depend on the prompt: a pass over the layers (a forward, a prefill)
    fuses all layers' at its first, in as many ops for 6 layers as for 3 (per layer it was 37 a
    layer); a pass that starts again, or a call out of order, sees the parameters as they are."""

    def pass_ops(n_layers):
        args = ModelArgs(**{**TINY["llama"], "n_layers": n_layers})
        ad, h = build_adapter("lora", args), torch.randn(2, 5, args.dim)
        return count_ops(lambda: [ad.layer_state(i, h, None, None) for i in range(n_layers)])

    assert pass_ops(6) == pass_ops(3)

    ad, h = trained("lora", "llama", 4), torch.randn(2, 5, tiny_args("llama").dim)
    down = lambda i: ad.layer_state(i, h, None, None).lora["down"][1]  # noqa: E731
    with torch.no_grad():
        first = [down(i) for i in range(3)]
        for b in ad.b.values():
            b.mul_(2)
        assert all(torch.equal(down(i), 2 * first[i]) for i in (0, 1))  # a new pass, stopped before its end
        for b in ad.b.values():
            b.mul_(2)
        assert torch.equal(down(1), 4 * first[1]) and first[1].abs().max() > 0  # out of order: built again
        down(0)  # a pass begun here, then one begun in another thread, on other parameters
        for b in ad.b.values():
            b.mul_(2)
        other = threading.Thread(target=down, args=(0,))
        other.start()
        other.join()
        assert torch.equal(down(1), 4 * first[1])  # this thread's pass goes on with its own states


def test_bad_targets_are_refused():
    with pytest.raises(UserError, match="'qq' is not a projection"):
        build_adapter("lora", tiny_args("llama"), targets=("q", "qq"))
    assert build_adapter("ia3", tiny_args("llama"), targets="v,q").config.targets == ("q", "v")


# ---- PEFT import ------------------------------------------------------------------------------

ALL_LINEARS = [m.split(".")[1] for m in HF_MODULES.values()]  # q_proj ... down_proj


@pytest.fixture(scope="module", params=["llama", "gemma"])
def peft_pair(request, tmp_path_factory):
    """(HF base model, minipara model loaded from its saved directory)."""
    pytest.importorskip("peft")
    from minipara.io.checkpoints import load_model

    path = tmp_path_factory.mktemp(f"base-{request.param}")
    hf = hf_base(request.param, path)
    return hf, load_model(path)


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory):
    """(minipara LLaMA model, directory of a PEFT LoRA made for it): the refusal cases edit copies."""
    pytest.importorskip("peft")
    from minipara.io.checkpoints import load_model

    path = tmp_path_factory.mktemp("refusals")
    hf = hf_base("llama", path / "base")
    peft_adapter(hf, path / "ok", "lora")
    return load_model(path / "base"), path / "ok"


def peft_adapter(hf, path, kind: str, **options):
    """Wrap a copy of `hf` with a PEFT adapter of random weights, save it to `path`; returns the PeftModel."""
    import copy

    import peft

    torch.manual_seed(1)
    if kind == "lora":
        options = {"r": 4, "lora_alpha": 8, **options}
        cfg = peft.LoraConfig(target_modules=ALL_LINEARS, init_lora_weights=False, **options)
    else:
        cfg = peft.IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"],
            feedforward_modules=["down_proj"],
            init_ia3_weights=False,
            **options,
        )
    pm = peft.get_peft_model(copy.deepcopy(hf), cfg).eval()
    pm.save_pretrained(path)
    return pm


def logits_agree(pm, model, ad):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(3, 128, (2, 11), generator=g)
    with torch.no_grad():
        ref = pm(input_ids=tokens).logits
        got = model(tokens, adapter=ad)
    return (ref - got).abs().max().item()


@pytest.mark.parametrize(
    "kind, options",
    [
        ("lora", {}),
        ("lora", {"use_rslora": True}),
        # alpha 8 is PEFT's default (and minipara's): only other alphas show an importer that
        # drops lora_alpha, with alpha/r and with rsLoRA's alpha/sqrt(r).
        ("lora", {"lora_alpha": 16}),
        ("lora", {"lora_alpha": 16, "use_rslora": True}),
        ("lora", {"r": 2, "lora_alpha": 3.5}),
        ("ia3", {}),
    ],
)
def test_peft_round_trip(peft_pair, tmp_path, kind, options):
    from minipara.io.peft_import import load_peft_adapter

    hf, model = peft_pair
    pm = peft_adapter(hf, tmp_path, kind, **options)
    ad = load_peft_adapter(tmp_path, model.args)
    assert ad.method == kind
    if kind == "lora":
        r, alpha = options.get("r", 4), options.get("lora_alpha", 8)
        assert ad.config.r == r and ad.config.targets == ("q", "k", "v", "o", "gate", "up", "down")
        assert ad.config.scale == alpha / (r**0.5 if options.get("use_rslora") else r)
        assert pm.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == ad.config.scale
    else:
        assert ad.config.targets == ("k", "v", "up")  # down_proj's input scaling is the up output's
    assert logits_agree(pm, model, ad) < 1e-4
    # Older PEFT files keep the adapter name in tensor names.
    f = tmp_path / "adapter_model.safetensors"
    t = load_file(f)
    save_file(
        {
            k.replace(".lora_A.", ".lora_A.default.")
            .replace(".lora_B.", ".lora_B.default.")
            .replace(".ia3_l", ".ia3_l.default"): v
            for k, v in t.items()
        },
        f,
    )
    again = load_peft_adapter(tmp_path, model.args)
    assert all(torch.equal(a, b) for a, b in zip(ad.state_dict().values(), again.state_dict().values()))


def variant(src, dst, config=None, tensors=None):
    """A copy of the PEFT directory `src` with config fields replaced and tensors edited."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors:
        f = dst / "adapter_model.safetensors"
        save_file(tensors(load_file(f)), f)
    return dst


def drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def reshape(name):
    return lambda t: {**t, name: torch.zeros(t[name].shape[0], t[name].shape[1] + 1)}


Q_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
LORA_REFUSALS = {
    "bias": ({"bias": "all"}, None, "trains biases"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, None, "modules_to_save"),
    "dora": ({"use_dora": True}, None, "DoRA"),
    "rank_pattern": ({"rank_pattern": {"q_proj": 8}}, None, "rank_pattern"),
    "alpha_pattern": ({"alpha_pattern": {"q_proj": 16}}, None, "alpha_pattern"),
    "layers_to_transform": ({"layers_to_transform": 0}, None, "layers_to_transform"),
    "unknown_target": ({"target_modules": ALL_LINEARS + ["lm_head"]}, None, "'lm_head' is not one of the projections"),
    "untargeted_tensor": ({"target_modules": ["q_proj"]}, None, "is not for a module in the config's target_modules"),
    "pissa": ({"init_lora_weights": "pissa"}, None, "changes the base weights"),
    "peft_type": ({"peft_type": "PREFIX_TUNING"}, None, "'PREFIX_TUNING' is not supported"),
    "missing": (None, drop(Q_A), f"tensor {Q_A} is missing"),
    "misshaped": (None, reshape(Q_A), rf"tensor {Q_A} has shape \[4, 65\], this llama model needs \[4, 64\]"),
    "other_module": (
        None,
        lambda t: {**t, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)},
        "lm_head.lora_A.weight adapts something other than",
    ),
    "deeper_model": (None, lambda t: {**t, Q_A.replace("layers.1", "layers.5"): t[Q_A].clone()}, "is for layer 5"),
}


@pytest.mark.parametrize("case", list(LORA_REFUSALS))
def test_peft_refusals(llama_lora, tmp_path, case):
    from minipara.io.peft_import import load_peft_adapter

    model, ok = llama_lora
    config, tensors, message = LORA_REFUSALS[case]
    bad = variant(ok, tmp_path / case, config, tensors)
    with pytest.raises(UserError, match=message) as e:
        load_peft_adapter(bad, model.args)
    assert "\n" not in str(e.value)


def test_peft_ia3_refuses_input_scaling_it_cannot_express(peft_pair, tmp_path):
    from minipara.io.peft_import import load_peft_adapter

    hf, model = peft_pair
    peft_adapter(hf, tmp_path / "ok", "ia3")
    bad = variant(
        tmp_path / "ok",
        tmp_path / "bad",
        {"target_modules": ["k_proj", "v_proj", "up_proj"], "feedforward_modules": ["up_proj"]},
        lambda t: {k.replace("down_proj", "up_proj"): v for k, v in t.items()},
    )
    with pytest.raises(UserError, match="up_proj is a feedforward module, so PEFT scales its input"):
        load_peft_adapter(bad, model.args)


def test_peft_pickle_is_never_opened(tmp_path):
    from minipara.io.peft_import import load_peft_adapter

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(UserError, match="safe_serialization=True"):
        load_peft_adapter(tmp_path, tiny_args("llama"))


def test_adapter_io_reads_peft_directories(peft_pair, tmp_path):
    """minipara.io.adapters.load_adapter hands a PEFT directory to the importer."""
    from minipara.io.adapters import load_adapter

    hf, model = peft_pair
    pm = peft_adapter(hf, tmp_path, "lora")
    assert logits_agree(pm, model, load_adapter(tmp_path, model.args)) < 1e-4
    assert math.isclose(load_adapter(tmp_path, model.args).config.scale, 2.0)
