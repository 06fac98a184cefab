"""Results tables: train every (method, seed) of a task with train.py, then tabulate.

    python -m minipara.train.results --task sst2 --methods none,para,lora --seeds 0,1,2 \\
        --lr-for ia3=3e-3,ptuning_v2=1e-2 --parallel 16 --dir results -- --max-steps 300 --max-eval 500
    python -m minipara.train.results --task sst2 --dir results --table-only --readme README.md

Each run is `train.py --method M --task T --seed S --out <dir>/<task>/<M>-seed<S>.safetensors`
plus the arguments after `--` (the caps every method shares) and the method's lr override.
A run whose report exists is skipped, so the command can be stopped and started again, or
launched in the background and collected later; an interrupted run resumes from its
checkpoint. `--parallel N` keeps N runs going at once (one small model does not fill a GPU).

Writes <dir>/<task>.md (the Markdown table: median and min-max over seeds of the test score,
the best dev score and dev loss, trainable parameters, lr, steps, time, commit), <dir>/<task>.json
(the rows and every run's report behind them) and <dir>/<task>-dev-loss.png (dev loss per
evaluation from the training logs; needs matplotlib, the `plot` extra). `--readme` replaces
the block between `<!-- results:<task> -->` and `<!-- /results:<task> -->` with the table.
"""

import argparse
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from minipara.errors import UserError
from minipara.methods import METHODS as ADAPTER_METHODS

ROOT = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = ROOT / "train.py"
METHODS = ("none", *ADAPTER_METHODS)  # none: the bare model, scored as a reference


