"""Training on several processes (minipara/distributed.py): 2 CPU processes over gloo.

Tolerance: N ranks compute the same sums as one process in another order (each rank sums
its micro-batches, then the all-reduce adds the ranks), so gradients differ by float32
rounding, ~1e-7 relative; AdamW divides by sqrt(v) and can enlarge such a difference
in a tensor whose gradient is near zero, so after a few steps the adapters are compared at
1e-5 absolute / 1e-4 relative, while the training lr (1e-2) moves them by ~1e-2 per step:
a rank that dropped or double-counted an example, or normalised by its own token count,
misses by far more (checked: normalising by each rank's own token count fails this test).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_model
from test_training import ENV, ROOT, adapter_for, evset, make, tiny_dir, train_cmd  # noqa: F401 (fixture)

from minipara.train.distributed import Ranks
from minipara.train.trainer import TrainConfig, Trainer

TOL = dict(atol=1e-5, rtol=1e-4)
CFG = dict(lr=1e-2, arch_lr=1e-3, max_steps=7, batch_size=6, micro_batch=2, eval_every=3, patience=100, seed=3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(method: str, ranks: Ranks, shard: bool = False):
    """A few steps on the tiny LLaMA: batch 6 over 2 ranks, shares of 3 (micro-batches of 2 and 1); the
    5th batch, the last of an epoch of 25, has 1 example: one rank has none. PEDRO adds the
    bi-level dev steps (dev batches of 6 from 9 examples: 6, then 3)."""
    model = tiny_model("llama")
    if shard:
        from minipara.train.distributed import shard_layers

        model = shard_layers(model)
    ad = adapter_for(method, model)
    dev = make(9, 2)
    tr = Trainer(model, ad, make(25, 1), dev, evset(dev), TrainConfig(**CFG), ranks=ranks)
    res = tr.run()
    return {k: v.detach().clone() for k, v in ad.state_dict().items()}, res.history


def worker(rank: int, world: int, port: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got = {
            "pedro": train("pedro", Ranks(rank, world)),
            "para-sharded": train("para", Ranks(rank, world, lockstep=True), shard=True),
        }
        got["para-sharded"] = (
            {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in got["para-sharded"][0].items()},
            got["para-sharded"][1],
        )
        torch.save(got, f"{out}.{rank}")
        dist.barrier()  # both ranks done with the group before either tears it down
    finally:
        dist.destroy_process_group()


LOSSES = ("dev_loss", "best_dev_loss", "train_loss")  # sums in another order: compared at rel 1e-5


def without_time(history):
    return [{k: v for k, v in e.items() if k not in ("elapsed", *LOSSES)} for e in history]


def test_two_ranks_train_the_adapter_one_process_trains(tmp_path):
    """Data-parallel (PEDRO, bi-level) and the sharded base (PARA) against one process with
    the same global batches: the same adapter (within TOL) and the same evaluations."""
    torch.set_num_threads(1)
    mp.spawn(worker, args=(2, free_port(), str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r.{r}", weights_only=False) for r in range(2)]
    for method, key in (("pedro", "pedro"), ("para", "para-sharded")):
        ref, ref_hist = train(method, Ranks())
        for got in ranks:
            state, hist = got[key]
            assert state.keys() == ref.keys()
            for k in ref:
                torch.testing.assert_close(state[k], ref[k], **TOL, msg=f"{key} {k}")
            assert without_time(hist) == without_time(ref_hist)
            for e, r in zip(hist, ref_hist):
                assert [e[k] for k in LOSSES] == pytest.approx([r[k] for k in LOSSES], rel=1e-5)
        # every step moved the adapter well beyond the tolerance
        init = adapter_for(method, tiny_model("llama")).state_dict()
        assert max((ref[k] - init[k]).abs().max() for k in ref) > 1e-2
    a, b = (got["pedro"][0] for got in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a), "ranks hold different adapters"


def torchrun(n: int, *args) -> list:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        "--master-port",
        str(free_port()),
        *args,
    ]


def test_torchrun_ctrl_c_then_resume_with_one_process(tiny_dir, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) stops a 2-rank run, its base sharded
    (read from the files slice by slice), after a step with a checkpoint; resumed by ONE
    process with the whole base, it ends with the adapter of an uninterrupted one-process
    run. Bit for bit here: the gathered weights are the file's, and with 2 micro-batches of 2
    the one process adds the two micro-batch gradients as the all-reduce does."""
    from safetensors.torch import load_file

    steps = ["--eval-every", "40"]  # 10 epochs of 8 steps
    ref = tmp_path / "ref.safetensors"
    r = subprocess.run(train_cmd(tiny_dir, ref, *steps), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "b.safetensors"
    cmd = torchrun(2, *train_cmd(tiny_dir, out, *steps, "--shard-base")[1:])
    p = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    err = ""
    for line in p.stderr:
        err += line
        if line.startswith("step "):  # training has started
            os.killpg(p.pid, signal.SIGINT)
            break
    err += p.stderr.read()
    assert p.wait(timeout=120) != 0, err
    assert "2 ranks, base sharded" in err and "checkpoint saved" in err, err
    assert "Resume with: torchrun --nproc-per-node 2 train.py" in err, err
    assert not out.with_suffix(".report.json").exists()
    r = subprocess.run(
        train_cmd(tiny_dir, out, *steps, "--shard-base", "--resume"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(ref), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FAIL_RANK_1 = """
import os, sys
sys.path.insert(0, os.getcwd())
import train
from minipara import cli
from minipara.train import trainer as training
if os.environ["RANK"] == "1":
    step = training.Trainer._train_step
    def failing(self):
        if self.state.step == 3:
            raise RuntimeError("simulated failure on rank 1")
        return step(self)
    training.Trainer._train_step = failing
cli.run(train.main)
"""


def test_a_failing_rank_ends_the_run(tiny_dir, tmp_path):
    """Rank 1 raises at step 3: the other rank is not left waiting in a collective, the run
    ends within seconds with a non-zero status, and the output names rank 1 and its error."""
    script = tmp_path / "fail_rank_1.py"
    script.write_text(FAIL_RANK_1)
    cmd = torchrun(2, str(script), *train_cmd(tiny_dir, tmp_path / "c.safetensors")[2:])
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and time.time() - t < 60
    assert "RuntimeError: simulated failure on rank 1" in r.stderr
    assert "Root Cause" in r.stderr and "rank      : 1 (local_rank: 1)" in r.stderr.split("Root Cause", 1)[1]


def test_train_speed_runs_the_trainers_step():
    """bench.py --train-steps (the GPU scaling figure) on one process: the Trainer's step, timed."""
    from minipara.bench.speed import train_speed

    r = train_speed(tiny_model("llama"), "para", Ranks(), steps=2, warmup=1, batch=4, micro_batch=2, prompt_tokens=8)
    assert r["ranks"] == 1 and r["steps"] == 2 and r["steps_per_s"] > 0 and r["examples_per_s"] == 4 * r["steps_per_s"]
