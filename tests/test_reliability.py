"""Issue 26: one request's NaN or inf never reaches another request or another row; non-finite
adapters are refused wherever they enter; a diverged run stops; outputs never land on inputs.
Table-driven, tiny models: each case costs milliseconds."""

import threading
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, exact_only, perturbed, tiny_model

from minipara.decode.generation import Decoder, GenerationConfig, generate
from minipara.methods import METHODS, build_adapter
from minipara.methods.mixture import Mixture
from minipara.serve.engine import Engine, Request

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIONS = {"ptuning_v2": dict(prefix_len=6)}  # the default 64 would need a longer context


def adapter(model, method: str, seed: int, poison: str | None = None):
    """A trained-looking adapter; poison: "nan" fills its tensors with NaN, "overflow" scales
    them by 1e30 (finite, as a run at --lr 1e30 writes them, but inf once used)."""
    ad = perturbed(build_adapter(method, model.args, **OPTIONS.get(method, {})), seed=seed).to(DEVICE)
    with torch.no_grad():
        for p in ad.parameters():
            if poison == "nan":
                p.fill_(float("nan"))
            elif poison == "overflow":
                p.mul_(1e30)
    return ad


def kv_finite(cache) -> bool:
    return all(bool(torch.isfinite(b).all()) for i in range(cache.n_layers) for b in cache.kv(i))


# Every method with NaN; with values that overflow, the methods whose overflow reaches the
# KV cache (IA3's and P-tuning v2's 1e30 saturate to finite values).
POISONED = [(m, "nan") for m in METHODS] + [(m, "overflow") for m in ("para", "pedro", "iapt", "lora", "bitfit")]
PROMPTS = [[1, 5, 6, 7, 9, 11], [1, 8, 9]]
GREEDY = GenerationConfig(max_new_tokens=6, eos_ids=())
BEAMS = GenerationConfig(max_new_tokens=5, beams=2, eos_ids=())


# ---- no NaN or inf crosses a request boundary ----------------------------------------------------
@exact_only
@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("method, poison", POISONED)
def test_poisoned_request_leaves_nothing_to_the_next(family, method, poison):
    """A reused Decoder (as LanguageModel.generate keeps one) serves a poisoned adapter's request,
    then good requests: each gets what a fresh decoder gives it."""
    model = tiny_model(family)
    bad, good = adapter(model, method, 1, poison), adapter(model, method, 2)
    dec = Decoder(model)
    generate(model, PROMPTS, GREEDY, adapter=bad, decoder=dec)
    assert not all(kv_finite(c) for c in dec._caches.values()), "the poisoned request should leave NaN/inf"
    for cfg, ad, prompts in [
        (GREEDY, good, PROMPTS),
        (GREEDY, None, PROMPTS),
        (BEAMS, good, PROMPTS),
        (GREEDY, None, PROMPTS[1:]),
    ]:
        want = generate(model, prompts, cfg, adapter=ad, decoder=Decoder(model))
        assert generate(model, prompts, cfg, adapter=ad, decoder=dec) == want, (cfg.beams, ad is None)


@exact_only
@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("method, poison", POISONED)
def test_poisoned_tenant_in_a_mixed_batch(family, method, poison):
    """In a mixed batch a poisoned tenant's row harms no other row, and no later batch."""
    model = tiny_model(family)
    bad, good, lora = adapter(model, method, 1, poison), adapter(model, method, 2), adapter(model, "lora", 3)
    prompts = PROMPTS * 2 + PROMPTS[:1]
    alone = [generate(model, [p], GREEDY, adapter=a)[0] for p, a in zip(prompts, [good, None, lora, good, None])]
    dec = Decoder(model)
    mixed = generate(model, prompts, GREEDY, Mixture([bad, good, lora], [1, None, 2, 1, 0]), dec)
    assert mixed[:4] == alone[:4]
    assert generate(model, prompts, GREEDY, Mixture([good, lora], [0, None, 1, 0, None]), dec) == alone


