"""A training run as `train.py` does it, from Python: options checked before anything is
written, output files, resume, torchrun ranks, the report.

    import minipara
    report = minipara.run("para", "copa", max_steps=40, r=4)   # runs/para-copa-seed0.safetensors
    print(report["test_metric"])

Writes <out> (the best adapter by dev loss, or by the dev metric with select="metric"),
<out stem>.ckpt (resumable checkpoint), <out stem>.log.jsonl (one line per evaluation) and
<out stem>.report.json (the report `run` returns), holding <out>.lock and <out stem>.ckpt.lock
meanwhile: one run per output and per stem. Every option, file and path is checked before the
first of these is written; an output never overwrites an input. SIGINT/SIGTERM (Ctrl-C) stop the run after the current
step with a checkpoint (`RunInterrupted`); `resume=True` continues it.

`LanguageModel.train` is the simple in-memory path (no files unless asked, no resume).
"""

import json
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from minipara import checks
from minipara.errors import UserError
from minipara.io.adapters import save_adapter
from minipara.io.checkpoints import load_pretrained, parse_device, parse_dtype
from minipara.io.files import OutputLock, atomic_write, check_output, check_paths, check_writable, remove_stale_temps
from minipara.io.tokenizer import TEMPLATES, resolve_template
from minipara.io.weights import model_dir
from minipara.methods import method_class
from minipara.train import distributed
from minipara.train.distributed import shard_layers
from minipara.train.tasks import load_task
from minipara.train.trainer import Progress, TrainConfig, Trainer, check_eval, evaluate, fit_eval, prepare_task

# Spellings from the papers for config fields whose names differ between methods.
ALIASES = {
    "rank": ("r",),
    "soft_tokens": ("soft_tokens", "l_sp", "n_soft"),
    "share_every": ("share_every", "l_s", "share"),
}


class RunInterrupted(Exception):
    """A run stopped by a signal (SIGINT, SIGTERM) after saving its checkpoint; run it again
    with resume=True to continue. `signal` is the signal's name, `rank`/`world` this
    process's place among torchrun's."""

    def __init__(self, signal_name: str, step: int, total_steps: int, checkpoint: Path, rank: int = 0, world: int = 1):
        super().__init__(
            f"{signal_name}: interrupted at step {step}/{total_steps}; checkpoint saved to {checkpoint}; "
            "run again with resume=True to continue"
        )
        self.signal, self.step, self.total_steps, self.checkpoint = signal_name, step, total_steps, checkpoint
        self.rank, self.world = rank, world


def option_field(method_cls, name: str):
    """The config field of `method_cls` that the method option `name` sets (a field name or
    one of its ALIASES); a name the method does not have is refused."""
    own = {f.name: f for f in fields(method_cls.config_cls)}
    target = name if name in own else next((t for t in ALIASES.get(name, ()) if t in own), None)
    if target is None:
        raise UserError(
            f"method {method_cls.method} has no option {name}; its options: {', '.join(own) or 'none'}", (name, *own)
        )
    return own[target]


def output_files(out, method: str, task: str, seed: int) -> dict:
    """The run's files: out (default runs/<method>-<task>-seed<seed>.safetensors), ckpt, log, report."""
    out = Path(out if out is not None else f"runs/{method}-{task}-seed{seed}.safetensors")
    return {
        "out": out,
        "ckpt": out.with_suffix(".ckpt"),
        "log": out.with_suffix(".log.jsonl"),
        "report": out.with_suffix(".report.json"),
    }


