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
import resource
import shlex
import signal
import sys
import time
from dataclasses import MISSING, fields
from pathlib import Path

from minipara import cli
from minipara.errors import UserError

# Issue-level spellings for config fields whose names differ between methods.
ALIASES = {"rank": ("r",), "soft_tokens": ("soft_tokens", "l_sp", "n_soft"),
           "share_every": ("share_every", "l_s", "share")}
TRAINING = ("seed", "epochs", "max_steps", "batch_size", "micro_batch", "lr", "arch_lr", "warmup",
            "eval_every", "patience", "eval_beams", "eval_batch", "max_grad_norm", "max_len", "select")


def method_fields() -> dict:
    """Config field name -> {method: default}, over every method whose module imports."""
    from minipara.methods import METHODS, method_class
    out = {}
    for m in METHODS:
        try:
            cls = method_class(m)
        except ImportError:  # a method not written yet: its options are simply absent
            continue
        for f in fields(cls.config_cls):
            out.setdefault(f.name, {})[m] = f.default if f.default is not MISSING else f.default_factory()
    return out


def parser(method_opts) -> argparse.ArgumentParser:
    from minipara.training import TrainConfig as T  # the training options' defaults live there, once
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, help="para | pedro | parade | iapt | lora | ia3 | bitfit | ptuning_v2 "
                   "| none (no training: score the bare model on dev and test, as a reference)")
    p.add_argument("--task", required=True, help="copa | boolq | rte | sst2 | ... | custom")
    cli.add_model_args(p)
    p.add_argument("--out", help="adapter file to write (default: runs/<method>-<task>-seed<seed>.safetensors)")
    p.add_argument("--seed", type=cli.seed, default=T.seed)
    p.add_argument("--epochs", type=int, default=T.epochs)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (default: the epochs decide)")
    p.add_argument("--batch-size", type=int, help="default: 16 for under 10k training examples, else 128")
    p.add_argument("--micro-batch", type=int, help="examples per forward pass; gradients are accumulated "
                   "up to --batch-size (default: the whole batch)")
    p.add_argument("--lr", type=cli.finite, default=T.lr)
    p.add_argument("--arch-lr", type=cli.finite, default=T.arch_lr, help="peak lr of rational activations (PEDRO, IAPT), "
                   "trained on dev batches (bi-level) with the same warm-up and decay")
    p.add_argument("--max-grad-norm", type=cli.finite, default=T.max_grad_norm,
                   help="clip gradients to this global norm (0: off)")
    p.add_argument("--max-len", type=int, default=T.max_len, help="tokens per example; longer prompts lose their "
                   "start (the response is kept whole) and are counted in the report")
    p.add_argument("--warmup", type=cli.finite, default=T.warmup, help="warm-up fraction of the steps")
    p.add_argument("--eval-every", type=int,
                   help="steps between dev evaluations (default: 200, or one epoch if shorter)")
    p.add_argument("--patience", type=int, default=T.patience,
                   help="stop after this many evaluations without a lower dev loss (or better metric, --select metric)")
    p.add_argument("--select", default=T.select, help="what picks the best checkpoint and stops early: dev "
                   "loss (the papers') or the dev metric (metric)")
    p.add_argument("--eval-beams", type=int, default=T.eval_beams)
    p.add_argument("--eval-batch", type=int, default=T.eval_batch, help="prompts decoded together in evaluation")
    p.add_argument("--max-eval", type=int, help="evaluate at most this many dev/test examples (default: all)")
    p.add_argument("--max-test", type=int, help="evaluate at most this many test examples, 0 for all "
                   "(default: as --max-eval)")
    p.add_argument("--max-new-tokens", type=int, help="evaluation length (default: the longest train/dev response)")
    p.add_argument("--template", default="auto", help="llama2 | gemma | chatml | llama3 | none | auto (default: the family's chat "
                   "template when the model ships one, else none, as generate.py chooses)")
    p.add_argument("--data-dir", help="folder with the task's files (COPA, RTE, SST-2 and GSM8K ship with minipara)")
    p.add_argument("--train", help="custom task: train jsonl of {prompt, response}")
    p.add_argument("--dev", help="custom task: dev jsonl")
    p.add_argument("--test", help="custom task: test jsonl (default: the dev file)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output and its checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from <out stem>.ckpt")
    p.add_argument("--shard-base", action="store_true", help="under torchrun: shard the frozen base over the "
                   "ranks (FSDP2), for bases that do not fit one GPU; the adapter stays replicated (without "
                   "torchrun: no effect)")
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
    """A command-line string as the type of config field f (judged by its default)."""
    default = f.default if f.default is not MISSING else f.default_factory()
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            return tuple(x.strip() for x in text.split(",") if x.strip())
        if isinstance(default, (int, float)):
            return type(default)(text)
        if default is None and "int" in str(f.type):
            return int(text)
        if default is None and "float" in str(f.type):
            return float(text)
        return text
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(default), "a number")
        raise UserError(f"{flag} needs {kind}, got {text!r}") from None


