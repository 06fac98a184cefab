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


def load_lm(args):
    """The minipara.LanguageModel for parsed --model/--dtype/--device."""
    from .api import load
    return load(args.model, args.dtype, args.device)


def load(args):
    """(model, tokenizer, model_dir) for parsed --model/--dtype/--device."""
    lm = load_lm(args)
    return lm.model, lm.tokenizer, lm.path


def run(main):
    """Run main(); a UserError becomes `error: ...` on stderr and exit status 2."""
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e.flag_message()}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:  # a bug, not a user mistake: keep the traceback
        traceback.print_exc()
        sys.exit(1)