@dataclass
class RunOptions:
    """Everything that defines one training run (`run`'s arguments, as one object).

    method: para | pedro | parade | iapt | lora | ia3 | bitfit | ptuning_v2, or none (no
        training: score the bare model on dev and test, as a reference).
    task: copa | boolq | rte | sst2 | ... | custom (with train, dev and optionally test:
        jsonl files of {prompt, response}); data_dir: the folder of a task's files.
    out: the adapter file (default runs/<method>-<task>-seed<seed>.safetensors).
    model, dtype, device: as minipara.load.
    template: llama2 | gemma | chatml | llama3 | none | auto (the family's chat template when
        the model ships one, else none).
    max_eval / max_test: evaluate at most this many dev / test examples (max_test 0: all;
        default: as max_eval); max_new_tokens: evaluation length (default: the longest
        train/dev response).
    resume: continue from <out stem>.ckpt; force: overwrite an existing run's files.
    shard_base: under torchrun, shard the frozen base over the ranks (FSDP2).
    config / options: a TrainConfig and/or its fields by name (lr, max_steps, seed, ...), and
        the method's config fields (r, pooler, targets, input_norm, ...; see ALIASES).
    progress: print the run's summary and a progress bar on stderr.
    command: how the run was started, recorded in the log and report (default: the
        `minipara.run(...)` call that gives these options).
    """

    method: str
    task: str
    out: str | Path | None = None
    model: str | Path | None = None
    dtype: str = "float32"
    device: str = "cpu"
    template: str = "auto"
    data_dir: str | Path | None = None
    train: str | Path | None = None
    dev: str | Path | None = None
    test: str | Path | None = None
    max_eval: int | None = None
    max_test: int | None = None
    max_new_tokens: int | None = None
    resume: bool = False
    force: bool = False
    shard_base: bool = False
    config: object = None  # a TrainConfig
    progress: bool = True
    command: str | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        """The options' kinds, named as run() takes them (checked before anything is written)."""
        for name in ("method", "task", "dtype", "template"):
            checks.check(getattr(self, name), name, str)
        if not isinstance(self.device, (str, torch.device)):
            raise UserError(f"device must be cpu, cuda or cuda:N, got {checks.short(self.device)}", ("device",))
        for name in ("out", "model", "data_dir", "train", "dev", "test"):  # (an empty one: check_paths says so)
            checks.check_path(getattr(self, name), name, optional=True, empty=True)
        checks.check(self.max_eval, "max_eval", int, least=1, optional=True)
        checks.check(self.max_test, "max_test", int, least=0, optional=True)
        checks.check(self.max_new_tokens, "max_new_tokens", int, least=1, optional=True)
        for name in ("resume", "force", "shard_base", "progress"):
            checks.check(getattr(self, name), name, bool)
        if self.config is not None and not isinstance(self.config, TrainConfig):
            raise UserError(f"config must be a minipara.TrainConfig, got {checks.short(self.config)}", ("config",))

    def call(self) -> str:
        """The `minipara.run(...)` call that gives these options (the options left at their
        defaults left out)."""
        given = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("method", "task", "command", "options") and getattr(self, f.name) != f.default
        }
        args = [repr(self.method), repr(self.task)] + [f"{k}={v!r}" for k, v in {**given, **self.options}.items()]
        return "minipara.run(" + ", ".join(args) + ")"


def run(method: str, task: str, **options) -> dict | None:
    """Train a `method` adapter on `task` with the papers' recipe, evaluate it on test, and
    return the report (also written to <out stem>.report.json); see the module's docstring
    for the files. Under torchrun, data-parallel over the ranks: rank 0 writes the files and
    returns the report, the other ranks return None.

    The keywords are RunOptions' fields (out, model, device, template, resume, ...; see there),
    and any other is a training option (a TrainConfig field: lr, max_steps, seed, ...) or one
    of the method's config fields (r, pooler, input_norm, ...). `run_options(RunOptions(...))`
    does the same from one object.
    Raises UserError for anything a user can fix, RunInterrupted when a signal stopped it.
    """
    own = {f.name for f in fields(RunOptions)} - {"method", "task", "options"}
    return run_options(
        RunOptions(
            method,
            task,
            **{k: v for k, v in options.items() if k in own},
            options={k: v for k, v in options.items() if k not in own},
        )
    )


def run_options(opts: "RunOptions") -> dict | None:
    """`run` from a RunOptions."""
    if opts.command is None:
        opts = replace(opts, command=opts.call())
    r = _Run(opts)
    ranks, r.device = distributed.init(opts.device, opts.shard_base)  # one process unless torchrun started this
    try:
        report = r.run_on(ranks)
        ranks.barrier()  # every rank done with the group before any tears it down
        return report
    finally:
        distributed.finish()


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
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS (getrusage)"


def write_report(path: Path, report: dict):
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))


