"""The seven projections of a decoder layer, which adapters address by name, written once.

Methods, the PEFT import/export and the HF checkpoint reader/writer all speak of a layer's
linears by these names; the model fuses q|k|v and gate|up into one linear each.
"""

from minipara.model.config import ModelArgs

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
FUSED = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}
# The HF module of each projection, relative to a decoder layer (`model.layers.N.`).
HF_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
# Fused linear name -> (block submodule, attribute): where it lives in minipara's model.
LINEARS = {
    "qkv": ("attention", "wqkv"),
    "o": ("attention", "wo"),
    "gate_up": ("ffn", "w_gate_up"),
    "down": ("ffn", "w_down"),
}


def parts(fused: str) -> list[str]:
    """The projections fused into one linear, in their order along its output."""
    return [p for p in PROJECTIONS if FUSED[p] == fused]


def out_sizes(args: ModelArgs) -> dict[str, int]:
    """Output width of each projection (from the projection shapes, not from `dim`)."""
    return dict(
        q=args.q_dim, k=args.kv_dim, v=args.kv_dim, o=args.dim, gate=args.ffn_dim, up=args.ffn_dim, down=args.dim
    )


def widths(args: ModelArgs, fused: str) -> list[int]:
    """The output widths of a fused linear's parts, in their order (how its output splits)."""
    outs = out_sizes(args)
    return [outs[p] for p in parts(fused)]


def in_sizes(args: ModelArgs) -> dict[str, int]:
    return dict(q=args.dim, k=args.dim, v=args.dim, o=args.q_dim, gate=args.dim, up=args.dim, down=args.ffn_dim)


def fused_linear(model, i: int, f: str):
    """Layer i's fused linear `f` (qkv, o, gate_up, down) in a minipara Transformer."""
    sub, name = LINEARS[f]
    return getattr(getattr(model.layers[i], sub), name)