def method_config(a, cls):
    """The chosen method's config from the method options given; others are refused."""
    own = {f.name: f for f in fields(cls.config_cls)}
    opts = {}
    for key, value in vars(a).items():
        if not key.startswith("m_") or value is None:
            continue
        name, flag = key[2:], "--" + key[2:].replace("_", "-")
        target = name if name in own else next((t for t in ALIASES.get(name, ()) if t in own), None)
        if target is None:
            have = ", ".join("--" + n.replace("_", "-") for n in own) or "none"
            raise UserError(f"method {cls.method} has no option {flag}; its options: {have}")
        opts[target] = convert(value, own[target], flag)
    try:
        return cls.config_cls(**opts)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad {cls.method} options: {e}") from None


def outputs(a) -> dict:
    out = Path(a.out or f"runs/{a.method}-{a.task}-seed{a.seed}.safetensors")
    return {"out": out, "ckpt": out.with_suffix(".ckpt"), "log": out.with_suffix(".log.jsonl"),
            "report": out.with_suffix(".report.json")}


def check_outputs(a, files: dict, task):
    """Refuse, before any work: an output that is an input or another output, one that cannot be
    written, and overwriting a finished or interrupted run without --force."""
    from minipara.files import OutputLock, check_paths, check_writable
    if a.resume and a.force:
        raise UserError("--resume continues a run and --force starts over: give one of them")
    if a.resume and a.method == "none":
        raise UserError("--method none scores the bare model: there is nothing to resume")
    if files["out"].is_dir():
        raise UserError(f"--out {files['out']} is a directory: give a file name such as "
                        f"{files['out'] / 'adapter.safetensors'}")
    mine = {"report": files["report"]} if a.method == "none" else files
    inputs = {f"--{k}" if k in ("train", "dev", "test") else f"task's {k}": f
              for k, f in zip(("train", "dev", "test"), task.files)} if a.task == "custom" else \
        {f"task file {f.name}": f for f in task.files}
    if a.model is not None and Path(a.model).is_dir():
        inputs.update({f"model's {f.name}": f for f in Path(a.model).iterdir() if f.is_file()})
    named = {("--out" if k == "out" else f"the {k} file"): f for k, f in mine.items()}
    named["the lock file"] = OutputLock(files["out"]).path
    check_paths(named, inputs)
    for k, f in mine.items():
        check_writable(f, f"the {k} file")
    existing = [str(f) for k, f in mine.items() if k in ("out", "ckpt", "report") and f.exists()]
    if existing and not (a.force or a.resume):
        raise UserError(f"{existing[0]} exists; pass --force to overwrite it"
                        + (", --resume to continue an interrupted run," if a.method != "none" else "")
                        + " or choose another --out")
    if a.resume and not files["ckpt"].is_file():
        raise UserError(f"--resume: no checkpoint {files['ckpt']} (it is written at the first evaluation "
                        "or when a run is interrupted)")


class Log:
    """The run's jsonl log, opened (for appending) at its first line: a run refused before
    then leaves no file behind."""

    def __init__(self, path: Path):
        self.path, self.file = path, None

    def __call__(self, event: dict):
        if self.file is None:
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(event) + "\n")
        self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()


def peak_memory(device) -> tuple[int, str]:
    if device.type == "cuda":
        import torch
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (getrusage)"


def main(argv=None):
    a = parser(method_fields()).parse_args(argv)
    from minipara import distributed
    ranks, a.device = distributed.init(a.device, a.shard_base)  # one process unless torchrun started this
    try:
        return run_on(a, ranks)
    finally:
        distributed.finish()


