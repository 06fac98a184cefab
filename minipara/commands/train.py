"""Train an adapter on a task with the papers' recipe; resumable, nothing lost on Ctrl-C.

    python train.py --method iapt --task copa
    python train.py --method para --task custom --train t.jsonl --dev d.jsonl --out runs/mine.safetensors
    python train.py --method para --task copa --resume          # continue an interrupted run
    torchrun --nproc-per-node 2 train.py --method para --task copa --device cuda   # data-parallel

Writes <out> (the best adapter by dev loss, or by the dev metric with --select metric),
<out stem>.ckpt (resumable checkpoint), <out stem>.log.jsonl (one line per evaluation) and
<out stem>.report.json (final report), holding <out>.lock meanwhile: one run per output.
Every option, file and path is checked before the first of these is written; an output
never overwrites an input.
Method options (--r, --pooler, --targets, ...) are the chosen method's config fields;
an option the method does not have is refused.
"""

import argparse
import json
import os
import shlex
import signal
import sys
from dataclasses import fields

from minipara import checks, cli
from minipara.commands import model_args
from minipara.errors import UserError
from minipara.methods import METHODS, method_class
from minipara.train.runs import ALIASES, RunInterrupted, RunOptions, option_field, run_options
from minipara.train.trainer import TrainConfig

TRAINING = (
    "seed",
    "epochs",
    "max_steps",
    "batch_size",
    "micro_batch",
    "lr",
    "arch_lr",
    "warmup",
    "eval_every",
    "patience",
    "eval_beams",
    "eval_batch",
    "max_grad_norm",
    "max_len",
    "select",
)


def method_fields() -> dict:
    """Config field name -> {method: default}, over every method whose module imports."""
    out = {}
    for m in METHODS:
        try:
            cls = method_class(m)
        except ImportError:  # a method not written yet: its options are simply absent
            continue
        for f in fields(cls.config_cls):
            out.setdefault(f.name, {})[m] = checks.default(f)
    return out


def parser(method_opts) -> argparse.ArgumentParser:
    T = TrainConfig  # the training options' defaults live there, once

    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--method",
        required=True,
        help="para | pedro | parade | iapt | lora | ia3 | bitfit | ptuning_v2 "
        "| none (no training: score the bare model on dev and test, as a reference)",
    )
    p.add_argument("--task", required=True, help="copa | boolq | rte | sst2 | ... | custom")
    model_args.add_model_args(p)
    p.add_argument("--out", help="adapter file to write (default: runs/<method>-<task>-seed<seed>.safetensors)")
    p.add_argument("--seed", type=cli.seed, default=T.seed)
    p.add_argument("--epochs", type=int, default=T.epochs)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (default: the epochs decide)")
    p.add_argument("--batch-size", type=int, help="default: 16 for under 10k training examples, else 128")
    p.add_argument(
        "--micro-batch",
        type=int,
        help="examples per forward pass; gradients are accumulated up to --batch-size (default: the whole batch)",
    )
    p.add_argument("--lr", type=cli.finite, default=T.lr)
    p.add_argument(
        "--arch-lr",
        type=cli.finite,
        default=T.arch_lr,
        help="peak lr of rational activations (PEDRO, IAPT), "
        "trained on dev batches (bi-level) with the same warm-up and decay",
    )
    p.add_argument(
        "--max-grad-norm", type=cli.finite, default=T.max_grad_norm, help="clip gradients to this global norm (0: off)"
    )
    p.add_argument(
        "--max-len",
        type=int,
        default=T.max_len,
        help="tokens per example; longer prompts lose their "
        "start (the response is kept whole) and are counted in the report",
    )
    p.add_argument("--warmup", type=cli.finite, default=T.warmup, help="warm-up fraction of the steps")
    p.add_argument(
        "--eval-every", type=int, help="steps between dev evaluations (default: 200, or one epoch if shorter)"
    )
    p.add_argument(
        "--patience",
        type=int,
        default=T.patience,
        help="stop after this many evaluations without a lower dev loss (or better metric, --select metric)",
    )
    p.add_argument(
        "--select",
        default=T.select,
        help="what picks the best checkpoint and stops early: dev loss (the papers') or the dev metric (metric)",
    )
    p.add_argument("--eval-beams", type=int, default=T.eval_beams)
    p.add_argument("--eval-batch", type=int, default=T.eval_batch, help="prompts decoded together in evaluation")
    p.add_argument("--max-eval", type=int, help="evaluate at most this many dev/test examples (default: all)")
    p.add_argument(
        "--max-test", type=int, help="evaluate at most this many test examples, 0 for all (default: as --max-eval)"
    )
    p.add_argument("--max-new-tokens", type=int, help="evaluation length (default: the longest train/dev response)")
    p.add_argument(
        "--template",
        default="auto",
        help="llama2 | gemma | chatml | llama3 | none | auto (default: the family's chat "
        "template when the model ships one, else none, as generate.py chooses)",
    )
    p.add_argument("--data-dir", help="folder with the task's files (COPA, RTE, SST-2 and GSM8K ship with minipara)")
    p.add_argument("--train", help="custom task: train jsonl of {prompt, response}")
    p.add_argument("--dev", help="custom task: dev jsonl")
    p.add_argument("--test", help="custom task: test jsonl (default: the dev file)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output and its checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from <out stem>.ckpt")
    p.add_argument(
        "--shard-base",
        action="store_true",
        help="under torchrun: shard the frozen base over the "
        "ranks (FSDP2), for bases that do not fit one GPU; the adapter stays replicated (without "
        "torchrun: no effect)",
    )
    g = p.add_argument_group("method options (each method's config fields)")
    taken = {a.dest for a in p._actions}
    for name in sorted(set(method_opts) | set(ALIASES)):
        if name in taken:
            continue
        if name in method_opts:
            info = ", ".join(f"{m} {_show(d)}" for m, d in method_opts[name].items())
        else:
            info = "alias of --" + "/--".join(t.replace("_", "-") for t in ALIASES[name] if t in method_opts)
        g.add_argument("--" + name.replace("_", "-"), dest="m_" + name, metavar="V", help=info)
    return p


