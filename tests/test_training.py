"""Training (minipara/training.py, train.py) on tiny random models with pre-tokenised data.

The synthetic task: a prompt of random tokens whose LAST token (one of four, two per class)
decides the answer, response = [answer, EOS]; the answer therefore depends on the prompt,
and a constant output scores about 50%. Learning rates are per method: tiny random models
need far larger ones than the papers' 1e-4 (see LR).
"""

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, tiny_model, write_tiny_model_dir

from minipara import cli
from minipara.errors import UserError
from minipara.methods import METHODS, build_adapter
from minipara.train.trainer import EvalSet, TrainConfig, Trainer, evaluate, loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
# Per-method learning rates for the tiny model, 300 steps (each reached >= 0.96 test accuracy
# on three other data/init seeds): every method needs about 100x the papers' 1e-4 here. The
# vector generators (PARA, PEDRO, PARADE) learn at 1e-2 but diverge from about 6e-2 (their
# scales multiply activations); IAPT wants 2e-2; the fixed scale/bias methods (IA3, BitFit)
# 5e-2 to 1e-1; LoRA fails to converge at 3e-2.
LR = {
    "para": 1e-2,
    "pedro": 1e-2,
    "parade": 1e-2,
    "iapt": 2e-2,
    "lora": 1e-2,
    "ia3": 5e-2,
    "bitfit": 1e-1,
    "ptuning_v2": 1e-2,
}


def make(n: int, seed: int, bos: int = 1, eos: int = 2) -> list:
    r = random.Random(seed)
    out = []
    for _ in range(n):
        last = r.randrange(10, 14)
        prompt = [bos] + [r.randrange(20, 40) for _ in range(r.randint(2, 6))] + [last]
        out.append((prompt, [5 if last < 12 else 6, eos]))
    return out


def evset(pairs, eos: int = 2) -> EvalSet:
    def score(gens):
        return {"accuracy": sum(g == r[:-1] for g, (_, r) in zip(gens, pairs)) / len(pairs)}

    return EvalSet([p for p, _ in pairs], score, max_new_tokens=2, stop_ids=(eos,))


def adapter_for(method, model, seed=0, **options):
    torch.manual_seed(seed)
    return build_adapter(method, model.args, **options).to(DEVICE)


def arch_ids(ad) -> set:
    return {id(p) for p in ad.arch_parameters()} if hasattr(ad, "arch_parameters") else set()


# ---- learning --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_learns_a_prompt_dependent_task(method):
    model = tiny_model("llama")
    ad = adapter_for(method, model)
    train, dev, test = make(400, 1), make(64, 2), make(100, 3)
    before = evaluate(model, ad, evset(test))["accuracy"]
    assert before < 0.9, f"untrained {method} already solves the task ({before})"
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(lr=LR[method], max_steps=300, epochs=100, eval_every=100, patience=100)
    tr = Trainer(model, ad, train, dev, evset(dev), cfg)
    res = tr.run()
    assert res.status == "finished" and res.step == 300 and res.stopped_by == "max_steps"
    tr.load_best()
    after = evaluate(model, ad, evset(test))["accuracy"]
    assert after >= 0.9, f"{method}: test accuracy {after} after training (dev history {res.history})"
    # Only adapter tensors were trained; the base is untouched and has no gradients.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    opt_params = {id(p) for g in tr.opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in ad.parameters()} - arch_ids(ad)


# ---- resume ----------------------------------------------------------------------------------
def short_run(method, family, ckpt, stop_at=None, resume=False, seed=0, options=None, **over):
    model = tiny_model(family)
    bos, eos = model.args.bos_id, model.args.eos_ids[0]
    ad = adapter_for(method, model, seed=seed, **(options or {}))
    dev = make(24, 2, bos, eos)
    cfg = TrainConfig(
        **{
            **dict(
                lr=1e-2, arch_lr=1e-3, max_steps=40, batch_size=8, micro_batch=4, eval_every=10, patience=100, seed=3
            ),
            **over,
        }
    )

    def on_step(t):
        if t.state.step == stop_at:
            t.request_stop("test")  # what the CLI's SIGINT/SIGTERM handler calls

    tr = Trainer(model, ad, make(60, 1, bos, eos), dev, evset(dev, eos), cfg, ckpt_path=ckpt, on_step=on_step)
    if resume:
        tr.resume()
    return tr, tr.run()


