"""What the three command-line scripts share: model options and one-line errors."""

import argparse
import math
import os
import sys
import traceback
import warnings

from minipara.checks import SEED_MAX
from minipara.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse, with its mistakes reported like every other: one `error:` line, status 2."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def finite(text: str) -> float:
    """A float flag: NaN and infinity are never a setting (argparse type)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"needs a finite number, got {text!r}")
    return v


def seed(text: str) -> int:
    """A seed flag: an integer from 0 to SEED_MAX (minipara.checks, the library's rule too)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs an integer, got {text!r}") from None
    if not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {SEED_MAX}, got {v}")
    return v


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
    from minipara.api import load

    if shard:
        from minipara.train.distributed import shard_layers

        return load(args.model, args.dtype, args.device, shard=shard_layers)
    return load(args.model, args.dtype, args.device)


def load(args, shard: bool = False):
    """(model, tokenizer, model_dir) for parsed --model/--dtype/--device."""
    lm = load_lm(args, shard)
    return lm.model, lm.tokenizer, lm.path


def _show_warning(message, *_, **__):
    print(f"warning: {message}", file=sys.stderr)


def run(main):
    """Run main(); a UserError becomes `error: ...` on stderr and exit status 2. A closed
    stdout (`| head -1`) ends the run quietly, as it ends any Unix tool (status 141, SIGPIPE's)."""
    warnings.showwarning = _show_warning
    try:
        sys.exit(main())
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        sys.exit(141)
    except UserError as e:
        print(f"error: {e.flag_message()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:  # a bug, not a user mistake: keep the traceback
        traceback.print_exc()
        sys.exit(1)
