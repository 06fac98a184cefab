"""Results tables: train every (method, seed) of a task with `minipara train`, then tabulate.

    python -m minipara.train.results --task sst2 --methods none,para,lora --seeds 0,1,2 \\
        --lr-for ia3=3e-3,ptuning_v2=1e-2 --parallel 16 --dir results -- --max-steps 300 --max-eval 500
    python -m minipara.train.results --task sst2 --dir results --table-only --readme docs/training.md

Each run is `python -m minipara train --method M --task T --seed S --out <dir>/<task>/<M>-seed<S>.safetensors`
plus the arguments after `--` (the caps every method shares) and the method's lr override.
A run whose report exists is skipped, so the command can be stopped and started again, or
launched in the background and collected later; an interrupted run resumes from its
checkpoint. `--parallel N` keeps N runs going at once (one small model does not fill a GPU).

`--lr-grid` chooses each method's peak lr by dev loss first (docs/methods.md, "Training"):
every rate of the grid (1e-4, 3e-4, 1e-3, plus the method's own paper's rate where it has
one, and its --lr-for rate) runs on the grid seeds (--grid-seeds, default the first of
--seeds) into <dir>/<task>/lr-grid/; the rate with the lowest dev loss (mean over
the grid seeds; a rate with a failed or diverged run is never chosen; test scores play no part)
is the method's, its grid runs become the table's runs of those seeds, and the other seeds run
at it. The grid's dev losses and the choice go beside the table (<task>.md, and "lr_grid" in
<task>.json), also when --table-only rewrites it.

    python -m minipara.train.results --task sst2 --seeds 0,1,2,3,4 --lr-grid --parallel 16 -- --max-steps 150

A run whose report, log or launch record is damaged or incomplete (half-written, not UTF-8,
not a JSON object, a field missing, a NaN) is left out of the table as a failed run, named on
stderr and under "left_out" in the JSON; the exit status is then 1.

Writes <dir>/<task>.md (the Markdown table: median and min-max over seeds of the test score,
the best dev score and dev loss, trainable parameters, lr, steps, time, commit), <dir>/<task>.json
(the rows and every run's report behind them) and <dir>/<task>-dev-loss.png (dev loss per
evaluation from the training logs; needs matplotlib, the `plot` extra). `--readme` replaces
the block between `<!-- results:<task> -->` and `<!-- /results:<task> -->` with the table
(`--block` names it otherwise, e.g. `--block {task}-rms` for a second table of one task).
"""

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from minipara import cli
from minipara.errors import UserError
from minipara.methods import METHODS as ADAPTER_METHODS

ROOT = Path(__file__).resolve().parents[2]
# How a run is started: the library's own command, so that it works wherever minipara is
# installed, not only in a source checkout (tests put a stand-in here).
TRAIN_COMMAND = [sys.executable, "-m", "minipara", "train"]
METHODS = ("none", *ADAPTER_METHODS)  # none: the bare model, scored as a reference


def parse_lrs(text: str | None) -> dict[str, float]:
    """ "ia3=3e-3,ptuning_v2=1e-2" -> {"ia3": 0.003, "ptuning_v2": 0.01}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        method, _, value = item.partition("=")
        method = method.strip()
        try:
            lr = float(value)
        except ValueError:
            raise UserError(f"--lr-for needs method=lr pairs such as ia3=3e-3, got {item!r}") from None
        if method not in METHODS or method == "none":
            raise UserError(f"--lr-for: unknown method {method!r}; choose among {', '.join(METHODS[1:])}")
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lr-for: {method}'s lr must be a positive number, got {value!r}")
        out[method] = lr
    return out


def parse_rates(text: str) -> list[float]:
    """ "1e-4,3e-4,1e-3" -> [0.0001, 0.0003, 0.001] (positive, finite, sorted, once each)."""
    rates = set()
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            lr = float(item)
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise UserError(f"--lr-grid needs positive learning rates such as 1e-4,3e-4,1e-3, got {item!r}")
        rates.add(lr)
    if not rates:
        raise UserError("--lr-grid needs at least one learning rate")
    return sorted(rates)


def parse_seeds(text: str, flag: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"{flag} needs integers such as 0,1,2, got {text!r}") from None
    if not seeds:
        raise UserError(f"{flag} needs at least one seed")
    if any(not 0 <= s <= cli.SEED_MAX for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"{flag} needs distinct seeds between 0 and {cli.SEED_MAX}, got {text!r}")
    return seeds


# The learning-rate grid (docs/methods.md, "Training"): these rates for
# every method, plus the rate of the method's own paper where it has one: (IA)^3's paper trains
# at 3e-3, P-tuning v2's at 5e-3 to 1e-2. The prompt-aware methods' papers use 1e-4, in the grid.
LR_GRID = (1e-4, 3e-4, 1e-3)
PAPER_LR = {"ia3": 3e-3, "ptuning_v2": 1e-2}
GRID_FOLDER = "lr-grid"  # <dir>/<task>/lr-grid/<method>-lr<lr>-seed<seed>.*: the grid's runs


GRID_RUN = re.compile(r"(.+)-lr([0-9.e+-]+)-seed([0-9]+)")  # grid_stem's names


def grid_for(method: str, rates: list[float], lrs: dict) -> list[float]:
    """The rates a method's grid runs: the grid's, its paper's and its --lr-for rate."""
    return sorted(
        {*rates, *([PAPER_LR[method]] if method in PAPER_LR else []), *([lrs[method]] if method in lrs else [])}
    )


