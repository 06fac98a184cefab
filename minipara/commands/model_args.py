"""The --model/--dtype/--device flags every command takes, and the model they name."""

import argparse

from minipara.api import load as load_model
from minipara.train.distributed import shard_layers


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument(
        "--model",
        default=None,
        help="HF-format model directory, or a shipped model: gemma-3-270m (the default) or "
        "smollm2-135m-instruct (converted on first use)",
    )
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")


def load_lm(args, shard: bool = False):
    """The minipara.LanguageModel for parsed --model/--dtype/--device; shard: the base's
    weights sharded over torchrun's ranks (distributed.shard_layers)."""
    if shard:
        return load_model(args.model, args.dtype, args.device, shard=shard_layers)
    return load_model(args.model, args.dtype, args.device)


def load(args, shard: bool = False):
    """(model, tokenizer, model_dir) for parsed --model/--dtype/--device."""
    lm = load_lm(args, shard)
    return lm.model, lm.tokenizer, lm.path