@exact_only
@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("method, poison", [("lora", "nan"), ("iapt", "nan"), ("para", "overflow")])
def test_poisoned_request_in_the_server_engine(family, method, poison):
    """The server's engine: a poisoned request beside a good one, then good requests in the rows
    it used: every good request gets the tokens it gets alone."""
    model = tiny_model(family)
    bad, good = adapter(model, method, 1, poison), adapter(model, method, 2)
    engine = Engine(model, lambda ids: " ".join(map(str, ids)), max_batch=2, slots=40)
    engine.start()
    try:
        for wave in ([(bad, 0), (good, 1)], [(good, 0), (None, 1)], [(None, 0), (good, 1)], [(bad, 0)] * 2):
            reqs = [Request(PROMPTS[p], GREEDY, ad) for ad, p in wave]
            done, left = threading.Event(), [len(reqs)]

            def emit(kind, value):
                if kind != "text":
                    left[0] -= 1
                    if not left[0]:
                        done.set()

            for r in reqs:
                r.emit = emit
                engine.submit(r)
            assert done.wait(60)
            for r in reqs:
                if r.adapter is not bad:
                    assert r.tokens == generate(model, [r.prompt], GREEDY, adapter=r.adapter)[0]
    finally:
        engine.stop()


# ---- non-finite adapters refused wherever they enter -----------------------------------------
def poison_lora(ad, how: str):
    """Edit a LoRA adapter in place as a user (or a diverged run) might."""
    with torch.no_grad():
        if how == "alpha":
            ad.config.alpha = 1e308  # finite, but its scale times any weight overflows
        else:
            ad.b["v"][1, 0, 3] = {"nan": float("nan"), "inf": float("-inf"), "overflow": 1e30}[how]
    return ad


def write_unchecked(monkeypatch, path, ad, args):
    """An adapter file as an older minipara (or another tool) could have written it."""
    import minipara.io.adapters as files

    with monkeypatch.context() as m:
        m.setattr(files, "check_values", lambda *a, **k: None)
        files.save_adapter(path, ad, args)
    return path


def _pool(lm, tmp_path, monkeypatch, ad):
    from minipara.serve.pool import AdapterPool

    folder = tmp_path.parent / "adapters"  # (beside "out", where nothing may appear)
    folder.mkdir()
    write_unchecked(monkeypatch, folder / "bad.safetensors", ad, lm.args)
    lm.save_adapter(folder / "good.safetensors", lm.new_adapter("lora"))
    pool = AdapterPool(folder, lm.args, lm.device, 1 << 30)
    pool.preload()  # reports the bad one and goes on
    assert "good" in pool.loaded and "bad" not in pool.loaded
    pool.get("bad")


ENTRIES = {
    "generate": (lambda lm, ad, t, mp: lm.generate("red cat", adapter=ad, max_new_tokens=2), "the adapter"),
    "generate a mixed batch": (
        lambda lm, ad, t, mp: lm.generate(["red", "cat"], adapter=[None, ad], max_new_tokens=2),
        "the adapter of prompt 2",
    ),
    "evaluate": (lambda lm, ad, t, mp: lm.evaluate(ad, "copa"), "the adapter"),
    "save_adapter": (lambda lm, ad, t, mp: lm.save_adapter(t / "a.safetensors", ad), "a.safetensors"),
    "export_peft": (lambda lm, ad, t, mp: lm.export_peft(ad, t / "peft"), "the adapter to export"),
    "export_merged": (lambda lm, ad, t, mp: lm.export_merged(ad, t / "merged"), "the adapter to merge"),
    "load_adapter": (
        lambda lm, ad, t, mp: lm.load_adapter(write_unchecked(mp, t / "b.safetensors", ad, lm.args)),
        "b.safetensors",
    ),
    "server pool": (lambda lm, ad, t, mp: _pool(lm, t, mp, ad), "adapter 'bad'"),  # (no server paths)
}
REASONS = {"nan": "NaN or infinite", "inf": "NaN or infinite", "overflow": "up to 1e+30", "alpha": "alpha"}


