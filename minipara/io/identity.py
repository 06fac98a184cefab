"""Which base model an adapter or a training checkpoint was made on: one record, one comparison.

The record holds the model's shape (model_type, n_layers, dim, vocab_size), `config_hash` (the
sha256 of the canonical JSON of all ModelArgs fields) and `weights` (loading.py's fingerprint
of the checkpoint's values; None for a randomly initialised model). A different shape or config
means the adapter cannot be right and is refused. Different weights under the same config are
legitimate for an adapter (a base model's adapter on its chat variant), so they give a warning;
a training run must continue on the very weights it started on, so `--resume` refuses them.
"""

import dataclasses
import hashlib
import json

from minipara.model.config import ModelArgs

SHAPE = ("model_type", "n_layers", "dim", "vocab_size")


def canonical_args(args: ModelArgs) -> str:
    """All ModelArgs fields as canonical JSON (tuples become lists, keys sorted)."""
    return json.dumps(dataclasses.asdict(args), sort_keys=True, separators=(",", ":"))


def base_record(args: ModelArgs, weights_id: str | None) -> dict:
    rec = {k: getattr(args, k) for k in SHAPE}
    rec["config_hash"] = hashlib.sha256(canonical_args(args).encode()).hexdigest()
    rec["weights"] = weights_id
    return rec


def compare_base(
    saved: dict, saved_args: str | None, args: ModelArgs, weights_id: str | None
) -> tuple[str | None, str | None]:
    """(refusal, warning) for something made on the base model `saved` (a base_record, with
    `saved_args` its canonical_args when known) used with the model (`args`, `weights_id`).
    Both None when they match; the texts complete "... was made for/on ..."."""
    here = base_record(args, weights_id)

    def describe(rec):
        vocab = f", vocabulary {rec.get('vocab_size')}" if saved.get("vocab_size") != here["vocab_size"] else ""
        return f"{rec.get('model_type')} with {rec.get('n_layers')} layers, dim {rec.get('dim')}{vocab}"

    if any(saved.get(k) != here[k] for k in SHAPE):
        return f"made for {describe(saved)}; this model is {describe(here)}", None
    if saved.get("config_hash") != here["config_hash"]:
        detail = ""
        try:
            old, new = json.loads(saved_args), json.loads(canonical_args(args))
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            detail = ": " + "; ".join(f"{k} {old.get(k)!r} there, {new.get(k)!r} here" for k in diff)
        except (TypeError, json.JSONDecodeError, AttributeError):
            pass
        return f"made for a {here['model_type']} model of the same shape but the model configs differ{detail}", None
    if saved.get("weights") and weights_id and saved["weights"] != weights_id:
        return None, (
            f"made on other weights of this model's architecture (weights fingerprint {saved['weights']}, "
            f"this checkpoint's {weights_id}): a fine-tune or chat variant of it"
        )
    return None, None