def run_stem(folder: Path, method: str, seed: int) -> Path:
    return folder / f"{method}-seed{seed}"


def grid_stem(folder: Path, method: str, lr: float, seed: int) -> Path:
    return folder / GRID_FOLDER / f"{method}-lr{lr:g}-seed{seed}"


def git_commit() -> str:
    """The checkout's commit (+dirty), or $MINIPARA_COMMIT where the copy has no git history."""
    if os.environ.get("MINIPARA_COMMIT"):
        return os.environ["MINIPARA_COMMIT"]
    if not (ROOT / ".git").exists():  # an installed minipara: not the history of whatever folder holds it
        return "unknown"
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def command_for(task: str, method: str, seed: int, stem: Path, lr: float | None, extra: list[str], resume: bool):
    cmd = [
        *TRAIN_COMMAND,
        "--method",
        method,
        "--task",
        task,
        "--seed",
        str(seed),
        "--out",
        str(stem) + ".safetensors",
        *extra,
    ]
    if lr is not None:
        cmd += ["--lr", repr(lr)]  # last: it wins over an --lr among the shared arguments
    if method != "none":
        cmd.append("--resume" if resume else "--force")
    return cmd


# Bi-level methods take a dev step besides every train step: started first, they do not
# leave one long run going alone at the end.
SLOW_FIRST = {"pedro": 0, "iapt": 0}


@dataclass
class Job:
    """One training run to make: its name in messages, task, method, seed, the stem of its
    files and its lr (None: the shared arguments' or the default)."""

    name: str
    task: str
    method: str
    seed: int
    stem: Path
    lr: float | None


def table_jobs(tasks, methods, seeds, base: Path, lrs: dict) -> list[Job]:
    """Every (task, method, seed) of the tables; the bare model has no seed."""
    return [
        Job(f"{task} {method} seed {seed}", task, method, seed, run_stem(base / task, method, seed), lrs.get(method))
        for task in tasks
        for method in methods
        for seed in (seeds if method != "none" else seeds[:1])
    ]


def run_all(
    tasks: list[str],
    methods: list[str],
    seeds: list[int],
    base: Path,
    lrs: dict,
    extra: list[str],
    parallel: int,
    threads: int | None,
) -> list[str]:
    """Run every (task, method, seed) without a report, `parallel` at a time, slow methods
    first. Returns the failures."""
    return run_jobs(table_jobs(tasks, methods, seeds, base, lrs), base, extra, parallel, threads)