@pytest.mark.parametrize("how", list(REASONS))
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_non_finite_adapter_refused_at_every_entry(model_dir, tmp_path, monkeypatch, entry, how):
    import minipara
    from minipara.errors import UserError

    lm = minipara.load(model_dir)
    ad = poison_lora(lm.new_adapter("lora"), how)
    run, name = ENTRIES[entry]
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError) as e:
        run(lm, ad, tmp_path / "out", monkeypatch)
    assert name in str(e.value) and REASONS[how] in str(e.value), str(e.value)
    assert not any((tmp_path / "out").glob("[!b]*")), "a refused adapter wrote a file"


def test_absurd_option_refused_when_built(model_dir):
    import minipara
    from minipara.errors import UserError

    with pytest.raises(UserError, match="alpha must be a finite number within"):
        minipara.load(model_dir).new_adapter("lora", alpha=1e308)


# ---- a diverged run stops ------------------------------------------------------------------------
from test_refusals import data_dir, run_script, train_args  # noqa: E402, F401 - data_dir: the fixture

DIVERGING = {  # flags -> the step that diverges; a warm-up from lr 0 gives one good step first
    ("--lr", "1e30", "--warmup", "0", "--max-steps", "2"): 1,
    ("--lr", "1e30", "--warmup", "0.5", "--max-steps", "4", "--eval-every", "1"): 2,
}


@pytest.mark.parametrize("method", ["para", "lora", "ia3"])
@pytest.mark.parametrize("flags", list(DIVERGING))
def test_diverged_run_stops_and_keeps_the_last_good_files(model_dir, data_dir, tmp_path, capsys, method, flags):  # noqa: F811
    import json

    from minipara.io.adapters import load_adapter
    from minipara.model.config import ModelArgs

    out = tmp_path / "a.safetensors"
    code, _, err = run_script("train", train_args(model_dir, data_dir, out, *flags, method=method), capsys)
    step = DIVERGING[flags]
    assert code == 2 and f"error: training diverged at step {step}" in err and "--lr" in err, err
    assert "Traceback" not in err
    assert not out.with_suffix(".report.json").exists()
    for line in out.with_suffix(".log.jsonl").read_text().splitlines():  # strict JSON: no NaN
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the log: {line}"))
    if step == 1:
        assert not out.exists() and not out.with_suffix(".ckpt").exists()
    else:  # the adapter and checkpoint of step 1 stay, and load
        args = ModelArgs.from_hf(json.loads((model_dir / "config.json").read_text()))
        load_adapter(out, args)
        ck = torch.load(out.with_suffix(".ckpt"), weights_only=True)
        assert ck["progress"]["step"] == 1


# ---- one output-path rule: never an input, never a directory --------------------------------------
from test_refusals import refused, snapshot  # noqa: E402


def test_python_writers_never_write_over_the_model_or_the_data(model_dir, data_dir, tmp_path):  # noqa: F811
    import minipara
    from minipara.errors import UserError
    from minipara.train.tasks import load_task

    lm = minipara.load(model_dir)
    ad = lm.new_adapter("lora")
    task = load_task("custom", train=str(data_dir / "train.jsonl"), dev=str(data_dir / "dev.jsonl"))
    (tmp_path / "d").mkdir()
    cases = [
        (lambda: lm.save_adapter(model_dir / "model.safetensors", ad), "a file of"),
        (lambda: lm.save_adapter(model_dir / "tokenizer.model", ad), "a file of"),
        (lambda: lm.save_adapter(tmp_path / "d", ad), "is a directory"),
        (lambda: lm.save_adapter(Path(minipara.__file__).parent / "x.safetensors", ad), "minipara package"),
        (lambda: lm.train(ad, task, out=model_dir / "model.safetensors"), "a file of"),
        (lambda: lm.train(ad, task, out=data_dir / "train.jsonl"), "a file this run reads"),
        (lambda: lm.train(ad, task, out=tmp_path / "d"), "is a directory"),
    ]
    before = snapshot(model_dir, data_dir, tmp_path)
    for call, words in cases:
        with pytest.raises(UserError, match=words):
            call()
    assert snapshot(model_dir, data_dir, tmp_path) == before


