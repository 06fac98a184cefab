"""HF transformers (+ PEFT) on the same weights, for bench.py --compare-hf.

The HF model is built from the same config and given views of minipara's own
parameters (the fused q|k|v and gate|up split back into HF's tensors), so both run
the same numbers without a second copy of the weights in memory. Adapters are what
a user of HF would take for each method: PEFT's LoRA and (IA)^3, and PEFT's mixed-batch
LoRA inference (`adapter_names`) for many tenants; the prompt-aware methods have
no HF implementation.
"""

import json
import time
from pathlib import Path

import torch

from minipara.decode.generation import left_pad
from minipara.io.checkpoints import hf_names
from minipara.model.config import ModelArgs
from minipara.model.projections import HF_MODULES

HF_VARIANTS = ("base", "lora", "ia3")  # methods HF + PEFT can run


def config_dict(args: ModelArgs) -> dict:
    """An HF config.json dict for ModelArgs (the shapes bench.py knows: LLaMA and Gemma 3)."""
    d = dict(
        vocab_size=args.vocab_size,
        hidden_size=args.dim,
        intermediate_size=args.ffn_dim,
        num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads,
        head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len,
        tie_word_embeddings=args.tie_embeddings,
        rope_theta=args.rope_theta,
        bos_token_id=args.bos_id,
        eos_token_id=list(args.eos_ids),
        pad_token_id=args.pad_id,
    )
    if args.model_type == "llama":
        return dict(d, model_type="llama", rope_scaling=args.rope_scaling)
    if args.model_type == "gemma3_text":
        return dict(
            d,
            model_type="gemma3_text",
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=round(args.attn_scale**-2),
            sliding_window=args.sliding_window,
            rope_local_base_freq=args.rope_local_theta,
            layer_types=["sliding_attention" if s else "full_attention" for s in args.sliding],
        )
    raise ValueError(f"no HF config for model_type {args.model_type!r}")


def hf_model(model, path=None):
    """An HF causal LM sharing `model`'s parameters (from path's config.json when given)."""
    import transformers

    a = model.args
    cfg = json.loads((Path(path) / "config.json").read_text()) if path else config_dict(a)
    config = transformers.AutoConfig.for_model(**cfg)
    w = model.tok_embeddings.weight
    with torch.device(w.device):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=w.dtype)
    params = dict(model.named_parameters())
    sizes = {"wqkv": [a.q_dim, a.kv_dim, a.kv_dim], "w_gate_up": [a.ffn_dim, a.ffn_dim]}
    state = {}
    for ours, theirs in hf_names(a).items():
        split = next((v for k, v in sizes.items() if f".{k}." in ours), [params[ours].shape[0]])
        state.update(zip(theirs, params[ours].split(split)))
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or [m for m in missing if not (a.tie_embeddings and m == "lm_head.weight")]:
        raise ValueError(f"HF model does not match: missing {missing}, unexpected {unexpected}")
    if a.tie_embeddings:
        hf.tie_weights()
    return hf.requires_grad_(False).eval()


def _random_lora(hf, names: list[str], seed: int):
    """hf wrapped by PEFT with one LoRA adapter per name (rank 4, alpha 8, all seven linears,
    as the papers' baseline), all with nonzero random weights."""
    import peft

    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=[m.split(".")[1] for m in HF_MODULES.values()]
    )
    torch.manual_seed(seed)
    pm = peft.get_peft_model(hf, cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    return pm.eval()


def hf_variant(model, variant: str, path=None, tenants: int = 0, batch: int = 1):
    """(HF model, generate kwargs) running `variant`, or None where HF has no implementation.
    With tenants, the batch's rows spread round-robin over that many LoRA adapters (PEFT's
    mixed-batch inference), as bench.py spreads minipara's."""
    if variant not in HF_VARIANTS:
        return None
    hf = hf_model(model, path)
    if variant == "base":
        return hf, {}
    if variant == "lora":
        names = [f"t{i}" for i in range(max(tenants, 1))]
        rows = [names[b % len(names)] for b in range(batch)]
        return _random_lora(hf, names, 0), {"adapter_names": rows} if tenants else {}
    if tenants:
        return None  # PEFT mixes only LoRA adapters within a batch
    import peft

    cfg = peft.IA3Config(
        target_modules=["k_proj", "v_proj", "up_proj"], feedforward_modules=["up_proj"], init_ia3_weights=False
    )
    torch.manual_seed(0)
    return peft.get_peft_model(hf, cfg).eval(), {}


class FirstTokenClock:
    """A logits processor that only notes when the first token's logits are ready."""

    def __init__(self):
        self.first_token_at = None

    def __call__(self, input_ids, scores):
        if self.first_token_at is None:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.first_token_at = time.perf_counter()
        return scores


class HFGenerate:
    """HF generate() with exactly `new_tokens` new tokens per row (EOS cannot end it early),
    greedy or beam search, on the same left-padded batch that minipara gets."""

    def __init__(self, hf, extra: dict, prompts, beams: int, new_tokens: int, pad_id: int):
        from transformers import LogitsProcessorList

        device = next(hf.parameters()).device
        self.hf, self.clock = hf, FirstTokenClock()
        self.tokens, valid = left_pad(prompts, pad_id, device)
        self.kwargs = dict(
            attention_mask=valid.long(),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            num_beams=beams,
            do_sample=False,
            pad_token_id=pad_id,
            logits_processor=LogitsProcessorList([self.clock]),
            **extra,
        )

    @torch.no_grad()
    def __call__(self) -> list[list[int]]:
        self.clock.first_token_at = None
        out = self.hf.generate(self.tokens, **self.kwargs)  # beam search: the best beam per prompt
        return out[:, self.tokens.shape[1] :].tolist()