@pytest.mark.parametrize(
    "method,family,stop_at",
    [("para", "gemma", 13), ("para", "llama", 10), ("iapt", "llama", 17), ("lora", "llama", 23)],
)
def test_interrupt_and_resume_is_bit_identical(tmp_path, method, family, stop_at):
    """Stopping mid-epoch (13, 17, 23) or just before a due evaluation (10), then resuming in a
    fresh process-like setup (new model, adapter built from another seed), ends with exactly
    the adapter, best adapter and history of an uninterrupted run."""
    ref, ref_res = short_run(method, family, tmp_path / "ref.ckpt")
    tr, res = short_run(method, family, tmp_path / "run.ckpt", stop_at=stop_at)
    assert res.status == "interrupted" and res.step == stop_at
    tr2, res2 = short_run(method, family, tmp_path / "run.ckpt", resume=True, seed=99)
    assert res2.status == "finished" and res2.step == ref_res.step == 40
    for k, v in ref.adapter.state_dict().items():
        assert torch.equal(v, tr2.adapter.state_dict()[k]), k
    for k, v in ref.best_state.items():
        assert torch.equal(v, tr2.best_state[k]), k
    drop = lambda h: [{k: v for k, v in e.items() if k != "elapsed"} for e in h]  # noqa: E731
    assert drop(res2.history) == drop(ref_res.history)
    assert (res2.best_metric, res2.best_step) == (ref_res.best_metric, ref_res.best_step)


def test_resume_refuses_another_method_model_or_option(tmp_path):
    ck = tmp_path / "a.ckpt"
    short_run("para", "llama", ck, max_steps=2, eval_every=2)
    for method, family, over, msg in [
        ("lora", "llama", {}, "checkpoint of method para, not lora"),
        ("para", "gemma", {}, "another model"),
        ("para", "llama", {"lr": 0.5}, "training option lr=0.01"),
    ]:
        with pytest.raises(UserError, match=msg):
            short_run(method, family, ck, resume=True, max_steps=2, eval_every=2, **over)
    with pytest.raises(UserError, match="no checkpoint"):
        short_run("para", "llama", tmp_path / "none.ckpt", resume=True)


def test_a_checkpoint_from_before_input_norm_resumes_as_input_norm_none(tmp_path):
    """A checkpoint whose run predates input_norm (no field in its adapter config) ran its
    generators on h itself: resuming it with the default (rms) is refused, naming the value
    to give; with input_norm none it resumes."""
    ck = tmp_path / "a.ckpt"
    short_run("para", "llama", ck, max_steps=2, eval_every=2, options={"input_norm": "none"}, stop_at=1)
    saved = torch.load(ck, weights_only=True)
    del saved["identity"]["adapter_config"]["input_norm"]
    torch.save(saved, ck)
    with pytest.raises(UserError, match="made with method option input_norm='none', this command gives 'rms'"):
        short_run("para", "llama", ck, resume=True, max_steps=2, eval_every=2)
    _, res = short_run("para", "llama", ck, resume=True, max_steps=2, eval_every=2, options={"input_norm": "none"})
    assert res.status == "finished"


def test_early_stopping_by_metric_keeps_the_best(tmp_path):
    model = tiny_model("llama")
    ad = adapter_for("para", model)
    dev = make(16, 2)
    scores = iter([0.5, 0.7, 0.6, 0.6, 0.4, 0.9])
    ev = evset(dev)
    ev.score = lambda gens: {"accuracy": next(scores)}
    snaps = {}
    cfg = TrainConfig(lr=1e-2, batch_size=8, eval_every=2, patience=3, select="metric")
    tr = Trainer(
        model,
        ad,
        make(32, 1),
        dev,
        ev,
        cfg,
        on_best=lambda a: snaps.__setitem__(tr.state.step, {k: v.clone() for k, v in a.state_dict().items()}),
    )
    res = tr.run()
    assert res.stopped_by == "early_stopping" and res.step == 10 and res.best_step == 4
    assert res.best_metric == 0.7 and list(snaps) == [2, 4]
    tr.load_best()
    assert all(torch.equal(v, ad.state_dict()[k]) for k, v in snaps[4].items())


