"""The results command: runs every (method, seed) once, skips finished ones, tabulates."""

import json
import sys

import pytest

from minipara.train import results

# A stand-in for train.py: writes the report (and a log) train.py would write, from its arguments.
FAKE_TRAIN = r"""
import json, sys, time
a = sys.argv[1:]
arg = lambda k, d=None: a[len(a) - 1 - a[::-1].index(k) + 1] if k in a else d
method, seed, out = arg("--method"), int(arg("--seed")), arg("--out")
stem = out[:-len(".safetensors")]
with open(stem + ".calls", "a") as f:
    f.write(" ".join(a) + "\n")
if method == "bitfit":
    sys.exit(3)
acc = {"none": 0.5, "para": 0.9, "lora": 0.8, "pedro": 0.85}[method] + seed / 100
if method == "none":
    report = {"method": "none", "task": "sst2", "dev": {"accuracy": 0.5}, "test": {"accuracy": acc}, "wall_time_s": 2.0}
else:
    report = {"method": method, "task": "sst2", "seed": seed, "test_metric": {"accuracy": acc},
              "test": {"accuracy": acc}, "dev_metric_best": {"accuracy": acc - 0.05}, "dev_loss_best": 0.3 - seed / 100,
              "trainable_params": 1000, "lr": float(arg("--lr", "1e-4")), "steps": 40, "best_step": 20,
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
