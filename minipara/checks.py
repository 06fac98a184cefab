"""What a valid option value is: one rule for every typed option, whoever gives it (a Python
call, a command-line flag, an adapter file, a training checkpoint).

An option's kind is the type of its default: true or false, an integer, a finite number, a
string, or a list of names (a tuple default, which also takes "q,v"). Where the default is None,
the annotation names the kind (`max_steps: int | None`) and None is a value too. Method configs,
TrainConfig, GenerationConfig, a checkpoint's progress record, train.py's method options and the
Python API all check through `check`, so they agree on what a valid value is.
"""

import math
import os
import typing
from dataclasses import MISSING, fields

from minipara.errors import UserError

SEED_MAX = 2**32 - 1  # numpy's range; training derives data-order seeds from it in 64 bits


def default(f):
    """A dataclass field's default (its factory's value, if it has one)."""
    return f.default if f.default is not MISSING else f.default_factory()


def kind(f):
    """The type a field's values have: its default's, or, where the default is None, the one
    its annotation names besides None (`tuple[int, ...] | None` gives tuple[int, ...])."""
    d = default(f)
    if d is not None:
        return type(d)
    (named,) = [a for a in typing.get_args(f.type) if a is not type(None)]
    return named


def want(k, least: int | None = None) -> str:
    """What a value of kind k is, in words."""
    if k is int and least is not None:
        return f"at least {least} (an integer)"
    if (typing.get_origin(k) or k) is tuple:
        return "a list of integers" if _items(k) is int else "a list of names"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        k, f"a {getattr(k, '__name__', k)}"
    )


def valid(v, k, least: int | None = None) -> bool:
    """Whether v is a value of kind k (integers: at least `least`). A bool is not a number."""
    if k is bool:
        return isinstance(v, bool)
    if k is int:
        return isinstance(v, int) and not isinstance(v, bool) and (least is None or v >= least)
    if k is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if (typing.get_origin(k) or k) is tuple:
        item = _items(k)
        return (item is str and isinstance(v, str)) or isinstance(v, (tuple, list)) and all(valid(x, item) for x in v)
    return isinstance(v, typing.get_origin(k) or k)


def check(v, name: str, k, least: int | None = None, optional: bool = False, what: str = ""):
    """v, if it is a value of kind k (or None, if optional); else a UserError naming `name`
    (after `what`, e.g. "para option ")."""
    if not (v is None and optional or valid(v, k, least)):
        raise UserError(f"{what}{name} must be {want(k, least)}{' or None' * optional}, got {short(v)}", (name,))
    return v


def check_fields(obj, what: str = "", least: int | None = None):
    """Every field of the dataclass obj checked by its kind (None allowed where it is the default)."""
    for f in fields(obj):
        check(getattr(obj, f.name), f.name, kind(f), least, default(f) is None, what)


def check_path(p, name: str, optional: bool = False, empty: bool = False):
    """p, if it is a path (a string or a pathlib.Path; empty only if `empty`, None only if
    `optional`); else a UserError naming `name`."""
    if not (p is None and optional or isinstance(p, (str, os.PathLike)) and (empty or str(p))):
        raise UserError(f"{name} must be a path (a string or pathlib.Path), got {short(p)}", (name,))
    return p


def check_seed(v, name: str = "seed", optional: bool = False):
    """A seed: an integer from 0 to SEED_MAX, the command lines' rule (None, if optional)."""
    if not (v is None and optional or valid(v, int, 0) and v <= SEED_MAX):
        none = " or None" * optional
        raise UserError(f"{name} must be an integer from 0 to {SEED_MAX}{none}, got {short(v)}", (name,))
    return v


def parse(text: str, f):
    """A command-line string as a value of field f's kind; ValueError if it is not one."""
    k = kind(f)
    if k is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return text.lower() in ("true", "1", "yes")
    if (typing.get_origin(k) or k) is tuple:
        return tuple(_items(k)(x.strip()) for x in text.split(",") if x.strip())
    return k(text) if k in (int, float) else text


def _items(k):
    """A tuple kind's items: what its annotation names (tuple[int, ...]); names otherwise."""
    args = typing.get_args(k)
    return args[0] if args else str


def short(v) -> str:
    """v for an error line: its repr if short, else its start (strings) or its type. A
    5000-digit number, a whole file or a model's repr helps nobody."""
    if isinstance(v, int) and v.bit_length() > 200:  # (repr refuses past 4300 digits)
        return f"an integer of {v.bit_length()} bits"
    r = repr(v)
    if len(r) <= 60:
        return r
    return repr(v[:50]) + "..." if isinstance(v, str) else f"a {type(v).__name__}"