def run_jobs(jobs: list[Job], base: Path, extra: list[str], parallel: int, threads: int | None) -> list[str]:
    """Run every job without a report, `parallel` at a time, slow methods first. Returns the
    failures. (A report that is there but damaged is not run again: the table names it.)"""
    todo, failed = [], []
    for job in jobs:
        job.stem.parent.mkdir(parents=True, exist_ok=True)
        if Path(str(job.stem) + ".report.json").is_file():
            continue
        resume = Path(str(job.stem) + ".ckpt").is_file()
        todo.append((job, command_for(job.task, job.method, job.seed, job.stem, job.lr, extra, resume)))
    todo.sort(key=lambda t: SLOW_FIRST.get(t[0].method, 1))  # stable: otherwise in the order given
    tasks = list(dict.fromkeys(job.task for job in jobs))
    print(f"{', '.join(tasks)}: {len(todo)} runs to do, {parallel} at a time, in {base}", file=sys.stderr)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    commit, where = git_commit(), machine()
    running, done = [], 0
    t0 = time.time()

    # The runs get signals from this command only (each is started in its own session): a
    # terminal's Ctrl-C or a scheduler's group-wide SIGTERM reaches them once, forwarded,
    # since a training run takes a second signal as "abort without saving".
    def on_signal(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise _Stopped(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while todo or running:
            while todo and len(running) < parallel:
                job, cmd = todo.pop(0)
                Path(str(job.stem) + ".run.json").write_text(
                    json.dumps(
                        {
                            "command": shlex.join(cmd),
                            "commit": commit,
                            "machine": where,
                            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        },
                        indent=2,
                    )
                    + "\n"
                )
                out = open(str(job.stem) + ".out", "w")
                running.append(
                    (
                        job.name,
                        subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True),
                        out,
                    )
                )
            time.sleep(1)
            for item in list(running):
                name, proc, out = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                out.close()
                done += 1
                status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {out.name})"
                if proc.returncode != 0:
                    failed.append(name)
                print(
                    f"[{done} done, {len(running)} running, {len(todo)} waiting, {time.time() - t0:.0f} s] "
                    f"{name}: {status}",
                    file=sys.stderr,
                )
    except _Stopped as e:
        for _, proc, _ in running:  # each stops after its current step and saves a checkpoint
            proc.send_signal(e.args[0])
        for _, proc, out in running:
            proc.wait()
            out.close()
        raise UserError(
            f"interrupted: {len(running)} running run(s) saved their checkpoints and stopped, "
            f"{len(todo)} not started; the same command resumes them"
        ) from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return failed


class _Stopped(Exception):
    pass


# ---- the learning-rate grid ------------------------------------------------------------------
def run_grid(tasks, methods, seeds, grid_seeds, base: Path, rates, lrs, extra, parallel, threads) -> list[str]:
    """Choose each method's lr by dev loss, then run the table at it (docs/methods.md,
    "Training"): every rate of the method's grid on the grid seeds (and
    the bare model) first; then, for each method, the rate with the lowest dev loss (mean over
    the grid seeds; never test), whose grid runs become the table's runs of those seeds, and
    the other seeds run at it. Returns the failures."""
    jobs = [
        Job(f"{task} {m} lr {lr:g} seed {s}", task, m, s, grid_stem(base / task, m, lr, s), lr)
        for task in tasks
        for m in methods
        if m != "none"
        for lr in grid_for(m, rates, lrs)
        for s in grid_seeds
    ]
    failed = run_jobs(
        jobs + table_jobs(tasks, [m for m in methods if m == "none"], seeds, base, {}), base, extra, parallel, threads
    )
    rest = []
    for task in tasks:
        grid = grid_summary(base / task)
        for m in methods:
            if m == "none":
                continue
            chosen = grid.get(m, {}).get("chosen")
            if chosen is None:
                failed.append(f"{task} {m}: no lr of its grid gave a dev loss, so its seeds do not run")
                continue
            for seed in seeds:
                stem = run_stem(base / task, m, seed)
                done, _ = read_run(stem)
                if done is not None and done.get("lr") != chosen:
                    failed.append(
                        f"{task} {m} seed {seed}: its report is of lr {done.get('lr')}, the grid chose "
                        f"{chosen:g}; move {stem.name}.* away to run it at {chosen:g}"
                    )
                    continue
                if seed in grid_seeds and done is None and not Path(str(stem) + ".ckpt").is_file():
                    reuse(grid_stem(base / task, m, chosen, seed), stem)
                rest.append(Job(f"{task} {m} seed {seed}", task, m, seed, stem, chosen))
    return failed + run_jobs(rest, base, extra, parallel, threads)


REUSED = (".report.json", ".log.jsonl", ".safetensors", ".out")