def run_on(a, ranks) -> int:
    from minipara.methods import method_class
    from minipara.tasks import load_task
    from minipara.tokenizer import TEMPLATES
    from minipara.training import TrainConfig

    # Everything that can be refused without the model is checked first.
    cls = config = None
    if a.method != "none":
        cls = method_class(a.method)
        config = method_config(a, cls)
        if a.shard_base and not cls.shardable:
            raise UserError(f"--shard-base: {a.method} runs the base's attention weights in its generators, "
                            "which a sharded base does not allow; train it without --shard-base")
    # The dev/test split of a task is fixed (seed 0), so every training seed sees the same test set.
    task = load_task(a.task, a.data_dir, seed=0, train=a.train, dev=a.dev, test=a.test)
    tcfg = TrainConfig(**{k: getattr(a, k) for k in TRAINING}).resolved(len(task.splits["train"]))
    if a.max_eval is not None and a.max_eval < 1:
        raise UserError("--max-eval must be at least 1")
    if a.max_test is not None and a.max_test < 0:
        raise UserError("--max-test must be at least 0 (0: the whole test split)")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {a.max_new_tokens}); leave it out for the "
                        "longest train/dev response")
    if a.template not in TEMPLATES + ("auto",):
        raise UserError(f"unknown template {a.template!r}; valid: {', '.join(TEMPLATES)}, auto")
    if a.out == "":
        raise UserError("--out is empty: give the adapter file to write (or leave --out out for the default)")
    files = outputs(a)
    check_outputs(a, files, task)
    ranks.barrier()  # every rank has checked before rank 0 writes anything
    if not ranks.main:  # rank 0 alone writes files, so it alone holds the lock
        return run_locked(a, ranks, cls, config, task, tcfg, files)
    from minipara.files import OutputLock
    with OutputLock(files["out"]):
        return run_locked(a, ranks, cls, config, task, tcfg, files)


def run_locked(a, ranks, cls, config, task, tcfg, files) -> int:
    """The run itself (on rank 0, holding the output's lock)."""
    from minipara.tokenizer import resolve_template
    from minipara.training import prepare_task
    model, tok, path = cli.load(a, shard=ranks.lockstep)
    template = resolve_template(a.template, model.args.model_type, path)
    if a.method == "none":
        data = prepare_task(task, tok, template, a.max_eval, a.max_new_tokens, a.max_test)
        return score_bare_model(a, model, task, data, tcfg, files, str(path), template, ranks)
    import torch
    torch.manual_seed(a.seed)  # the adapter's initial values come from the seed too
    try:
        adapter = cls(config, model.args)
    except ValueError as e:
        raise UserError(f"cannot build the {cls.method} adapter: {e}") from None
    adapter.to(model.tok_embeddings.weight.device)
    data = prepare_task(task, tok, template, a.max_eval, a.max_new_tokens, a.max_test)
    if not ranks.main:  # rank 0 alone writes files and prints
        return train_and_report(a, model, adapter, task, data, tcfg, files, lambda event: None, str(path),
                                template, ranks)
    log = Log(files["log"])
    try:
        return train_and_report(a, model, adapter, task, data, tcfg, files, log, str(path), template, ranks)
    finally:
        log.close()


def command_argv() -> list[str]:
    """The command line as typed (interpreter included), for reports and the resume hint."""
    return getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]


def score_bare_model(a, model, task, data, tcfg, files, model_path, template, ranks) -> int:
    """The reference point of a task's table: the untrained model, decoded as training evaluates."""
    from minipara.training import evaluate, fit_eval
    _, _, dev_eval, test_eval = data
    (dev_eval, n_dev), (test_eval, n_test) = (fit_eval(ev, tcfg.max_len, s) for ev, s in
                                              ((dev_eval, "dev"), (test_eval, "test")))
    t = time.time()
    scores = {split: evaluate(model, None, ev, tcfg.eval_beams, tcfg.eval_batch, ranks=ranks)
              for split, ev in (("dev", dev_eval), ("test", test_eval))}
    if not ranks.main:
        return 0
    report = {"method": "none", "task": a.task, "model": model_path, "template": template, **scores,
              "eval_examples": {"dev": len(dev_eval.prompts), "test": len(test_eval.prompts)},
              "cut_examples": {"dev_eval": n_dev, "test": n_test},
              "wall_time_s": round(time.time() - t, 2), "command": shlex.join(command_argv())}
    write_report(files["report"], report)
    return 0


def write_report(path: Path, report: dict):
    from minipara.files import atomic_write
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    print(json.dumps(report, indent=2))


