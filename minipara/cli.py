"""What the three command-line scripts share: model options and one-line errors."""
import argparse
import sys
import traceback

from .errors import UserError


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=None,
                   help="HF-format model directory (default: the bundled Gemma 3 270M, converted on first use)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")


def model_dir(arg: str | None):
    if arg is not None:
        return arg
    from .weights import ensure_default_model
    return ensure_default_model()


def load(args):
    """(model, tokenizer, model_dir) for parsed --model/--dtype/--device."""
    from .loading import load_model, parse_device, parse_dtype
    from .tokenizer import Tokenizer
    device, dtype = parse_device(args.device), parse_dtype(args.dtype)  # fail before any work
    path = model_dir(args.model)
    return load_model(path, dtype, device), Tokenizer(path), path


def run(main):
    """Run main(); a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:  # a bug, not a user mistake: keep the traceback
        traceback.print_exc()
        sys.exit(1)