def test_dev_loss_selects_and_stops_while_the_metric_is_logged(monkeypatch):
    """The papers' rule: keep the checkpoint of the lowest dev loss, stop after `patience`
    evaluations without a lower one; the dev metric is still computed at each evaluation."""
    import minipara.train.trainer as training

    model = tiny_model("llama")
    ad = adapter_for("para", model)
    dev = make(16, 2)
    losses, scores = iter([0.9, 0.8, 0.85, 0.7, 0.75, 0.72, 0.71]), iter([0.5, 0.9, 0.95, 0.4, 0.99, 0.99, 0.99])
    monkeypatch.setattr(training, "mean_loss", lambda *a, **k: next(losses))
    ev = evset(dev)
    ev.score = lambda gens: {"accuracy": next(scores)}
    tr = Trainer(model, ad, make(32, 1), dev, ev, TrainConfig(lr=1e-2, batch_size=8, eval_every=2, patience=3))
    res = tr.run()
    assert res.stopped_by == "early_stopping" and res.best_step == 8 and res.step == 14
    assert res.best_dev_loss == 0.7 and res.best_metric == 0.4  # the metric of the loss-selected checkpoint
    assert [e["dev"]["accuracy"] for e in res.history] == [0.5, 0.9, 0.95, 0.4, 0.99, 0.99, 0.99]


def test_gradients_are_clipped_to_global_norm_one():
    model = tiny_model("llama")
    ad = adapter_for("lora", model)
    tr = Trainer(model, ad, make(32, 1), make(8, 2), evset(make(8, 2)), TrainConfig(lr=1e-2, batch_size=8))
    norms = []
    tr.opt.register_step_pre_hook(
        lambda opt, args, kwargs: norms.append(
            torch.cat([p.grad.flatten() for p in tr.weights if p.grad is not None]).norm().item()
        )
    )
    with torch.no_grad():  # a large loss: unclipped gradients would be far above 1
        for p in ad.parameters():
            p.add_(torch.randn_like(p))
    tr._train_step()
    assert norms[0] == pytest.approx(1.0, rel=1e-4)


def test_rational_parameters_follow_the_warmup_and_decay_schedule():
    model = tiny_model("llama")
    ad = adapter_for("pedro", model)
    cfg = TrainConfig(lr=1e-2, arch_lr=1e-3, batch_size=8, max_steps=20, warmup=0.2, eval_every=100)
    tr = Trainer(model, ad, make(32, 1), make(16, 2), evset(make(16, 2)), cfg)
    seen = []
    tr.on_step = lambda t: seen.append((t.opt.param_groups[0]["lr"], t.arch_opt.param_groups[0]["lr"]))
    tr.run()
    assert [a for _, a in seen] == pytest.approx([w * 1e-3 / 1e-2 for w, _ in seen])
    assert seen[3][1] == pytest.approx(1e-3) and seen[-1][1] == 0.0 and seen[0][1] < 1e-3


def test_long_prompts_lose_their_start_and_are_counted():
    model = tiny_model("llama")
    ad = adapter_for("para", model)
    long = ([1] + list(range(20, 40)), [5, 2])  # 21 prompt tokens + 2 response tokens
    short = ([1, 21, 12], [6, 2])
    dev = [long, short]
    ev = evset(dev)
    ev.max_new_tokens = 4
    tr = Trainer(model, ad, [long, short, long], dev, ev, TrainConfig(max_len=10))
    assert tr.train[0] == ([1] + list(range(33, 40)), [5, 2]) and tr.train[1] == short  # BOS, then the end
    assert tr.cut == {"train": 2, "dev": 1, "dev_eval": 1}
    assert tr.dev_eval.prompts[0] == [1] + list(range(35, 40))  # room for the 4 new tokens
    with pytest.raises(UserError, match="response alone"):
        Trainer(model, ad, [([1, 3], [5] * 9 + [2])], dev, ev, TrainConfig(max_len=10))