class _Run:
    """One run's options and the steps of `run`."""

    def __init__(self, opts: RunOptions):
        o = opts
        self.method, self.task_name, self.out, self.model, self.dtype = o.method, o.task, o.out, o.model, o.dtype
        self.template, self.data_dir, self.train, self.dev, self.test = o.template, o.data_dir, o.train, o.dev, o.test
        self.max_eval, self.max_test, self.max_new_tokens = o.max_eval, o.max_test, o.max_new_tokens
        self.resume, self.force, self.shard_base, self.progress = o.resume, o.force, o.shard_base, o.progress
        self.config, self.command, self.options, self.device = o.config, o.command, dict(o.options), None

    def say(self, ranks, text: str):
        if self.progress and ranks.main:
            print(text, file=sys.stderr)

    def run_on(self, ranks):
        # Every rank was started with the same settings (torchrun runs one command per rank, but
        # nothing stops a launcher from passing each its own), or all stop now.
        settings = {k: v for k, v in vars(self).items() if k not in ("progress", "command", "options", "device")}
        settings["task"] = settings.pop("task_name")
        ranks.agree({**settings, "config": self.config and asdict(self.config), **self.options})
        # Everything that can be refused without the model is checked first.
        train_names = {f.name for f in fields(TrainConfig)}
        training = {k: v for k, v in self.options.items() if k in train_names}
        method_opts = {k: v for k, v in self.options.items() if k not in train_names}
        cls = config = None
        if self.method == "none":
            if method_opts:
                raise UserError(
                    f"method none trains nothing: it has no option {next(iter(method_opts))}", tuple(method_opts)[:1]
                )
        else:
            cls = method_class(self.method)
            opts = {option_field(cls, k).name: v for k, v in method_opts.items()}
            try:
                config = cls.config_cls(**opts)
            except (TypeError, ValueError) as e:
                raise UserError(f"bad {cls.method} options: {e}") from None
            if self.shard_base and not cls.shardable:
                raise UserError(
                    f"shard_base: {self.method} runs the base's attention weights in its generators, "
                    "which a sharded base does not allow; train it without shard_base",
                    ("shard_base",),
                )
        # The dev/test split of a task is fixed (seed 0), so every training seed sees the same test set.
        task = load_task(self.task_name, self.data_dir, seed=0, train=self.train, dev=self.dev, test=self.test)
        tcfg = replace(self.config or TrainConfig(), **training).resolved(len(task.splits["train"]))
        if self.max_eval is not None and self.max_eval < 1:
            raise UserError("max_eval must be at least 1", ("max_eval",))
        if self.max_test is not None and self.max_test < 0:
            raise UserError("max_test must be at least 0 (0: the whole test split)", ("max_test",))
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise UserError(
                f"max_new_tokens must be at least 1 (got {self.max_new_tokens}); leave it out for the "
                "longest train/dev response",
                ("max_new_tokens",),
            )
        if self.template not in TEMPLATES + ("auto",):
            raise UserError(f"unknown template {self.template!r}; valid: {', '.join(TEMPLATES)}, auto")
        if self.out is not None and str(self.out) == "":
            raise UserError("out is empty: give the adapter file to write (or no name, for the default)", ("out",))
        files = output_files(self.out, self.method, self.task_name, tcfg.seed)
        self.check_outputs(files, task)
        ranks.barrier()  # every rank has checked before rank 0 writes anything
        if not ranks.main:  # rank 0 alone writes files, so it alone holds the lock
            return self.run_locked(ranks, cls, config, task, tcfg, files)
        # The checkpoint's lock too: outputs that differ only in suffix (a.safetensors, a.pt)
        # share their side files (a.ckpt, a.log.jsonl, a.report.json), so one of them runs at a time.
        with OutputLock(files["out"]), OutputLock(files["ckpt"]):
            for f in files.values():  # what a killed run of this output left half-written
                remove_stale_temps(f)
            return self.run_locked(ranks, cls, config, task, tcfg, files)

    def check_outputs(self, files: dict, task):
        """Refuse, before any work: an output that is an input or another output, one that cannot be
        written, and overwriting a finished or interrupted run without force."""
        if self.resume and self.force:
            raise UserError("resume continues a run and force starts over: give one of them", ("resume", "force"))
        if self.resume and self.method == "none":
            raise UserError("method none scores the bare model: there is nothing to resume", ("method",))
        if files["out"].is_dir():
            raise UserError(
                f"out {files['out']} is a directory: give a file name such as {files['out'] / 'adapter.safetensors'}",
                ("out",),
            )
        mine = {"report": files["report"]} if self.method == "none" else files
        inputs = (
            dict(zip(("train", "dev", "test"), task.files))
            if self.task_name == "custom"
            else {f"task file {f.name}": f for f in task.files}
        )
        model = model_dir(self.model)  # the default model's too
        if model is not None and model.is_dir():
            inputs.update({f"model's {f.name}": f for f in model.iterdir() if f.is_file()})
        named = {("out" if k == "out" else f"the {k} file"): f for k, f in mine.items()}
        named["the lock file"] = OutputLock(files["out"]).path
        named["the checkpoint's lock file"] = OutputLock(files["ckpt"]).path
        check_paths(named, inputs)
        for name, f in named.items():
            check_output(f, name, (), ("out",))  # no side file a directory, none in the package
        for k, f in mine.items():
            check_writable(f, f"the {k} file")
        existing = [str(f) for k, f in mine.items() if k in ("out", "ckpt", "report") and f.exists()]
        if existing and not (self.force or self.resume):
            raise UserError(
                f"{existing[0]} exists; pass force to overwrite it"
                + (", resume to continue an interrupted run," if self.method != "none" else "")
                + " or choose another out",
                ("force", "resume", "out"),
            )
        if self.resume and not files["ckpt"].is_file():
            raise UserError(
                f"resume: no checkpoint {files['ckpt']} (it is written at the first evaluation "
                "or when a run is interrupted)",
                ("resume",),
            )

    def run_locked(self, ranks, cls, config, task, tcfg, files):
        """The run itself (on rank 0, holding the output's lock)."""
        shard = None
        if ranks.lockstep:
            shard = shard_layers
        model, tok, path = load_pretrained(self.model, parse_dtype(self.dtype), parse_device(self.device), shard)
        template = resolve_template(self.template, model.args.model_type, path)
        if self.method == "none":
            data = prepare_task(task, tok, template, self.max_eval, self.max_new_tokens, self.max_test)
            return self.score_bare_model(model, data, tcfg, files, str(path), template, ranks)
        torch.manual_seed(tcfg.seed)  # the adapter's initial values come from the seed too
        try:
            adapter = cls(config, model.args)
        except ValueError as e:
            raise UserError(f"cannot build the {cls.method} adapter: {e}") from None
        adapter.to(model.tok_embeddings.weight.device)
        data = prepare_task(task, tok, template, self.max_eval, self.max_new_tokens, self.max_test)
        if not ranks.main:  # rank 0 alone writes files and prints
            return self.train_and_report(
                model, adapter, task, data, tcfg, files, lambda event: None, str(path), template, ranks
            )
        log = Log(files["log"])
        try:
            return self.train_and_report(model, adapter, task, data, tcfg, files, log, str(path), template, ranks)
        finally:
            log.close()

    def score_bare_model(self, model, data, tcfg, files, model_path, template, ranks):
        """The reference point of a task's table: the untrained model, decoded as training evaluates."""
        _, _, dev_eval, test_eval = data
        (dev_eval, n_dev), (test_eval, n_test) = (
            fit_eval(ev, tcfg.max_len, s) for ev, s in ((dev_eval, "dev"), (test_eval, "test"))
        )
        t = time.time()
        scores = {
            split: evaluate(model, None, ev, tcfg.eval_beams, tcfg.eval_batch, ranks=ranks)
            for split, ev in (("dev", dev_eval), ("test", test_eval))
        }
        if not ranks.main:
            return None
        report = {
            "method": "none",
            "task": self.task_name,
            "model": model_path,
            "template": template,
            **scores,
            "eval_examples": {"dev": len(dev_eval.prompts), "test": len(test_eval.prompts)},
            "cut_examples": {"dev_eval": n_dev, "test": n_test},
            "wall_time_s": round(time.time() - t, 2),
            "command": self.command,
        }
        write_report(files["report"], report)
        return report

    def train_and_report(self, model, adapter, task, data, tcfg, files, log, model_path, template, ranks):
        train, dev, dev_eval, test_eval = data
        test_eval, n_test_cut = fit_eval(test_eval, tcfg.max_len, "test")
        check_eval(test_eval, "test", model.args.max_seq_len, adapter.n_prefix)  # before hours of training

        def save(ad):
            save_adapter(files["out"], ad, model.args, template, model.weights_id)

        trainer = Trainer(
            model,
            adapter,
            train,
            dev,
            dev_eval,
            tcfg,
            ckpt_path=files["ckpt"],
            log=log,
            on_best=save,
            progress=Progress() if self.progress else None,
            ranks=ranks,
        )
        n_params = sum(p.numel() for p in adapter.parameters())
        if self.resume:
            trainer.resume()
        else:
            if self.force and ranks.main:  # every check has passed: only now is the old run given up
                for f in files.values():
                    f.unlink(missing_ok=True)
            log(
                {
                    "event": "start",
                    "command": self.command,
                    "method": adapter.method,
                    "task": self.task_name,
                    "model": model_path,
                    "template": template,
                    "trainable_params": n_params,
                    "total_steps": trainer.total,
                    "train_examples": len(train),
                    "dev_examples": len(dev),
                    "config": vars(trainer.cfg),
                    "cut_examples": {**trainer.cut, "test": n_test_cut},
                }
            )
        cut = {**trainer.cut, "test": n_test_cut}
        self.say(
            ranks,
            f"{adapter.method} on {self.task_name}: {n_params:,} trainable parameters, {len(train)} train / "
            f"{len(dev)} dev examples, {trainer.total} steps (batch {tcfg.batch_size}, micro-batch "
            f"{tcfg.micro_batch}"
            + (
                f" per rank, {ranks.world} ranks" + (", base sharded" if ranks.lockstep else "")
                if ranks.world > 1
                else ""
            )
            + f"), dev evaluation every {tcfg.eval_every} steps"
            + (f", resuming at step {trainer.state.step}" if self.resume else ""),
        )
        if any(cut.values()):
            self.say(
                ranks,
                f"prompts cut from the start to fit {tcfg.max_len} tokens per example: "
                + ", ".join(f"{n} {split}" for split, n in cut.items() if n),
            )

        result = self.train_with_signals(trainer, ranks)
        if result.status == "interrupted":
            raise RunInterrupted(
                trainer.stop_reason, result.step, result.total_steps, files["ckpt"], ranks.rank, ranks.world
            )

        t_test = time.time()
        trainer.load_best()
        test = evaluate(model, adapter, test_eval, tcfg.eval_beams, tcfg.eval_batch, trainer.decoder, ranks)
        if not ranks.main:
            return None
        save(adapter)  # again: a resumed finished run whose adapter file was deleted gets it back
        peak, peak_kind = peak_memory(model.tok_embeddings.weight.device)
        primary = next(iter(test))
        report = {
            "method": adapter.method,
            "task": self.task_name,
            "model": model_path,
            "template": template,
            "seed": tcfg.seed,
            "out": str(files["out"]),
            "test_metric": {primary: test[primary]},
            "test": test,
            "dev_metric_best": {task.metric_name: result.best_metric},
            "dev_best": result.best_dev,
            "dev_loss_best": result.best_dev_loss,
            "selected_by": f"dev {tcfg.select}",
            "best_step": result.best_step,
            "lr": tcfg.lr,
            "batch_size": tcfg.batch_size,
            "cut_examples": cut,
            "trainable_params": n_params,
            "steps": result.step,
            "total_steps": result.total_steps,
            "stopped_by": result.stopped_by,
            # training (summed over resumed sessions) and the test evaluation; not model loading
            "wall_time_s": round(result.wall_time + time.time() - t_test, 2),
            "peak_memory_bytes": peak,
            "peak_memory_mb": round(peak / 2**20, 1),
            "peak_memory_kind": peak_kind,
            "eval_examples": {"dev": len(dev_eval.prompts), "test": len(test_eval.prompts)},
            "ranks": ranks.world,
            "sharded_base": ranks.lockstep,
            "command": self.command,
        }
        log({"event": "end", **report})
        write_report(files["report"], report)
        return report

    def train_with_signals(self, trainer, ranks):
        """trainer.run(), where SIGINT/SIGTERM ask it to stop after the current step (with a
        checkpoint) and a second one stops at once. Signal handlers can only be set from the
        main thread; elsewhere the run is simply not interruptible this way."""
        if threading.current_thread() is not threading.main_thread():
            return trainer.run()

        def on_signal(signum, frame):
            if trainer.stop_reason is not None:
                raise KeyboardInterrupt  # a second signal: stop at once
            trainer.request_stop(signal.Signals(signum).name)
            if self.progress and ranks.main:
                print(
                    f"\n{signal.Signals(signum).name}: stopping after this step (again to abort without saving)...",
                    file=sys.stderr,
                )

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            return trainer.run()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
