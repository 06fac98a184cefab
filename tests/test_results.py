"""The results command: runs every (method, seed) once, skips finished ones, tabulates."""

import json
import sys

import pytest

from minipara.train import results

# A stand-in for train.py: writes the report (and a log) train.py would write, from its arguments.
FAKE_TRAIN = r"""
import json, math, os, sys, time
a = sys.argv[1:]
arg = lambda k, d=None: a[len(a) - 1 - a[::-1].index(k) + 1] if k in a else d
method, seed, out = arg("--method"), int(arg("--seed")), arg("--out")
lr = float(arg("--lr", "1e-4"))
stem = out[:-len(".safetensors")]
with open(stem + ".calls", "a") as f:
    f.write(" ".join(a) + "\n")
if method == "bitfit":
    sys.exit(3)
# tuning.json beside this script (the lr-grid tests): {"best": {method: lr}, "nan": [[method, lr, seed]]}:
# the dev loss grows with the distance from the method's best rate, and the test score is best
# at 1e-4, so a grid that looked at test scores would choose 1e-4.
tuning_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning.json")
tuning = json.load(open(tuning_path)) if os.path.exists(tuning_path) else {"best": {}, "nan": []}
off = abs(math.log10(lr / tuning["best"][method])) if method in tuning["best"] else 0.0
acc = {"none": 0.5, "para": 0.9, "lora": 0.8, "pedro": 0.85, "ia3": 0.7}[method] + seed / 100
acc += 0.05 if tuning["best"] and lr == 1e-4 else 0.0
loss = 0.3 - seed / 100 + off
if [method, lr, seed] in tuning["nan"]:
    loss = float("nan")
if method == "none":
    report = {"method": "none", "task": "sst2", "dev": {"accuracy": 0.5}, "test": {"accuracy": acc}, "wall_time_s": 2.0}
else:
    report = {"method": method, "task": "sst2", "seed": seed, "test_metric": {"accuracy": acc},
              "test": {"accuracy": acc}, "dev_metric_best": {"accuracy": acc - 0.05}, "dev_loss_best": loss,
              "trainable_params": 1000, "lr": lr, "steps": 40, "best_step": 20,
              "wall_time_s": 10.0 + seed}
    with open(stem + ".log.jsonl", "w") as f:
        f.write(json.dumps({"event": "start"}) + "\n")
        for step, loss in ((20, 0.4), (40, 0.3)):
            f.write(json.dumps({"event": "eval", "step": step, "dev_loss": loss}) + "\n")
json.dump(report, open(stem + ".report.json", "w"))
"""


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    script = tmp_path / "stand_in_train.py"
    script.write_text(FAKE_TRAIN)
    monkeypatch.setattr(results, "TRAIN_COMMAND", [sys.executable, str(script)])
    return script