# ---- the batch path ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_response_never_reaches_a_pooler(method):
    """Through loss_sum (the training path): other response tokens, and longer responses (more
    right padding), leave every generated state tensor unchanged, equal to the prefill's."""
    model = tiny_model("gemma")
    ad = adapter_for(method, model)
    with torch.no_grad():
        for p in ad.parameters():  # "trained-looking": no zero-init tensor left
            p.add_(torch.randn_like(p) * 0.1)
    recorded = []
    real = ad.layer_state

    def spy(i, h, pool_mask, m):
        st = real(i, h, pool_mask, m)
        recorded.append(st)
        return st

    ad.layer_state = spy

    def states(pairs):
        recorded.clear()
        loss_sum(model, ad, pairs)
        return list(recorded)

    prompts = [[2, 30, 31, 32, 12], [2, 40, 41, 11], [2, 50, 51, 52, 53, 54, 55, 13]]
    a = states([(p, [5, 1]) for p in prompts])
    b = states([(p, [6, 1]) for p in prompts])  # same shape, other response tokens
    c = states([(p, [7, 8, 9, 10, 1]) for p in prompts])  # longer responses: more padding
    with torch.no_grad():
        cache = model.new_cache(1, ad.n_prefix + 16, ad.n_prefix)
        recorded.clear()
        model(torch.tensor([prompts[1]], device=DEVICE), cache=cache, adapter=ad)
        prefill = list(recorded)
    for sa, sb, sc, sp in zip(a, b, c, prefill):
        for x, y, z, w in zip(tensors(sa), tensors(sb), tensors(sc), tensors(sp)):
            assert torch.equal(x, y)
            # Reductions over another T round differently: allow ~100 float32 ulps at the
            # tensor's own scale (soft tokens pass a norm, so an element near 0 carries the
            # rounding of its whole head). A response token reaching the pooler moves the
            # states by O(0.1), four orders above this.
            torch.testing.assert_close(x, z, rtol=0, atol=1e-5 * float(x.abs().max()))
            row = x[1:2] if x.shape[0] == 3 else x
            torch.testing.assert_close(row, w, rtol=0, atol=1e-5)


def tensors(st) -> list:
    if st is None:
        return []
    out = [t for d in (st.scale, st.bias) for _, t in sorted(d.items())]
    out += [t for _, ab in sorted(st.lora.items()) for t in ab]
    return out + [t for t in (st.prefix_k, st.prefix_v) if t is not None]