def train_and_report(a, model, adapter, task, data, tcfg, files, log, model_path, template, ranks) -> int:
    from minipara.adapter_io import save_adapter
    from minipara.training import Progress, Trainer, check_eval, evaluate, fit_eval
    train, dev, dev_eval, test_eval = data
    test_eval, n_test_cut = fit_eval(test_eval, tcfg.max_len, "test")
    check_eval(test_eval, "test", model.args.max_seq_len, adapter.n_prefix)  # before hours of training

    def save(ad):
        save_adapter(files["out"], ad, model.args, template, model.weights_id)
    trainer = Trainer(model, adapter, train, dev, dev_eval, tcfg, ckpt_path=files["ckpt"], log=log,
                      on_best=save, progress=Progress(), ranks=ranks)
    argv = command_argv()
    if ranks.world > 1:  # each rank was started as `python -u train.py ...`: report what the user typed
        argv = ["torchrun", "--nproc-per-node", str(ranks.world), *sys.argv]
    command = shlex.join(argv)
    n_params = sum(p.numel() for p in adapter.parameters())
    if a.resume:
        trainer.resume()
    else:
        if a.force and ranks.main:  # every check has passed: only now is the old run given up
            for f in files.values():
                f.unlink(missing_ok=True)
        log({"event": "start", "command": command, "method": adapter.method, "task": a.task, "model": model_path,
             "template": template, "trainable_params": n_params, "total_steps": trainer.total,
             "train_examples": len(train), "dev_examples": len(dev), "config": vars(trainer.cfg),
             "cut_examples": {**trainer.cut, "test": n_test_cut}})
    cut = {**trainer.cut, "test": n_test_cut}
    if ranks.main:
        print(f"{adapter.method} on {a.task}: {n_params:,} trainable parameters, {len(train)} train / {len(dev)} "
              f"dev examples, {trainer.total} steps (batch {tcfg.batch_size}, micro-batch {tcfg.micro_batch}"
              + (f" per rank, {ranks.world} ranks" + (", base sharded" if ranks.lockstep else "")
                 if ranks.world > 1 else "") + f"), dev evaluation every {tcfg.eval_every} steps"
              + (f", resuming at step {trainer.state.step}" if a.resume else ""), file=sys.stderr)
        if any(cut.values()):
            print(f"prompts cut from the start to fit --max-len {tcfg.max_len}: "
                  + ", ".join(f"{n} {split}" for split, n in cut.items() if n), file=sys.stderr)

    def on_signal(signum, frame):
        if trainer.stop_reason is not None:
            raise KeyboardInterrupt  # a second signal: stop at once
        trainer.request_stop(signal.Signals(signum).name)
        if ranks.main:
            print(f"\n{signal.Signals(signum).name}: stopping after this step (again to abort without saving)...",
                  file=sys.stderr)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = trainer.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if result.status == "interrupted":
        if ranks.main:
            again = [x for x in argv if x != "--force"] + ([] if "--resume" in argv else ["--resume"])
            print(f"interrupted at step {result.step}/{result.total_steps}; checkpoint saved to {files['ckpt']}.\n"
                  f"Resume with: {shlex.join(again)}" + (" (any number of processes)" if ranks.world > 1 else ""),
                  file=sys.stderr)
        return 128 + int(getattr(signal.Signals, trainer.stop_reason, signal.SIGINT))

    t_test = time.time()
    trainer.load_best()
    test = evaluate(model, adapter, test_eval, tcfg.eval_beams, tcfg.eval_batch, trainer.decoder, ranks)
    if not ranks.main:
        return 0
    save(adapter)  # again: a resumed finished run whose adapter file was deleted gets it back
    peak, peak_kind = peak_memory(model.tok_embeddings.weight.device)
    primary = next(iter(test))
    report = {"method": adapter.method, "task": a.task, "model": model_path, "template": template, "seed": a.seed,
              "out": str(files["out"]), "test_metric": {primary: test[primary]}, "test": test,
              "dev_metric_best": {task.metric_name: result.best_metric}, "dev_best": result.best_dev,
              "dev_loss_best": result.best_dev_loss, "selected_by": f"dev {tcfg.select}",
              "best_step": result.best_step, "lr": tcfg.lr, "batch_size": tcfg.batch_size,
              "cut_examples": cut, "trainable_params": n_params, "steps": result.step,
              "total_steps": result.total_steps, "stopped_by": result.stopped_by,
              # training (summed over resumed sessions) and the test evaluation; not model loading
              "wall_time_s": round(result.wall_time + time.time() - t_test, 2), "peak_memory_bytes": peak,
              "peak_memory_mb": round(peak / 2**20, 1), "peak_memory_kind": peak_kind,
              "eval_examples": {"dev": len(dev_eval.prompts), "test": len(test_eval.prompts)},
              "ranks": ranks.world, "sharded_base": ranks.lockstep, "command": command}
    log({"event": "end", **report})
    write_report(files["report"], report)
    return 0


if __name__ == "__main__":
    cli.run(main)
