"""What every command line shares: argparse with one-line errors, flag types, and run()
(errors become `error: ...` and exit status 2). Imports nothing of minipara but errors and checks."""

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