def reuse(grid: Path, stem: Path):
    """Make the grid's run at the chosen rate the table's run of its seed: its files copied
    (the report last, so that a copy cut short leaves no report), its launch record noting where
    it came from."""
    if not Path(str(grid) + ".report.json").is_file():
        return
    for suffix in REUSED[1:]:
        if Path(str(grid) + suffix).is_file():
            shutil.copyfile(str(grid) + suffix, str(stem) + suffix)
    launch = {}
    try:
        launch = json.loads(Path(str(grid) + ".run.json").read_text())
    except (OSError, ValueError):
        pass
    launch = launch if isinstance(launch, dict) else {}
    Path(str(stem) + ".run.json").write_text(
        json.dumps({**launch, "reused_from": f"{GRID_FOLDER}/{grid.name}"}, indent=2) + "\n"
    )
    shutil.copyfile(str(grid) + ".report.json", str(stem) + ".report.json")


def grid_summary(folder: Path) -> dict:
    """{method: {"dev_loss": {lr: [dev loss per grid seed]}, "seeds": [...], "chosen": lr or None,
    "left_out": [...]}} from the grid's reports under folder: the chosen rate has the lowest mean
    of the runs' best dev losses over the grid seeds (ties: the smaller rate); a rate with a
    failed or diverged run, or fewer seeds than the others, is not chosen."""
    grid = folder / GRID_FOLDER
    runs, left_out = load_runs(grid) if grid.is_dir() else ([], [])
    out: dict = {}

    def entry(method):
        return out.setdefault(method, {"dev_loss": {}, "seeds": set(), "left_out": []})

    for r in runs:
        m = entry(r["method"])
        m["dev_loss"].setdefault(r["lr"], {})[r["seed"]] = r["dev_loss_best"]
        m["seeds"].add(r["seed"])
    # Runs started (a launch record) that left no usable report: failed, damaged or still running.
    reported = {f"{r['method']}-lr{r['lr']:g}-seed{r['seed']}" for r in runs}
    started = {p.name[: -len(".run.json")] for p in grid.glob("*.run.json")} if grid.is_dir() else set()
    damaged = dict(left_out)
    for name in sorted((started | set(damaged)) - reported):
        parts = GRID_RUN.fullmatch(name)
        if parts:
            method, lr, seed = parts[1], float(parts[2]), int(parts[3])
            m = entry(method)
            m["dev_loss"].setdefault(lr, {})[seed] = None
            m["seeds"].add(seed)
            m["left_out"].append([name, damaged.get(name, "no report: it failed, or is still running")])
    for m in out.values():
        seeds = sorted(m["seeds"])
        full = {
            lr: statistics.fmean(by_seed.values())
            for lr, by_seed in m["dev_loss"].items()
            if sorted(by_seed) == seeds and all(v is not None for v in by_seed.values())
        }
        m["chosen"] = min(full, key=lambda lr: (full[lr], lr)) if full else None
        m["mean"] = full
        m["dev_loss"] = {lr: [by_seed.get(s) for s in seeds] for lr, by_seed in sorted(m["dev_loss"].items())}
        m["seeds"] = seeds
    return out


def grid_markdown(task: str, grid: dict) -> str:
    """The grid's dev losses as a small table: one row per method, one column per rate."""
    rows = [(m, grid[m]) for m in sorted(grid, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m))]
    if not rows:
        return ""
    rates = sorted({lr for _, g in rows for lr in g["dev_loss"]})
    seeds = sorted({s for _, g in rows for s in g["seeds"]})
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |",
        "|---|" + "---|" * (len(rates) + 1),
    ]
    for m, g in rows:
        cells = []
        for lr in rates:
            if lr not in g["dev_loss"]:
                cells.append("")
            elif lr not in g["mean"]:
                cells.append("failed")
            else:
                cell = f"{g['mean'][lr]:.3f}"
                cells.append(f"**{cell}**" if lr == g["chosen"] else cell)
        chosen = f"{g['chosen']:g}" if g["chosen"] is not None else "none"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {chosen} |")
    note = (
        f"\n{task}, learning rate chosen by dev loss: the lowest dev loss of each grid run "
        f"(mean over seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}); the table's runs use the "
        "chosen rate, and its runs of these seeds are the grid's. Test scores play no part.\n"
    )
    return "\n".join(lines) + "\n" + note


# ---- reading runs -----------------------------------------------------------------------------
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scores(d, what: str, optional: bool = False) -> str | None:
    """Why d is not a {metric: score} record (scores finite; None allowed when optional)."""
    if not isinstance(d, dict) or not d:
        return f"{what} is missing or empty"
    for k, v in d.items():
        if not (_finite(v) or (optional and v is None)):
            return f"{what}[{k!r}] is {v!r}, not a finite number"
    return None