def _show(default) -> str:
    return ",".join(default) if isinstance(default, tuple) else str(default)


def convert(text: str, f, flag: str):
    """A command-line string as a value of config field f's kind (minipara.checks)."""
    try:
        return checks.parse(text, f)
    except ValueError:
        raise UserError(f"{flag} needs {checks.want(checks.kind(f))}, got {text!r}") from None


def method_options(a) -> dict:
    """The method options given, as typed values under the method's field names; an option
    the method does not have is refused."""
    if a.method == "none":  # nothing is trained: method options mean nothing
        return {}
    cls = method_class(a.method)
    opts = {}
    for key, value in vars(a).items():
        if key.startswith("m_") and value is not None:
            f = option_field(cls, key[2:])
            opts[f.name] = convert(value, f, "--" + key[2:].replace("_", "-"))
    return opts


def command_argv() -> list[str]:
    """The command line as typed (interpreter included), for reports and the resume hint."""
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # each rank ran `python -u train.py ...`
        return ["torchrun", "--nproc-per-node", os.environ["WORLD_SIZE"], *sys.argv]
    return getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]


def main(argv=None):
    a = parser(method_fields()).parse_args(argv)
    typed = command_argv()
    flags = "method task out model dtype device template data_dir train dev test max_eval max_test max_new_tokens"
    given = {k: getattr(a, k) for k in (flags + " resume force shard_base").split()}
    try:
        report = run_options(
            RunOptions(
                **given,
                command=shlex.join(typed),
                options={**{k: getattr(a, k) for k in TRAINING}, **method_options(a)},
            )
        )
    except RunInterrupted as e:
        if e.rank == 0:
            again = [x for x in typed if x != "--force"] + ([] if "--resume" in typed else ["--resume"])
            print(
                f"interrupted at step {e.step}/{e.total_steps}; checkpoint saved to {e.checkpoint}.\n"
                f"Resume with: {shlex.join(again)}" + (" (any number of processes)" if e.world > 1 else ""),
                file=sys.stderr,
            )
        return 128 + int(getattr(signal.Signals, e.signal, signal.SIGINT))
    if report is not None:  # rank 0's
        print(json.dumps(report, indent=2))
    return 0
