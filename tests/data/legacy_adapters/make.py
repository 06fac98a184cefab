"""How the adapter files in this folder were made: run once, at commit 81f7437, before the
prompt-aware generators got `input_norm` (docs/methods.md, "Generator inputs"; the "Decisions added after the second
review"). Their stored configs have no `input_norm` field, so they must load as
`input_norm: none` and keep their outputs (tests/test_legacy_adapters.py). Do not run it
again to refresh them: today's code writes `input_norm` into the file, which is not what
these fixtures pin.

    cd tests && python data/legacy_adapters/make.py
"""

from pathlib import Path

import torch
from conftest import tiny_args, tiny_model
from safetensors.torch import save_file

from minipara.decode.generation import GenerationConfig, generate
from minipara.io.adapters import save_adapter
from minipara.methods import build_adapter

HERE = Path(__file__).parent
METHODS = ("para", "pedro", "parade", "iapt")
PROMPTS = [[5, 17, 33, 8, 61, 4, 29], [44, 9, 70]]
NEW = 8


def trained(method: str, family: str, seed: int):
    """Random "trained-looking" weights (tests/test_prompt_aware.py's trained()): W_up away from
    zero, b_up away from one, rationals off GELU, capsule routing far from uniform."""
    ad = build_adapter(method, tiny_args(family))
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
            else:
                p.copy_(r * 0.5 / p.shape[-2] ** 0.5)
    return ad


def main():
    expected = {}
    for family in ("llama", "gemma"):
        model = tiny_model(family, dtype=torch.float32).cpu()
        for k, method in enumerate(METHODS):
            ad = trained(method, family, seed=10 + k)
            save_adapter(HERE / f"{method}-{family}.safetensors", ad, model.args)
            T = max(map(len, PROMPTS))
            tokens = torch.tensor([[0] * (T - len(p)) + p for p in PROMPTS])
            valid = tokens != 0
            with torch.no_grad():
                logits = model(tokens, valid=valid, adapter=ad, pool_mask=valid)
            out = generate(model, PROMPTS, GenerationConfig(max_new_tokens=NEW, eos_ids=()), adapter=ad)
            expected[f"{method}-{family}.logits"] = logits.float().contiguous()
            expected[f"{method}-{family}.tokens"] = torch.tensor(out)
    save_file(expected, HERE / "expected.safetensors")


if __name__ == "__main__":
    main()