def check_report(report) -> str | None:
    """Why a report cannot go into a table (what an interrupted or broken run leaves), or None."""
    if not isinstance(report, dict):
        return f"the report is a JSON {type(report).__name__}, not an object"
    method = report.get("method")
    if not isinstance(method, str) or not method:
        return "the report names no method"
    checks = (
        [("test", "scores"), ("dev", "scores"), ("wall_time_s", "number")]
        if method == "none"
        else [
            ("seed", "int"),
            ("test_metric", "scores"),
            ("dev_metric_best", "optional scores"),
            ("dev_loss_best", "optional number"),
            ("trainable_params", "int"),
            ("lr", "number"),
            ("steps", "int"),
            ("wall_time_s", "number"),
        ]
    )
    for key, kind in checks:
        if key not in report:
            return f"the report has no {key}"
        v = report[key]
        if kind.endswith("scores"):
            why = _scores(v, key, optional=kind.startswith("optional"))
            if why:
                return why
        elif kind == "int" and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return f"{key} is {v!r}, not a count"
        elif kind.endswith("number") and not (_finite(v) or (kind.startswith("optional") and v is None)):
            return f"{key} is {v!r}, not a finite number" + (" (the run diverged?)" if key == "dev_loss_best" else "")
    if method == "none" and next(iter(report["test"])) not in report["dev"]:
        return "its dev and test scores name different metrics"
    return None


def _read_json(path: Path, what: str):
    """(value, None) or (None, why) for a JSON file that may be half-written or not text."""
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except UnicodeDecodeError:
        return None, f"its {what} is not UTF-8 text"
    except ValueError:
        return None, f"its {what} is not valid JSON (half-written?)"
    except OSError as e:
        return None, f"its {what} cannot be read ({e.strerror})"


def read_run(stem: Path) -> tuple[dict | None, str | None]:
    """A run's report with its launch record and dev-loss curve: (report, None), (None, why)
    when what it left is damaged (an interrupted or broken run), or (None, None) when it has no
    report."""
    report_path = Path(str(stem) + ".report.json")
    if not report_path.is_file():
        return None, None
    report, why = _read_json(report_path, "report")
    why = why or check_report(report)
    if why:
        return None, why
    launch_path = Path(str(stem) + ".run.json")
    launch = {}
    if launch_path.is_file():
        launch, why = _read_json(launch_path, "launch record (.run.json)")
        if why or not isinstance(launch, dict):
            return None, why or "its launch record (.run.json) is not a JSON object"
    curve, log = [], Path(str(stem) + ".log.jsonl")
    if log.is_file():
        try:
            lines = log.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            return None, "its log is not UTF-8 text"
        for n, line in enumerate(lines, 1):
            try:
                event = json.loads(line)
            except ValueError:
                return None, f"line {n} of its log is not valid JSON (half-written?)"
            if not isinstance(event, dict):
                return None, f"line {n} of its log is not a JSON object"
            if event.get("event") == "start":
                curve = []  # a --force restart: the last attempt's curve only
            elif event.get("event") == "eval":
                step, loss = event.get("step"), event.get("dev_loss")
                if not isinstance(step, int) or not _finite(loss):
                    return None, f"line {n} of its log has no step and finite dev_loss"
                curve.append((step, loss))
    report["launch"] = launch
    report["dev_loss_curve"] = curve
    return report, None


