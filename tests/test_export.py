"""Export: PEFT directories that the real `peft` loads onto HF transformers, and merged HF
checkpoints that transformers loads, both giving minipara's greedy tokens (tiny models of
both families); adapters that fixed weights cannot express are refused."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import hf_base  # noqa: E402

from minipara.decode.generation import GenerationConfig, generate  # noqa: E402
from minipara.errors import UserError  # noqa: E402
from minipara.io.checkpoints import load_model  # noqa: E402
from minipara.io.export import export_merged, export_peft  # noqa: E402
from minipara.io.peft_import import load_peft_adapter  # noqa: E402
from minipara.methods import build_adapter  # noqa: E402

PROMPTS = [[1, 5, 9, 22, 7], [1, 40, 3, 3, 100, 64, 12, 90]]
NEW = 12


@pytest.fixture(scope="module", params=["llama", "gemma"])
def base(request, tmp_path_factory):
    """(HF model, minipara model loaded from its directory, the directory)."""
    path = tmp_path_factory.mktemp(f"export-{request.param}")
    hf = hf_base(request.param, path)
    return hf, load_model(path), path


def trained_looking(model, method: str, **options):
    """An adapter with random weights far enough from identity to change greedy tokens."""
    torch.manual_seed(7)
    ad = build_adapter(method, model.args, **options)
    with torch.no_grad():
        for name, p in ad.named_parameters():
            p.copy_((1.0 if method == "ia3" else 0.0) + torch.randn(p.shape) * (0.5 if method == "lora" else 0.3))
    return ad


def ours(model, adapter) -> list[list[int]]:
    cfg = GenerationConfig(max_new_tokens=NEW, eos_ids=())  # never stop early: compare all NEW tokens
    return [generate(model, [p], cfg, adapter=adapter)[0] for p in PROMPTS]


def theirs(hf) -> list[list[int]]:
    gc = copy.deepcopy(hf.generation_config)
    gc.update(do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            out.append(
                hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)[0, len(p) :].tolist()
            )
    return out


@pytest.mark.parametrize(
    "method, options",
    [
        ("lora", {}),
        ("lora", {"alpha": 16.0}),  # not PEFT's default alpha: an export that dropped it would differ
        ("lora", {"alpha": 3.0, "rslora": True}),
        ("ia3", {"targets": "q,v,o,up,down"}),
    ],
)
def test_peft_export_loads_in_peft_with_equal_greedy_tokens(base, method, options, tmp_path):
    hf, model, path = base
    ad = trained_looking(model, method, **options)
    want = ours(model, ad)
    assert want != ours(model, None)  # the adapter changes the output, so agreement means something
    out = export_peft(ad, tmp_path / "peft", base_model=str(path))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), out).eval()
    assert theirs(pm) == want
    back = load_peft_adapter(out, model.args)  # and minipara reads its own export back exactly
    assert all(torch.equal(a, b) for a, b in zip(ad.state_dict().values(), back.state_dict().values()))


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit"])
def test_merged_export_loads_in_transformers_with_equal_greedy_tokens(base, method, tmp_path):
    hf, model, path = base
    # transformers' Gemma 3 has attention biases but no MLP biases.
    opts = {"targets": "q,k,v,o"} if method == "bitfit" and model.args.model_type != "llama" else {}
    ad = trained_looking(model, method, **opts)
    want = ours(model, ad)
    assert want != ours(model, None)
    out = export_merged(model, ad, tmp_path / "merged", path)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert theirs(merged) == want
    assert ours(load_model(out), None) == want  # minipara loads the export as any checkpoint


def test_exports_refuse_what_they_cannot_express(base, tmp_path):
    _, model, path = base
    for method in ("para", "iapt"):
        ad = build_adapter(method, model.args)
        for export in (lambda: export_peft(ad, tmp_path / "p"), lambda: export_merged(model, ad, tmp_path / "m", path)):
            with pytest.raises(UserError, match="generate their parameters from each prompt"):
                export()
    with pytest.raises(UserError, match="bitfit adapters cannot be exported to PEFT.*export_merged folds it"):
        export_peft(build_adapter("bitfit", model.args), tmp_path / "p")
    with pytest.raises(UserError, match="ptuning_v2 adapters cannot be exported"):
        export_merged(model, build_adapter("ptuning_v2", model.args), tmp_path / "m", path)
    if model.args.model_type != "llama":
        with pytest.raises(UserError, match="no MLP biases"):
            export_merged(model, build_adapter("bitfit", model.args), tmp_path / "m", path)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        export_peft(build_adapter("lora", model.args), tmp_path / "taken")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left behind