def test_runs_every_combination_once_and_tabulates(tmp_path, fake_train, capsys):
    base = tmp_path / "out"
    argv = [
        "--task",
        "sst2",
        "--methods",
        "none,para,lora,bitfit",
        "--seeds",
        "0,1,2",
        "--lr-for",
        "lora=3e-3",
        "--parallel",
        "3",
        "--dir",
        str(base),
        "--",
        "--max-steps",
        "40",
        "--lr",
        "1e-4",
    ]
    assert results.main(argv) == 1  # bitfit's runs fail, and say so
    assert "3 runs failed: sst2 bitfit seed 0, sst2 bitfit seed 1, sst2 bitfit seed 2" in capsys.readouterr().err
    calls = (base / "sst2/lora-seed1.calls").read_text().split()
    assert calls[-3:] == ["--lr", "0.003", "--force"] and "--max-steps" in calls  # the override wins (last)
    assert not (base / "sst2/none-seed1.calls").exists()  # the bare model has no seeds
    table = (base / "sst2.md").read_text()
    para = next(line for line in table.splitlines() if line.startswith("| para "))
    assert "| 0.910 (0.900-0.920) |" in para and "| 1,000 | 0.0001 | 40 |" in para
    lora = next(line for line in table.splitlines() if line.startswith("| lora "))
    assert "| 0.810 (0.800-0.820) |" in lora and "| 0.003 |" in lora
    assert table.index("| none ") < table.index("| para ") < table.index("| lora ")
    assert "`minipara train --task sst2 --max-steps 40`" in table  # the shared caps are stated
    rows = json.loads((base / "sst2.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "para", "lora"]
    assert rows[1]["test"] == [0.9, 0.91, 0.92] and rows[1]["dev_loss_best"] == pytest.approx([0.3, 0.29, 0.28])

    # A second call runs only what has no report (bitfit), and --table-only runs nothing.
    results.main(argv)
    assert len((base / "sst2/para-seed0.calls").read_text().splitlines()) == 1
    assert len((base / "sst2/bitfit-seed0.calls").read_text().splitlines()) == 2
    (base / "sst2.md").unlink()
    assert results.main(["--task", "sst2", "--dir", str(base), "--table-only"]) == 0
    assert (base / "sst2.md").read_text() == table
    assert len((base / "sst2/bitfit-seed0.calls").read_text().splitlines()) == 2


def test_several_tasks_share_one_pool_slow_methods_first(tmp_path, fake_train, capsys):
    base = tmp_path / "out"
    assert results.main(["--task", "sst2,rte", "--methods", "para,pedro", "--seeds", "0", "--dir", str(base)]) == 0
    done = [line.split("] ")[1] for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert done == ["sst2 pedro seed 0: ok", "rte pedro seed 0: ok", "sst2 para seed 0: ok", "rte para seed 0: ok"]
    assert (base / "sst2.md").is_file() and (base / "rte.md").is_file()


def test_an_interrupted_run_resumes(tmp_path, fake_train):
    folder = tmp_path / "out/copa"
    folder.mkdir(parents=True)
    (folder / "para-seed0.ckpt").write_bytes(b"")
    results.main(["--task", "copa", "--methods", "para", "--seeds", "0", "--dir", str(tmp_path / "out")])
    assert (folder / "para-seed0.calls").read_text().split()[-1] == "--resume"


def test_table_goes_into_the_readme_block(tmp_path, fake_train):
    base = tmp_path / "out"
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:sst2 -->\nold table\n<!-- /results:sst2 -->\nafter\n")
    results.main(["--task", "sst2", "--methods", "para", "--seeds", "0", "--dir", str(base), "--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and "| para | 0.900 |" in text and text.endswith("<!-- /results:sst2 -->\nafter\n")
    assert text.count("<!-- results:sst2 -->") == 1
    with pytest.raises(results.UserError, match="no block <!-- results:rte -->"):
        results.main(["--task", "rte", "--dir", str(base), "--table-only", "--readme", str(readme)])


def test_block_names_a_second_table_of_one_task(tmp_path, fake_train):
    """--block puts a task's table into another block, so one doc can hold two tables of a task."""
    base = tmp_path / "out"
    readme = tmp_path / "README.md"
    blocks = [
        f"<!-- results:{n} -->\n{t}\n<!-- /results:{n} -->\n" for n, t in (("sst2", "first"), ("sst2-rms", "2nd"))
    ]
    readme.write_text("".join(blocks))
    results.main(["--task", "sst2", "--methods", "para", "--seeds", "0", "--dir", str(base)])
    results.main(
        ["--task", "sst2", "--dir", str(base), "--table-only", "--readme", str(readme), "--block", "{task}-rms"]
    )
    text = readme.read_text()
    assert "first" in text and "2nd" not in text and text.index("| para | 0.900 |") > text.index("sst2-rms")


def test_bad_lr_override_is_refused():
    with pytest.raises(results.UserError, match="method=lr pairs"):
        results.parse_lrs("ia3:3e-3")


def test_runs_the_real_train_script_on_a_tiny_model(tmp_path):
    """End to end with train.py on a tiny LLaMA directory: one run, its report in the table."""
    from conftest import write_tiny_model_dir

    (tmp_path / "m").mkdir()
    model = write_tiny_model_dir(tmp_path / "m")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"the cat {w}", "response": w}) + "\n" for w in ["yes", "no", "red", "blue"] * 4)
    )
    argv = [
        "--task",
        "custom",
        "--methods",
        "none,bitfit",
        "--seeds",
        "0",
        "--dir",
        str(tmp_path / "out"),
        "--threads",
        "1",
        "--",
        "--model",
        str(model),
        "--train",
        str(data),
        "--dev",
        str(data),
        "--max-steps",
        "2",
        "--eval-every",
        "1",
        "--max-eval",
        "2",
        "--eval-beams",
        "1",
    ]
    assert results.main(argv) == 0, (tmp_path / "out/custom/bitfit-seed0.out").read_text()
    rows = json.loads((tmp_path / "out/custom.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["none", "bitfit"] and rows[1]["steps"] == [2]
    assert (
        rows[1]["commit"]
        and sys.executable in json.loads((tmp_path / "out/custom.json").read_text())["runs"][1]["launch"]["command"]
    )


SLOW_TRAIN = r"""
import os, signal, sys, time
a = sys.argv[1:]
stem = a[a.index("--out") + 1][:-len(".safetensors")]
signals = []  # as train.py: a first signal saves a checkpoint after the step, a second aborts
signal.signal(signal.SIGTERM, lambda signum, frame: signals.append(signum))
signal.signal(signal.SIGINT, lambda signum, frame: signals.append(signum))
open(stem + ".pid", "w").write(str(os.getpid()))
for _ in range(1200):
    time.sleep(0.05)
    if signals:
        time.sleep(1.0)  # the step finishing, while more signals may come
        if len(signals) > 1:
            sys.exit(137)  # aborted without saving
        open(stem + ".ckpt", "w").write("saved")
        sys.exit(130)
"""


def test_sigterm_stops_the_runs_with_their_checkpoints(tmp_path):
    """SIGTERM to the results command's whole process group, twice (as `timeout` sends it),
    reaches each run once, so they save their checkpoints, and the command waits for them:
    nothing is left running or lost."""
    import os
    import signal
    import subprocess
    import time

    script = tmp_path / "train.py"
    script.write_text(SLOW_TRAIN)
    base = tmp_path / "out"
    driver = (
        f"import sys; from pathlib import Path; from minipara import cli; from minipara.train import results; "
        f"results.TRAIN_COMMAND = [sys.executable, {str(script)!r}]; "
        f"cli.run(lambda: results.main(['--task', 'sst2', '--methods', 'para,lora', '--seeds', '0,1', "
        f"'--parallel', '2', '--dir', {str(base)!r}]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, text=True, start_new_session=True)
    pids = []
    for _ in range(200):
        pids = list((base / "sst2").glob("*.pid")) if (base / "sst2").is_dir() else []
        if len(pids) == 2 and all(p.read_text() for p in pids):
            break
        time.sleep(0.1)
    assert len(pids) == 2, proc.stderr.read() if proc.poll() is not None else "runs did not start"
    os.killpg(proc.pid, signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "interrupted" in err and "the same command resumes" in err, err
    assert sorted(p.name for p in (base / "sst2").glob("*.ckpt")) == ["para-seed0.ckpt", "para-seed1.ckpt"]
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)


# ---- the learning-rate grid (issue 29) ----------------------------------------------------------
def tune(script, best: dict, nan=()):
    (script.parent / "tuning.json").write_text(json.dumps({"best": best, "nan": [list(x) for x in nan]}))


def calls(path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.is_file() else []


def lr_of(call: list[str]) -> float:
    return float(call[len(call) - 1 - call[::-1].index("--lr") + 1])


def test_lr_grid_chooses_each_methods_rate_by_dev_loss_then_runs_the_seeds_at_it(tmp_path, fake_train, capsys):
    """Every rate of each method's grid ({1e-4, 3e-4, 1e-3}, plus (IA)^3's paper rate 3e-3) runs
    on seed 0; the lowest dev loss picks the rate (the test score, best at 1e-4 here, plays no
    part); seed 0's grid run at that rate is the table's seed 0, seeds 1 and 2 run at it; the
    grid's dev losses and the choice are written beside the table, and again from --table-only."""
    tune(fake_train, {"para": 1e-3, "lora": 3e-4, "ia3": 3e-3})
    base = tmp_path / "out"
    argv = ["--task", "sst2", "--methods", "none,para,lora,ia3", "--seeds", "0,1,2", "--lr-grid", "--dir", str(base)]
    assert results.main(argv + ["--", "--max-steps", "40"]) == 0, capsys.readouterr().err
    grid = base / "sst2" / "lr-grid"
    for method, rates in (
        ("para", [1e-4, 3e-4, 1e-3]),
        ("lora", [1e-4, 3e-4, 1e-3]),
        ("ia3", [1e-4, 3e-4, 1e-3, 3e-3]),
    ):
        runs = sorted(grid.glob(f"{method}-lr*-seed*.calls"))
        assert sorted(lr_of(calls(c)[0]) for c in runs) == rates and all(c.name.endswith("seed0.calls") for c in runs)
    record = json.loads((base / "sst2.json").read_text())
    chosen = {m: g["chosen"] for m, g in record["lr_grid"].items()}
    assert chosen == {"para": 1e-3, "lora": 3e-4, "ia3": 3e-3}
    assert record["lr_grid"]["para"]["dev_loss"] == {
        "0.0001": [1.3],
        "0.0003": [pytest.approx(0.3 + 0.5229, abs=1e-4)],
        "0.001": [0.3],
    }
    for method, lr in chosen.items():
        assert not (base / f"sst2/{method}-seed0.calls").exists()  # seed 0 is the grid's run, not run again
        assert json.loads((base / f"sst2/{method}-seed0.run.json").read_text())["reused_from"].startswith("lr-grid/")
        for seed in (1, 2):
            assert [lr_of(c) for c in calls(base / f"sst2/{method}-seed{seed}.calls")] == [lr]
    rows = {r["method"]: r for r in record["rows"]}
    assert rows["para"]["lr"] == 1e-3 and rows["para"]["seeds"] == [0, 1, 2] and rows["none"]["seeds"] == [None]
    table = (base / "sst2.md").read_text()
    assert "| para | lr 0.0001 | lr 0.0003 | lr 0.001 | lr 0.003 | chosen |" not in table  # one header for all
    assert "| method | lr 0.0001 | lr 0.0003 | lr 0.001 | lr 0.003 | chosen |" in table
    assert "| para | 1.300 | 0.823 | **0.300** |  | 0.001 |" in table
    assert "| ia3 | 1.777 | 1.300 | 0.777 | **0.300** | 0.003 |" in table
    assert "Test scores play no part" in table
    # Everything has its report now: the same command runs nothing, and --table-only writes the same.
    n = len(list(base.rglob("*.calls")))
    assert results.main(argv) == 0 and sum(len(calls(c)) for c in base.rglob("*.calls")) == n
    (base / "sst2.md").unlink()
    assert results.main(["--task", "sst2", "--dir", str(base), "--table-only"]) == 0
    assert (base / "sst2.md").read_text() == table


def test_lr_grid_on_several_seeds_never_chooses_a_rate_that_diverged(tmp_path, fake_train, capsys):
    """With --grid-seeds 0,1 each rate's dev loss is the mean over both; a rate where one seed's
    dev loss is NaN is not chosen, is marked failed in the grid's table, the run is named as
    left out, and no NaN reaches the table or its JSON."""
    tune(fake_train, {"para": 1e-3}, nan=[("para", 1e-3, 1)])
    base = tmp_path / "out"
    argv = ["--task", "sst2", "--methods", "para", "--seeds", "0,1,2", "--lr-grid", "1e-4,3e-4,1e-3"]
    assert results.main(argv + ["--grid-seeds", "0,1", "--dir", str(base)]) == 1
    err = capsys.readouterr().err
    assert "lr-grid/para-lr0.001-seed1 (dev_loss_best is nan, not a finite number (the run diverged?)" in err
    record = json.loads((base / "sst2.json").read_text())
    assert record["lr_grid"]["para"]["chosen"] == 3e-4 and record["lr_grid"]["para"]["seeds"] == [0, 1]
    table = (base / "sst2.md").read_text()
    assert "| para | 1.295 | **0.818** | failed | 0.0003 |" in table
    assert "nan" not in table.lower() and "NaN" not in (base / "sst2.json").read_text()
    assert [lr_of(c) for c in calls(base / "sst2/para-seed2.calls")] == [3e-4]
    assert not (base / "sst2/para-seed1.calls").exists()  # seeds 0 and 1: the grid's runs at 3e-4


def test_lr_grid_adds_lr_for_and_refuses_a_table_run_at_another_rate(tmp_path, fake_train, capsys):
    tune(fake_train, {"lora": 3e-2})
    base = tmp_path / "out"
    (base / "sst2").mkdir(parents=True)
    argv = ["--task", "sst2", "--methods", "lora", "--seeds", "0,1", "--lr-grid", "--lr-for", "lora=3e-2"]
    assert results.main(argv + ["--dir", str(base)]) == 0
    assert json.loads((base / "sst2.json").read_text())["lr_grid"]["lora"]["chosen"] == 3e-2
    # A table run made earlier at another rate is not mixed into the table: named, not rerun.
    for f in (base / "sst2").glob("lora-seed1.*"):
        f.unlink()
    report = json.loads((base / "sst2/lr-grid/lora-lr0.0001-seed0.report.json").read_text())
    (base / "sst2/lora-seed1.report.json").write_text(json.dumps({**report, "seed": 1}))
    assert results.main(argv + ["--dir", str(base)]) == 1
    assert "sst2 lora seed 1: its report is of lr 0.0001, the grid chose 0.03" in capsys.readouterr().err


# ---- refusals and damaged runs (issue 26) ---------------------------------------------------------
def refused(argv, capsys, *words, watch):
    """One `error:` line with words, status 2, before any run starts: no file under watch changes."""
    from minipara import cli

    before = sorted((str(p), p.stat().st_mtime_ns) for p in watch.rglob("*"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: results.main([str(x) for x in argv]))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], lines[0]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in watch.rglob("*")) == before


def _file(tmp):
    (tmp / "afile").write_text("x")
    return tmp / "afile"


def _readme_without_block(tmp):
    (tmp / "README.md").write_text("# no results blocks here\n")
    return tmp / "README.md"


def _task_folder_is_a_file(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "sst2").write_text("x")
    return tmp / "out"


RUN = ["--task", "sst2", "--methods", "para", "--seeds", "0"]
FLAG_CASES = {
    "dir is a file": (lambda t: RUN + ["--dir", _file(t)], ["afile is a file, not a folder"]),
    "dir is a file, table only": (
        lambda t: ["--task", "sst2", "--table-only", "--dir", _file(t)],
        ["is a file, not a folder"],
    ),
    "task folder is a file": (lambda t: RUN + ["--dir", _task_folder_is_a_file(t)], ["the sst2 runs need that name"]),
    "readme missing": (lambda t: RUN + ["--dir", t / "out", "--readme", t / "nope.md"], ["nope.md does not exist"]),
    "readme without the block": (
        lambda t: RUN + ["--dir", t / "out", "--readme", _readme_without_block(t)],
        ["has no block <!-- results:sst2 -->"],
    ),
    "block with a stray field": (
        lambda t: RUN + ["--dir", t / "out", "--readme", _readme_without_block(t), "--block", "{method}"],
        ["only {task} may stand in braces"],
    ),
    "one block for two tasks": (
        lambda t: ["--task", "sst2,rte", "--dir", t / "out", "--readme", _readme_without_block(t), "--block", "x"],
        ["would put 2 tables in one block"],
    ),
    "no task": (lambda t: ["--task", ",", "--dir", t / "out"], ["--task needs at least one task name"]),
    "task is a path": (lambda t: ["--task", "../up", "--dir", t / "out"], ["'../up' is not a task name"]),
    "no method": (lambda t: ["--task", "sst2", "--methods", ",", "--dir", t / "out"], ["--methods needs at least"]),
    "unknown method": (lambda t: ["--task", "sst2", "--methods", "para,nope", "--dir", t / "out"], ["'nope'"]),
    "no seed": (lambda t: ["--task", "sst2", "--seeds", ",", "--dir", t / "out"], ["--seeds needs at least one"]),
    "seed twice": (lambda t: ["--task", "sst2", "--seeds", "0,0", "--dir", t / "out"], ["distinct seeds"]),
    "lr for an unknown method": (lambda t: RUN + ["--lr-for", "nope=1e-3", "--dir", t / "out"], ["'nope'"]),
    "lr not a number": (lambda t: RUN + ["--lr-for", "para=nan", "--dir", t / "out"], ["a positive number"]),
    "grid rate zero": (lambda t: RUN + ["--lr-grid", "0,1e-3", "--dir", t / "out"], ["positive learning rates"]),
    "grid rate text": (lambda t: RUN + ["--lr-grid", "fast", "--dir", t / "out"], ["'fast'"]),
    "grid seeds alone": (lambda t: RUN + ["--grid-seeds", "0", "--dir", t / "out"], ["goes with --lr-grid"]),
    "threads zero": (lambda t: RUN + ["--threads", "0", "--dir", t / "out"], ["--threads must be at least 1"]),
    "parallel zero": (lambda t: RUN + ["--parallel", "0", "--dir", t / "out"], ["--parallel must be at least 1"]),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_flags_are_checked_before_any_run_starts(tmp_path, fake_train, capsys, case):
    argv, words = FLAG_CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    refused(argv(work), capsys, *words, watch=work)
    assert not list(work.rglob("*.calls"))


def _json_edit(change):
    def edit(path):
        report = json.loads(path.read_text())
        change(report)
        path.write_text(json.dumps(report))  # (json writes NaN and Infinity as Python reads them)

    return edit


def _half(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DAMAGE = {
    "report half-written": ("report.json", _half, "not valid JSON (half-written?)"),
    "report not UTF-8": ("report.json", lambda p: p.write_bytes(b'{"method": "\xff\xfe"}'), "not UTF-8"),
    "report is a list": ("report.json", lambda p: p.write_text("[1, 2]"), "a JSON list, not an object"),
    "report empty": ("report.json", lambda p: p.write_text(""), "not valid JSON"),
    "report without method": ("report.json", _json_edit(lambda r: r.pop("method")), "names no method"),
    "report without test score": ("report.json", _json_edit(lambda r: r.pop("test_metric")), "has no test_metric"),
    "test score NaN": (
        "report.json",
        _json_edit(lambda r: r.update(test_metric={"accuracy": float("nan")})),
        "test_metric['accuracy'] is nan",
    ),
    "dev loss NaN": (
        "report.json",
        _json_edit(lambda r: r.update(dev_loss_best=float("nan"))),
        "dev_loss_best is nan, not a finite number (the run diverged?)",
    ),
    "time infinite": ("report.json", _json_edit(lambda r: r.update(wall_time_s=float("inf"))), "wall_time_s is inf"),
    "steps a string": ("report.json", _json_edit(lambda r: r.update(steps="40")), "steps is '40', not a count"),
    "another metric": (
        "report.json",
        _json_edit(lambda r: r.update(test_metric={"f1": 0.5})),
        "it reports 'f1' first, its method's other seeds 'accuracy'",
    ),
    "log half-written": ("log.jsonl", _half, "of its log is not valid JSON (half-written?)"),
    "log not UTF-8": ("log.jsonl", lambda p: p.write_bytes(b"\xff\n"), "its log is not UTF-8 text"),
    "log eval NaN": (
        "log.jsonl",
        lambda p: p.write_text('{"event": "eval", "step": 20, "dev_loss": NaN}\n'),
        "line 1 of its log has no step and finite dev_loss",
    ),
    "log line a list": ("log.jsonl", lambda p: p.write_text("[]\n"), "line 1 of its log is not a JSON object"),
    "launch record half-written": ("run.json", _half, "its launch record (.run.json) is not valid JSON"),
    "launch record a list": (
        "run.json",
        lambda p: p.write_text("[]"),
        "launch record (.run.json) is not a JSON object",
    ),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_run_is_left_out_and_named_and_the_table_goes_on(tmp_path, fake_train, capsys, case):
    """What an interrupted or broken run leaves (a report, log or launch record cut short, not
    text, of the wrong shape, incomplete, or with a NaN) makes that run a failed one: left out of
    the table, named on stderr, in the JSON and under the table; the other runs are tabulated,
    and no NaN reaches the table or the JSON."""
    suffix, damage, words = DAMAGE[case]
    base = tmp_path / "out"
    assert results.main(["--task", "sst2", "--methods", "none,para,lora", "--seeds", "0,1", "--dir", str(base)]) == 0
    damage(base / f"sst2/para-seed1.{suffix}")
    capsys.readouterr()
    assert results.main(["--task", "sst2", "--dir", str(base), "--table-only"]) == 1
    err = capsys.readouterr().err
    assert "sst2 para-seed1 (" in err and words in err, err
    record = json.loads((base / "sst2.json").read_text())  # strict JSON: NaN would not parse here
    assert [x["run"] for x in record["left_out"]] == ["para-seed1"] and words in record["left_out"][0]["why"]
    rows = {r["method"]: r for r in record["rows"]}
    assert rows["para"]["seeds"] == [0] and rows["lora"]["seeds"] == [0, 1] and rows["none"]["seeds"] == [None]
    table = (base / "sst2.md").read_text()
    assert "| para | 0.900 |" in table and "Left out of the sst2 table, as failed runs: para-seed1 (" in table
    cells = " ".join(line for line in table.splitlines() if line.startswith("|")).lower()
    assert "nan" not in cells and "inf" not in cells  # (the note under the table names the NaN)


def test_a_damaged_run_does_not_stop_the_others(tmp_path, fake_train, capsys):
    """Running again with a damaged report among the finished ones: the missing runs still run,
    the damaged one is named (not run over), and the exit status says something failed."""
    base = tmp_path / "out"
    assert results.main(["--task", "sst2", "--methods", "para", "--seeds", "0,1", "--dir", str(base)]) == 0
    (base / "sst2/para-seed1.report.json").write_text('{"method": "para", "se')
    capsys.readouterr()
    assert results.main(["--task", "sst2", "--methods", "para", "--seeds", "0,1,2", "--dir", str(base)]) == 1
    err = capsys.readouterr().err
    assert "sst2 para seed 2: ok" in err and "para-seed1 (its report is not valid JSON (half-written?)" in err
    assert "delete its .report.json to run it again" in err
    assert len(calls(base / "sst2/para-seed1.calls")) == 1
    assert json.loads((base / "sst2.json").read_text())["rows"][0]["seeds"] == [0, 2]