def load_runs(folder: Path) -> tuple[list[dict], list[list[str]]]:
    """Every run of a task folder that left a report: the good ones (report, launch record,
    dev-loss curve), and [run name, why] for those whose report, log or launch record is
    damaged or incomplete: those are left out, named."""
    runs, left_out = [], []
    for report_path in sorted(folder.glob("*.report.json")):
        stem = Path(str(report_path)[: -len(".report.json")])
        report, why = read_run(stem)
        if why:
            left_out.append([stem.name, why])
        else:
            runs.append(report)
    return runs, left_out


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    if min(values) == max(values):
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def summarise(runs: list[dict]) -> list[dict]:
    """One row per method (in METHODS order, then others), aggregated over seeds."""
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        by_method.setdefault(r["method"], []).append(r)
    order = sorted(by_method, key=lambda m: (METHODS.index(m) if m in METHODS else len(METHODS), m))
    rows = []
    for method in order:
        rs = sorted(by_method[method], key=lambda r: r.get("seed", 0))
        if method == "none":
            metric = next(iter(rs[0]["test"]))
            test = [r["test"][metric] for r in rs]
            dev = [r["dev"][metric] for r in rs]
            dev_loss, params, lr, steps, seconds = [], 0, None, [], [r["wall_time_s"] for r in rs]
        else:
            metric = next(iter(rs[0]["test_metric"]))
            test = [r["test_metric"][metric] for r in rs]
            dev = [v for r in rs for v in r["dev_metric_best"].values() if v is not None]
            dev_loss = [r["dev_loss_best"] for r in rs if r.get("dev_loss_best") is not None]
            params, lr = rs[0]["trainable_params"], rs[0].get("lr")
            steps, seconds = [r["steps"] for r in rs], [r["wall_time_s"] for r in rs]
        commits = sorted({r["launch"].get("commit", "unknown") for r in rs})
        rows.append(
            {
                "method": method,
                "metric": metric,
                "seeds": [r.get("seed") for r in rs],
                "test": test,
                "dev_best": dev,
                "dev_loss_best": dev_loss,
                "trainable_params": params,
                "lr": lr,
                "steps": steps,
                "best_step": [r.get("best_step") for r in rs],
                "time_s": seconds,
                "commit": ",".join(commits),
                "machine": sorted({r["launch"].get("machine", "?") for r in rs}),
            }
        )
    return rows