def test_scripts_never_write_over_the_model_or_into_a_directory(model_dir, data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    import shutil

    import minipara.io.weights

    weights = tmp_path / "weights"
    shutil.copytree(model_dir, weights / "gemma-3-270m")  # stands for the default model
    monkeypatch.setattr(minipara.io.weights, "WEIGHTS_DIR", weights)
    default = weights / "gemma-3-270m"
    (tmp_path / "d").mkdir()
    (tmp_path / "b.ckpt").mkdir()
    train = train_args(model_dir, data_dir, tmp_path / "x.safetensors")
    at = train.index("--out") + 1
    no_model = train[: 2 * 2] + train[6:]  # without --model: the default one
    cases = [
        (
            "train",
            [*no_model[: at - 2], default / "tokenizer.model", *no_model[at - 1 :], "--force"],
            "tokenizer.model",
        ),
        ("train", [*train[:at], tmp_path / "d", *train[at + 1 :], "--force"], "is a directory"),
        ("train", [*train[:at], tmp_path / "b.safetensors", *train[at + 1 :], "--force"], "is a directory"),
        ("bench", ["--model", model_dir, "--runs", "1", "--json", model_dir / "config.json"], "config.json"),
        ("bench", ["--model", model_dir, "--runs", "1", "--json", tmp_path / "d"], "is a directory"),
        ("bench", ["--model", model_dir, "--runs", "1", "--markdown", tmp_path / "d"], "is a directory"),
    ]
    for script, argv, words in cases:
        refused(script, argv, capsys, words, watch=[tmp_path, model_dir, data_dir])


# ---- torchrun: ranks agree on their settings at start -------------------------------------------
RANK_1_DIFFERS = {  # what rank 1 is started with (rank 0: the defaults of train_args)
    "lr": dict(lr=1e-3),
    "seed": dict(seed=5),
    "batch_size": dict(batch_size=2),
    "max_steps": dict(max_steps=3),
    "method": dict(method="lora"),
}


def _ranks_worker(rank, ports, model_dir, data_dir, out, results):
    import os

    from minipara.errors import UserError
    from minipara.train.runs import run

    torch.set_num_threads(1)
    for (name, change), port in zip(RANK_1_DIFFERS.items(), ports):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
        kw = dict(method="para", lr=1e-2, seed=0, batch_size=4, max_steps=1)
        kw.update(change if rank == 1 else {})
        method = kw.pop("method")
        try:
            run(
                method,
                "custom",
                out=f"{out}-{name}.safetensors",
                model=str(model_dir),
                train=str(data_dir / "train.jsonl"),
                dev=str(data_dir / "dev.jsonl"),
                max_eval=2,
                eval_beams=1,
                progress=False,
                **kw,
            )
            results.put((rank, name, "finished"))
        except UserError as e:
            results.put((rank, name, str(e)))


def test_ranks_started_differently_stop_at_once_naming_the_difference(model_dir, data_dir, tmp_path):  # noqa: F811
    import torch.multiprocessing as mp
    from test_distributed import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    ports = [free_port() for _ in RANK_1_DIFFERS]
    args = (ports, model_dir, data_dir, str(tmp_path / "o"), results)
    procs = [ctx.Process(target=_ranks_worker, args=(r, *args)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    for _ in range(2 * len(RANK_1_DIFFERS)):
        rank, name, msg = results.get(timeout=120)
        got[rank, name] = msg
    for p in procs:
        p.join(30)
        if p.is_alive():  # (a rank stuck in a collective, as before the check)
            p.kill()
    for name in RANK_1_DIFFERS:
        for rank in (0, 1):
            msg = got[rank, name]
            assert f"different settings: {name} is" in msg and "on rank 1" in msg, (rank, name, msg)
    assert not any(tmp_path.iterdir())