def test_micro_batches_give_the_full_batch_gradient():
    model = tiny_model("llama")
    pairs = make(8, 5)
    grads = []
    for mb in (8, 2):
        ad = adapter_for("para", model)
        with torch.no_grad():
            ad.gen.w_up.normal_(0, 0.1)
        n = sum(len(r) for _, r in pairs)
        for s in range(0, 8, mb):
            (loss_sum(model, ad, pairs[s : s + mb]) / n).backward()
        grads.append([p.grad.clone() for p in ad.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["pedro", "iapt", "para"])
def test_bilevel_schedule(method):
    """Rational parameters move only on dev batches, everything else only on train batches,
    alternating dev -> train each step (first-order DARTS); methods without rationals never
    take a dev step."""
    model = tiny_model("llama")
    ad = adapter_for(method, model)
    train, dev = make(32, 1), make(16, 2)
    arch = arch_ids(ad)
    assert (method == "para") == (not arch)
    with torch.no_grad():  # zero-init W_up would give the rationals no gradient at first
        for p in ad.parameters():
            if id(p) not in arch:
                p.add_(torch.randn_like(p) * 0.05)
    tr = Trainer(
        model,
        ad,
        train,
        dev,
        evset(dev),
        TrainConfig(lr=1e-2, arch_lr=1e-2, warmup=0, batch_size=8, max_steps=4, eval_every=100),
    )
    calls, real = [], tr._update
    named = dict(ad.named_parameters())

    def spy(pairs, params, opt):
        before = {k: p.detach().clone() for k, p in named.items()}
        loss = real(pairs, params, opt)
        moved = {k for k, p in named.items() if not torch.equal(p, before[k])}
        split = (
            "dev"
            if all(any(x is d for d in dev) for x in pairs)
            else "train"
            if all(any(x is t for t in train) for x in pairs)
            else "mixed"
        )
        calls.append((split, moved))
        return loss

    tr._update = spy
    tr.run()
    arch_names = {k for k, p in named.items() if id(p) in arch}
    expected = ["dev", "train"] * 4 if arch else ["train"] * 4
    assert [s for s, _ in calls] == expected
    for split, moved in calls:
        assert moved, f"a {split} step changed nothing"
        assert moved <= (arch_names if split == "dev" else set(named) - arch_names)


def test_refuses_a_response_longer_than_the_context():
    model = tiny_model("llama")
    ad = adapter_for("para", model)
    long = [([1, 10], [5] * model.args.max_seq_len)]
    with pytest.raises(UserError, match="train example 1: prompt .* exceed the model's context"):
        Trainer(model, ad, long, make(4, 2), evset(make(4, 2)), TrainConfig(max_len=10 * model.args.max_seq_len))
    with pytest.raises(UserError, match="train example 1: its response alone .* max_len"):
        Trainer(model, ad, long, make(4, 2), evset(make(4, 2)), TrainConfig(max_len=model.args.max_seq_len))
    with pytest.raises(UserError, match="train split is empty"):
        Trainer(model, ad, [], make(4, 2), evset(make(4, 2)), TrainConfig())


def test_default_training_config():
    c = TrainConfig().resolved(400)
    assert (c.batch_size, c.micro_batch, c.eval_every, c.lr, c.arch_lr, c.warmup, c.patience, c.eval_beams) == (
        16,
        16,
        25,
        1e-4,
        1e-6,
        0.06,
        10,
        3,
    )
    assert (c.select, c.max_grad_norm, c.max_len) == ("loss", 1.0, 2048)  # docs/methods.md, Training
    c = TrainConfig().resolved(50_000)
    assert (c.batch_size, c.eval_every) == (128, 200)
    with pytest.raises(UserError, match="batch_size 16 is not divisible by micro_batch 5"):
        TrainConfig(micro_batch=5).resolved(400)


# ---- the command line ----------------------------------------------------------------------------
def run_cli(argv, capsys) -> tuple[int, list[str]]:
    from minipara.commands import train as mod

    with pytest.raises(SystemExit) as e:
        cli.run(lambda: mod.main(argv))
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_cli_unknown_method_exits_2_with_one_line():
    r = subprocess.run(
        [sys.executable, "train.py", "--method", "nope", "--task", "copa"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: unknown method 'nope'; choose one of " + ", ".join(METHODS)


def test_cli_refusals(tmp_path, capsys):
    empty, bad = tmp_path / "empty.jsonl", tmp_path / "missing.jsonl"
    empty.write_text("")
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "a", "response": "b"}\n')
    out = tmp_path / "x.safetensors"
    out.write_text("old")
    cases = [
        (["--method", "para", "--task", "nope"], "unknown task 'nope'; valid tasks: copa"),
        (["--method", "para", "--task", "custom", "--train", str(bad), "--dev", str(good)], f"missing file {bad}"),
        (["--method", "para", "--task", "custom", "--train", str(empty), "--dev", str(good)], "holds no examples"),
        (["--method", "para", "--task", "copa", "--micro-batch", "5"], "not divisible by --micro-batch 5"),
        (["--method", "lora", "--task", "copa", "--pooler", "mean"], "method lora has no option --pooler"),
        (["--method", "para", "--task", "copa", "--r", "x"], "--r needs an integer"),
        (
            ["--method", "para", "--task", "copa", "--input-norm", "layer"],
            "unknown PARA --input-norm 'layer'; use one of rms, none",
        ),
        (["--method", "lora", "--task", "copa", "--input-norm", "none"], "method lora has no option --input-norm"),
        (["--method", "para", "--task", "copa", "--out", str(out)], f"{out} exists; pass --force"),
        (["--method", "para", "--task", "copa", "--out", str(out), "--resume", "--force"], "give one of them"),
    ]
    for argv, msg in cases:
        code, err = run_cli(argv, capsys)
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (argv, err)
    assert out.read_text() == "old"


# ---- the command line, end to end on a tiny model directory ----------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny HF-format LLaMA directory (conftest.write_tiny_model_dir) and custom-task files
    whose answer depends on the prompt's colour word."""
    import json

    d = write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    r = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            colour = r.choice(["red", "blue"])
            filler = " ".join(r.choice(["cat", "dog", "sun", "moon", "big", "small"]) for _ in range(3))
            answer = "yes" if colour == "red" else "no"
            out.append(json.dumps({"prompt": f"the {filler} is {colour}", "response": answer}))
        return "\n".join(out) + "\n"

    (d / "train.jsonl").write_text(rows(32))
    (d / "dev.jsonl").write_text(rows(8))
    return d


ENV = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only add overhead


def train_cmd(d, out, *extra):
    return [
        sys.executable,
        "train.py",
        "--method",
        "para",
        "--task",
        "custom",
        "--model",
        str(d),
        "--train",
        str(d / "train.jsonl"),
        "--dev",
        str(d / "dev.jsonl"),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--lr",
        "1e-2",
        *extra,
    ]


def test_cli_run_writes_adapter_checkpoint_log_and_report(tiny_dir, tmp_path):
    import json

    from minipara.io.adapters import load_adapter
    from minipara.model.config import ModelArgs

    out = tmp_path / "run" / "a.safetensors"
    r = subprocess.run(
        train_cmd(tiny_dir, out, "--max-steps", "6", "--eval-every", "3"),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step 6/6" in r.stderr and "it/s" in r.stderr and "ETA" in r.stderr
    assert load_adapter(out, ModelArgs.from_dir(tiny_dir)).method == "para"
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report == json.loads(r.stdout)
    for key in (
        "test_metric",
        "dev_metric_best",
        "trainable_params",
        "steps",
        "wall_time_s",
        "peak_memory_bytes",
        "command",
    ):
        assert key in report, key
    assert report["steps"] == 6 and report["stopped_by"] == "max_steps" and "--max-steps 6" in report["command"]
    events = [json.loads(x)["event"] for x in out.with_suffix(".log.jsonl").read_text().splitlines()]
    assert events == ["start", "eval", "eval", "end"]
    ck = torch.load(out.with_suffix(".ckpt"), weights_only=True)
    assert ck["progress"]["step"] == 6 and ck["progress"]["done"]
    again = subprocess.run(
        train_cmd(tiny_dir, out, "--max-steps", "6"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "--force" in again.stderr


def test_cli_sigint_then_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    import signal

    from safetensors.torch import load_file

    steps = ["--eval-every", "40"]  # 10 epochs of 8 steps
    ref = tmp_path / "ref.safetensors"
    r = subprocess.run(train_cmd(tiny_dir, ref, *steps), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "b.safetensors"
    p = subprocess.Popen(train_cmd(tiny_dir, out, *steps), cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("step "):  # training has started
            p.send_signal(signal.SIGINT)
            break
    err = p.stderr.read()
    assert p.wait(timeout=300) == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err and "Resume with:" in err
    resume_cmd = err.split("Resume with: ", 1)[1].strip()
    assert resume_cmd.endswith("--resume")
    r = subprocess.run(
        train_cmd(tiny_dir, out, *steps, "--resume"), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(ref), load_file(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["para", "iapt"])
@pytest.mark.parametrize(
    "flag, stored", [([], "rms"), (["--input-norm", "none"], "none"), (["--input-norm", "rms"], "rms")]
)
def test_cli_input_norm_flag_reaches_the_adapter_file(tiny_dir, tmp_path, capsys, method, flag, stored):
    from minipara.io.adapters import adapter_info

    out = tmp_path / "a.safetensors"
    argv = [str(x) for x in train_cmd(tiny_dir, out, "--max-steps", "1", "--eval-every", "1", *flag)[2:]]
    argv[argv.index("para")] = method
    code, err = run_cli(argv, capsys)
    assert code == 0, err
    assert adapter_info(out)["config"]["input_norm"] == stored


def test_cli_method_none_scores_the_bare_model(tiny_dir, tmp_path):
    """The reference row of a results table: no training, the bare model decoded as evaluation
    decodes; its scores equal evaluate() with no adapter."""
    import json

    from minipara.io.checkpoints import load_model
    from minipara.io.tokenizer import Tokenizer
    from minipara.train.tasks import load_task
    from minipara.train.trainer import evaluate, prepare_task

    out = tmp_path / "none.safetensors"
    cmd = [c if c != "para" else "none" for c in train_cmd(tiny_dir, out)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report == json.loads(r.stdout) and report["method"] == "none" and not out.exists()
    model, tok = load_model(tiny_dir), Tokenizer(tiny_dir)
    task = load_task("custom", None, seed=0, train=tiny_dir / "train.jsonl", dev=tiny_dir / "dev.jsonl")
    _, _, dev_eval, test_eval = prepare_task(task, tok, report["template"])
    assert report["dev"] == evaluate(model, None, dev_eval) and report["test"] == evaluate(model, None, test_eval)


def test_python_run_writes_what_train_py_writes(tiny_dir, tmp_path, capsys):
    """minipara.run, the Python entry point train.py is a shell over, does the same run from
    keyword options: the same files, adapter, checkpoint, log events and report (but for the
    command, the output name and the measured time and memory)."""
    import json

    import minipara

    opts = ["--max-steps", "4", "--eval-every", "2", "--eval-beams", "1", "--r", "2"]
    cli_out, py_out = tmp_path / "cli" / "a.safetensors", tmp_path / "py" / "a.safetensors"
    code, err = run_cli([str(x) for x in train_cmd(tiny_dir, cli_out, *opts)[2:]], capsys)
    assert code == 0, err
    report = minipara.run(
        "para",
        "custom",
        model=tiny_dir,
        train=tiny_dir / "train.jsonl",
        dev=tiny_dir / "dev.jsonl",
        out=py_out,
        batch_size=4,
        micro_batch=2,
        lr=1e-2,
        max_steps=4,
        eval_every=2,
        eval_beams=1,
        r=2,
        progress=False,
    )
    assert (
        sorted(p.name for p in py_out.parent.iterdir())
        == sorted(p.name for p in cli_out.parent.iterdir())
        == ["a.ckpt", "a.log.jsonl", "a.report.json", "a.safetensors"]
    )
    assert py_out.read_bytes() == cli_out.read_bytes()
    assert report == json.loads(py_out.with_suffix(".report.json").read_text())
    assert report["command"].startswith("minipara.run('para', 'custom', out=") and "r=2" in report["command"]

    def comparable(rep):
        return {
            k: v
            for k, v in rep.items()
            if k not in ("command", "out", "wall_time_s", "peak_memory_bytes", "peak_memory_mb")
        }

    assert comparable(report) == comparable(json.loads(cli_out.with_suffix(".report.json").read_text()))
    events = [
        [json.loads(x)["event"] for x in f.with_suffix(".log.jsonl").read_text().splitlines()]
        for f in (cli_out, py_out)
    ]
    assert events[0] == events[1] == ["start", "eval", "eval", "end"]
    cks = [torch.load(f.with_suffix(".ckpt"), weights_only=True) for f in (cli_out, py_out)]
    assert all(torch.equal(cks[0]["adapter"][k], cks[1]["adapter"][k]) for k in cks[0]["adapter"])
    with pytest.raises(UserError, match="exists; pass force"):  # the same refusals, in Python's terms
        minipara.run(
            "para",
            "custom",
            model=tiny_dir,
            train=tiny_dir / "train.jsonl",
            dev=tiny_dir / "dev.jsonl",
            out=py_out,
            max_steps=4,
        )