def markdown(task: str, rows: list[dict], runs: list[dict]) -> str:
    if not rows:
        return f"No finished runs for {task}.\n"
    metric = rows[0]["metric"]
    caps = sorted({r["launch"].get("command", "") for r in runs})
    machines = sorted({m for row in rows for m in row["machine"]})
    started = sorted(r["launch"].get("started", "") for r in runs if r["launch"].get("started"))
    lines = [
        f"| method | test {metric} median (min-max) | dev {metric} | dev loss | trainable params "
        "| lr | steps | time (s) | seeds | commit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lr = f"{row['lr']:g}" if row["lr"] is not None else "-"
        lines.append(
            f"| {row['method']} | {_spread(row['test'], 3)} | {_spread(row['dev_best'], 3)} | "
            f"{_spread(row['dev_loss_best'], 3)} | {row['trainable_params']:,} | {lr} | "
            f"{_spread(row['steps'], 0)} | {_spread(row['time_s'], 0)} | {len(row['test'])} | "
            f"{row['commit']} |"
        )
    shared = common_arguments(caps)
    note = (
        f"\n{task}: the checkpoint with the lowest dev loss, its test score, dev score and dev loss; "
        "median over seeds (min-max); the bare model is scored as it is. "
        f"Machine: {', '.join(machines)}; runs started {started[0][:10] if started else '?'}. "
        f"Every run: `{launcher(caps)} --task {task} {shared}` (per-method lr as listed; time: training and "
        "test evaluation, with other runs sharing the machine). Written by "
        f"`python -m minipara.train.results --task {task} --table-only`.\n"
    )
    return "\n".join(lines) + "\n" + note


def launcher(commands: list[str]) -> str:
    """How the runs were started, as the table's note names it: `train.py` (the script the
    results command ran before it ran the library's command) or `minipara train`."""
    old = any(Path(w).name == "train.py" for c in commands for w in shlex.split(c)[:2])
    return "train.py" if old else "minipara train"


def common_arguments(commands: list[str]) -> str:
    """The arguments every run's command shares, besides method, task, seed, out, lr and the
    resume flags: the caps of the table."""
    skip_value = {"--method", "--task", "--seed", "--out", "--lr"}
    per_run = []
    for c in commands:
        words = shlex.split(c)
        # drop what starts the run: `python train.py` (older reports) or `python -m minipara train`
        args, kept = words[next((j for j, w in enumerate(words) if w.startswith("--")), len(words)) :], []
        i = 0
        while i < len(args):
            if args[i] in skip_value:
                i += 2
                continue
            if args[i] not in ("--force", "--resume"):
                kept.append(args[i])
            i += 1
        per_run.append(shlex.join(kept))
    shared = sorted(set(per_run))
    return shared[0] if len(shared) == 1 else " / ".join(shared)


def plot(task: str, runs: list[dict], path: Path) -> str | None:
    """The dev-loss curves as a PNG; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'minipara[plot]'): no dev-loss plot written"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {}
    for r in sorted(runs, key=lambda r: (r["method"], r.get("seed", 0))):
        if not r["dev_loss_curve"]:
            continue
        steps, losses = zip(*r["dev_loss_curve"])
        m = r["method"]
        first = m not in colors
        (line,) = ax.plot(
            steps,
            losses,
            color=colors.get(m),
            alpha=0.8,
            linewidth=1.2,
            marker="o",
            markersize=3,
            label=m if first else None,
        )
        colors.setdefault(m, line.get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("dev loss (per response token)")
    ax.set_title(f"{task}: dev loss at each evaluation (one line per seed)")
    ax.set_yscale("log")
    if colors:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _metric(run: dict) -> str:
    return next(iter(run["test"] if run["method"] == "none" else run["test_metric"]))


def consistent(runs: list[dict], left_out: list) -> list[dict]:
    """The runs whose primary metric is the one the first run of their method reports; the
    others join left_out, named."""
    first: dict = {}
    keep = []
    for r in sorted(runs, key=lambda r: (r["method"], r.get("seed", 0))):
        m = first.setdefault(r["method"], _metric(r))
        if _metric(r) == m:
            keep.append(r)
        else:
            name = f"{r['method']}-seed{r.get('seed')}"
            left_out.append([name, f"it reports {_metric(r)!r} first, its method's other seeds {m!r}"])
    return [r for r in runs if any(r is k for k in keep)]


def left_out_note(task: str, left_out: list) -> str:
    if not left_out:
        return ""
    return (
        f"\nLeft out of the {task} table, as failed runs: "
        + "; ".join(f"{name} ({why})" for name, why in sorted(left_out))
        + ".\n"
    )


def write_outputs(task: str, base: Path, readme: Path | None, block: str = "{task}") -> tuple[str, list]:
    """Write the task's table, JSON and plot from its finished runs (and its lr grid's, if any),
    and the README block; returns the table and the runs left out as failed ([name, why])."""
    folder = base / task
    runs, left_out = load_runs(folder) if folder.is_dir() else ([], [])
    runs = consistent(runs, left_out)
    rows = summarise(runs)
    grid = grid_summary(folder) if folder.is_dir() else {}
    table = markdown(task, rows, runs) + left_out_note(task, left_out)
    if grid:
        table += "\n" + grid_markdown(task, grid)
        for m, g in grid.items():
            left_out += [[f"{GRID_FOLDER}/{name}", why] for name, why in g["left_out"]]
    (base / f"{task}.md").write_text(table)
    record = {"task": task, "rows": rows, "runs": runs}
    if grid:
        record["lr_grid"] = {
            m: {
                "chosen": g["chosen"],
                "seeds": g["seeds"],
                "dev_loss": {f"{lr:g}": v for lr, v in g["dev_loss"].items()},
                "mean_dev_loss": {f"{lr:g}": v for lr, v in g["mean"].items()},
            }
            for m, g in grid.items()
        }
    if left_out:
        record["left_out"] = [{"run": name, "why": why} for name, why in sorted(left_out)]
    # allow_nan=False: a NaN that got past the checks is a bug, never a value in the file
    (base / f"{task}.json").write_text(json.dumps(record, indent=1, allow_nan=False) + "\n")
    why = plot(task, runs, base / f"{task}-dev-loss.png")
    if why:
        print(why, file=sys.stderr)
    if readme is not None:
        replace_block(readme, block.format(task=task), table)
    return table, left_out


def block_markers(readme: Path, text: str, name: str) -> tuple[str, str]:
    """The start and end markers of block `name`, refused unless `text` (readme's) has both."""
    start, end = f"<!-- results:{name} -->", f"<!-- /results:{name} -->"
    if start not in text or end not in text:
        raise UserError(f"{readme} has no block {start} ... {end} to put the {name} table in; add one")
    return start, end


def replace_block(readme: Path, name: str, table: str):
    text = readme.read_text()
    start, end = block_markers(readme, text, name)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}{end}{tail}")