def parse_lrs(text: str | None) -> dict[str, float]:
    """ "ia3=3e-3,ptuning_v2=1e-2" -> {"ia3": 0.003, "ptuning_v2": 0.01}."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        method, _, value = item.partition("=")
        try:
            out[method.strip()] = float(value)
        except ValueError:
            raise UserError(f"--lr-for needs method=lr pairs such as ia3=3e-3, got {item!r}") from None
    return out


def run_stem(folder: Path, method: str, seed: int) -> Path:
    return folder / f"{method}-seed{seed}"


def git_commit() -> str:
    """The checkout's commit (+dirty), or $MINIPARA_COMMIT where the copy has no git history."""
    if os.environ.get("MINIPARA_COMMIT"):
        return os.environ["MINIPARA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


def command_for(task: str, method: str, seed: int, folder: Path, lrs: dict, extra: list[str], resume: bool):
    stem = run_stem(folder, method, seed)
    cmd = [
        sys.executable,
        str(TRAIN_SCRIPT),
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
    if method in lrs:
        cmd += ["--lr", repr(lrs[method])]  # last: it wins over an --lr among the shared arguments
    if method != "none":
        cmd.append("--resume" if resume else "--force")
    return cmd


# Bi-level methods take a dev step besides every train step: started first, they do not
# leave one long run going alone at the end.
SLOW_FIRST = {"pedro": 0, "iapt": 0}


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
    todo = []
    for task in tasks:
        folder = base / task
        folder.mkdir(parents=True, exist_ok=True)
        for method in methods:
            for seed in seeds if method != "none" else seeds[:1]:  # the bare model has no seed
                stem = run_stem(folder, method, seed)
                if Path(str(stem) + ".report.json").is_file():
                    continue
                resume = Path(str(stem) + ".ckpt").is_file()
                todo.append((task, method, seed, command_for(task, method, seed, folder, lrs, extra, resume)))
    todo.sort(key=lambda t: SLOW_FIRST.get(t[1], 1))  # stable: otherwise in the order given
    print(f"{', '.join(tasks)}: {len(todo)} runs to do, {parallel} at a time, in {base}", file=sys.stderr)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    commit, where = git_commit(), machine()
    running, failed, done = [], [], 0
    t0 = time.time()

    # The runs get signals from this command only (each is started in its own session): a
    # terminal's Ctrl-C or a scheduler's group-wide SIGTERM reaches them once, forwarded,
    # since train.py takes a second signal as "abort without saving".
    def on_signal(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise _Stopped(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while todo or running:
            while todo and len(running) < parallel:
                task, method, seed, cmd = todo.pop(0)
                stem = run_stem(base / task, method, seed)
                Path(str(stem) + ".run.json").write_text(
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
                out = open(str(stem) + ".out", "w")
                running.append(
                    (
                        f"{task} {method} seed {seed}",
                        subprocess.Popen(
                            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
                        ),
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


# ---- the table ----------------------------------------------------------------------------------
def load_runs(folder: Path) -> list[dict]:
    """Every run of a task folder that has a report: its report, launch record and dev-loss curve."""
    runs = []
    for report_path in sorted(folder.glob("*.report.json")):
        stem = str(report_path)[: -len(".report.json")]
        report = json.loads(report_path.read_text())
        launch = Path(stem + ".run.json")
        report["launch"] = json.loads(launch.read_text()) if launch.is_file() else {}
        curve, log = [], Path(stem + ".log.jsonl")
        if log.is_file():
            for line in log.read_text().splitlines():
                event = json.loads(line)
                if event.get("event") == "start":
                    curve = []  # a --force restart: the last attempt's curve only
                elif event.get("event") == "eval":
                    curve.append((event["step"], event["dev_loss"]))
        report["dev_loss_curve"] = curve
        runs.append(report)
    return runs


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
        f"Every run: `train.py --task {task} {shared}` (per-method lr as listed; time: training and "
        "test evaluation, with other runs sharing the machine). Written by "
        f"`python -m minipara.train.results --task {task} --table-only`.\n"
    )
    return "\n".join(lines) + "\n" + note


def common_arguments(commands: list[str]) -> str:
    """The arguments every run's command shares, besides method, task, seed, out, lr and the
    resume flags: the caps of the table."""
    skip_value = {"--method", "--task", "--seed", "--out", "--lr"}
    per_run = []
    for c in commands:
        args, kept = shlex.split(c)[2:], []  # drop the interpreter and train.py
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


def write_outputs(task: str, base: Path, readme: Path | None) -> str:
    folder = base / task
    runs = load_runs(folder) if folder.is_dir() else []
    rows = summarise(runs)
    table = markdown(task, rows, runs)
    (base / f"{task}.md").write_text(table)
    (base / f"{task}.json").write_text(json.dumps({"task": task, "rows": rows, "runs": runs}, indent=1) + "\n")
    why = plot(task, runs, base / f"{task}-dev-loss.png")
    if why:
        print(why, file=sys.stderr)
    if readme is not None:
        replace_block(readme, task, table)
    return table


def replace_block(readme: Path, task: str, table: str):
    start, end = f"<!-- results:{task} -->", f"<!-- /results:{task} -->"
    text = readme.read_text()
    if start not in text or end not in text:
        raise UserError(f"{readme} has no block {start} ... {end} to put the {task} table in; add one")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}{end}{tail}")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    p = argparse.ArgumentParser(
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
    p.add_argument("--lr-for", help="per-method lr overrides, e.g. ia3=3e-3,ptuning_v2=1e-2")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for each run (CPU)")
    p.add_argument("--dir", default="results", help="where runs, tables and plots go")
    p.add_argument("--table-only", action="store_true", help="only (re)write the table from finished runs")
    p.add_argument("--readme", help="also put the table into this file's results block")
    a = p.parse_args(argv)
    base = Path(a.dir)
    tasks = [t for t in a.task.split(",") if t]
    failed = []
    if not a.table_only:
        methods = [m for m in a.methods.split(",") if m]
        try:
            seeds = [int(s) for s in a.seeds.split(",") if s]
        except ValueError:
            raise UserError(f"--seeds needs integers such as 0,1,2, got {a.seeds!r}") from None
        if not TRAIN_SCRIPT.is_file():
            raise UserError(f"{TRAIN_SCRIPT} is missing: run from a source checkout of minipara")
        if a.parallel < 1:
            raise UserError("--parallel must be at least 1")
        failed = run_all(tasks, methods, seeds, base.resolve(), parse_lrs(a.lr_for), extra, a.parallel, a.threads)
    for task in tasks:
        print(write_outputs(task, base, Path(a.readme) if a.readme else None))
    if failed:
        print(f"{len(failed)} runs failed: {', '.join(failed)} (their .out files say why)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