TASK_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_flags(a, base: Path, tasks: list[str]):
    """Refuse what would fail later, before any run starts."""
    if not tasks:
        raise UserError(f"--task needs at least one task name, got {a.task!r}")
    bad = next((t for t in tasks if not TASK_NAME.fullmatch(t)), None)
    if bad is not None:
        raise UserError(f"--task: {bad!r} is not a task name (letters, digits, _ . -)")
    if base.exists() and not base.is_dir():
        raise UserError(f"--dir {base} is a file, not a folder")
    for task in tasks:
        if (base / task).exists() and not (base / task).is_dir():
            raise UserError(f"{base / task} is a file: the {task} runs need that name as a folder")
    if a.readme is not None:
        readme = Path(a.readme)
        if not readme.is_file():
            raise UserError(
                f"--readme {readme} does not exist" if not readme.exists() else f"--readme {readme} is not a file"
            )
        try:
            text = readme.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--readme {readme} is not UTF-8 text") from None
        try:
            a.block.format(task="t")
        except (KeyError, IndexError, ValueError):
            raise UserError(f"--block {a.block!r}: only {{task}} may stand in braces, e.g. {{task}}-rms") from None
        if "{task}" not in a.block and len(tasks) > 1:
            raise UserError(f"--block {a.block!r} would put {len(tasks)} tables in one block: include {{task}}")
        for task in tasks:
            block_markers(readme, text, a.block.format(task=task))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    p = cli.Parser(
        prog="python -m minipara.train.results",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--task",
        required=True,
        help="a task, or several (comma-separated) sharing the arguments after --, run in one pool",
    )
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; none = the bare model")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument(
        "--lr-for",
        help="per-method lr overrides, e.g. ia3=3e-3,ptuning_v2=1e-2 (with --lr-grid: added to the method's grid)",
    )
    p.add_argument(
        "--lr-grid",
        nargs="?",
        const=",".join(f"{lr:g}" for lr in LR_GRID),
        metavar="RATES",
        help="choose each method's lr by dev loss: run each rate (default "
        + ",".join(f"{lr:g}" for lr in LR_GRID)
        + ", plus the method's paper rate: "
        + ", ".join(f"{m} {lr:g}" for m, lr in PAPER_LR.items())
        + ") on the grid seeds, keep the one with the lowest dev loss, run the other seeds at it",
    )
    p.add_argument("--grid-seeds", help="with --lr-grid: the seeds each rate runs (default: the first of --seeds)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for each run (CPU)")
    p.add_argument("--dir", default="results", help="where runs, tables and plots go")
    p.add_argument("--table-only", action="store_true", help="only (re)write the table from finished runs")
    p.add_argument("--readme", help="also put the table into this file's results block")
    p.add_argument(
        "--block",
        default="{task}",
        help="the name of --readme's block, between <!-- results:NAME --> and <!-- /results:NAME --> "
        "({task} stands for the task; default: the task)",
    )
    a = p.parse_args(argv)
    base = Path(a.dir)
    tasks = [t.strip() for t in a.task.split(",") if t.strip()]
    check_flags(a, base, tasks)
    failed = []
    if not a.table_only:
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        if not methods:
            raise UserError(f"--methods needs at least one method, got {a.methods!r}")
        unknown = next((m for m in methods if m not in METHODS), None)
        if unknown is not None:
            raise UserError(f"--methods: unknown method {unknown!r}; choose among {', '.join(METHODS)}")
        seeds = parse_seeds(a.seeds, "--seeds")
        if a.parallel < 1:
            raise UserError("--parallel must be at least 1")
        if a.threads is not None and a.threads < 1:
            raise UserError("--threads must be at least 1")
        lrs = parse_lrs(a.lr_for)
        if a.lr_grid is not None:
            rates = parse_rates(a.lr_grid)
            grid_seeds = parse_seeds(a.grid_seeds, "--grid-seeds") if a.grid_seeds else seeds[:1]
            failed = run_grid(
                tasks, methods, seeds, grid_seeds, base.resolve(), rates, lrs, extra, a.parallel, a.threads
            )
        else:
            if a.grid_seeds:
                raise UserError("--grid-seeds goes with --lr-grid")
            failed = run_all(tasks, methods, seeds, base.resolve(), lrs, extra, a.parallel, a.threads)
    left_out = []
    for task in tasks:
        table, bad = write_outputs(task, base, Path(a.readme) if a.readme else None, a.block)
        print(table)
        left_out += [f"{task} {name} ({why}; delete its .report.json to run it again)" for name, why in bad]
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)} (their .out files say why)", file=sys.stderr)
    if left_out:
        print(f"{len(left_out)} runs left out of the tables: {'; '.join(left_out)}", file=sys.stderr)
    return 1 if failed or left_out else 0


if __name__ == "__main__":
    cli.run(main)
