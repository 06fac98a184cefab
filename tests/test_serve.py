"""The OpenAI-compatible server (minipara/serve.py), through the real `openai` client, on a tiny
model with adapters of three methods: outputs equal generate.py's, concurrent mixed requests
equal each run alone, streaming, and every error case. Servers bind to 127.0.0.1 only."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import tiny_args, write_tiny_model_dir
from test_mixture import trained

import minipara
from minipara.io.adapters import save_adapter
from minipara.io.checkpoints import load_model
from minipara.methods import build_adapter
from minipara.serve.app import make_server, parse, uvicorn_server

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("para", "lora", "iapt")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny HF-format model and a folder with one adapter per method (name = method)."""
    d = tmp_path_factory.mktemp("serve")
    (d / "model").mkdir()
    model_dir = write_tiny_model_dir(d / "model")
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    (d / "adapters").mkdir()
    for i, m in enumerate(METHODS):
        torch.manual_seed(i)  # the adapters' initial values, so every run serves the same ones
        save_adapter(d / "adapters" / f"{m}.safetensors", trained(build_adapter(m, model.args), seed=i), model.args)
    other = tiny_args("gemma")  # an adapter made for another base model: listed, refused when asked for
    save_adapter(d / "adapters" / "other.safetensors", build_adapter("ia3", other), other)
    return model_dir, d / "adapters"


class Running:
    """A server in a thread of this process, on a free port of 127.0.0.1."""

    def __init__(self, files, *flags):
        model_dir, adapters = files
        a = parse(["--model", str(model_dir), "--adapters", str(adapters), *flags])
        self.server = make_server(a)
        self.uv = uvicorn_server(self.server, a)  # the flags' timeouts and limits, as main() serves
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(200):
            if self.uv.started:
                break
            time.sleep(0.05)
        self.client = openai.OpenAI(base_url=self.url, api_key="unused", max_retries=0, timeout=30)

    def close(self):
        self.uv.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(files):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from more, and the machine is shared
    s = Running(files, "--max-batch", "4")
    yield s
    s.close()
    torch.set_num_threads(threads)


_LMS = {}


def alone(model_dir, adapters, name, prompt, n):
    """(text, token count) of the request run on its own through the public API, as generate.py
    runs it (greedy)."""
    lm = _LMS.get(model_dir) or _LMS.setdefault(model_dir, minipara.load(model_dir))
    ad = None if name == "base" else lm.load_adapter(adapters / f"{name}.safetensors")
    out = lm.generate(prompt, adapter=ad, max_new_tokens=n)
    return out.text, len(out.tokens)


PROMPTS = ["the cat is", "a big red dog", "sun moon", "is the small green cat a dog or the blue sun"]


def test_equals_generate_py(server, files):
    """generate.py's text for the same prompt and adapter (greedy), per method and the base."""
    model_dir, adapters = files
    for name in ("base", *METHODS):
        got = server.client.completions.create(model=name, prompt="the cat is", max_tokens=12, temperature=0)
        want, n = alone(model_dir, adapters, name, "the cat is", 12)
        assert got.choices[0].text == want and got.usage.completion_tokens == n, name
    out = subprocess.run(
        [
            sys.executable,
            "generate.py",
            "--model",
            str(model_dir),
            "--adapter",
            str(adapters / "iapt.safetensors"),
            "--max-new-tokens",
            "12",
            "--json",
            "the cat is",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    got = server.client.completions.create(model="iapt", prompt="the cat is", max_tokens=12, temperature=0)
    assert got.choices[0].text == json.loads(out.stdout)["text"]


def test_concurrent_mixed_adapters_equal_alone(server, files):
    """Sixteen concurrent clients over every adapter and the base, more than the 4 rows: each
    completion equals its request run alone; streamed pieces add up to the same text."""
    model_dir, adapters = files
    jobs = [
        (name, p, 6 + 3 * (i % 4)) for i, (name, p) in enumerate((n, p) for p in PROMPTS for n in ("base", *METHODS))
    ]

    def ask(job):
        name, prompt, n = job
        if n % 2:
            chunks = server.client.completions.create(
                model=name, prompt=prompt, max_tokens=n, temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in chunks)
        return server.client.completions.create(model=name, prompt=prompt, max_tokens=n, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as ex:
        got = list(ex.map(ask, jobs))
    for job, text in zip(jobs, got):
        assert text == alone(model_dir, adapters, *job)[0], job


def test_chat_and_streaming_shapes(server):
    c = server.client
    msgs = [{"role": "user", "content": "red dog"}]
    whole = c.chat.completions.create(model="lora", messages=msgs, max_tokens=8, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = list(
        c.chat.completions.create(
            model="lora",
            messages=msgs,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # One user message is the prompt in the model's chat format: plain text for this base model.
    plain = c.completions.create(model="lora", prompt="red dog", max_tokens=8, temperature=0).choices[0].text
    assert whole.choices[0].message.content == plain
    models = [m.id for m in c.models.list()]
    assert models == ["base", "iapt", "lora", "other", "para"]
    # Sampling with a seed repeats; a stop string ends the text before it.
    a, b = (
        c.completions.create(model="para", prompt="the cat", max_tokens=10, temperature=1.0, seed=3).choices[0].text
        for _ in range(2)
    )
    assert a == b
    full = c.completions.create(model="lora", prompt="the cat is", max_tokens=12, temperature=0).choices[0].text
    stop = full[5:8]
    assert len(stop) == 3
    stopped = c.completions.create(model="lora", prompt="the cat is", max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == full[: full.find(stop)] and stopped.choices[0].finish_reason == "stop"


def post(url, data: bytes):
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize(
    "kw, status, param",
    [
        (dict(model="no-such-adapter"), 404, "model"),
        (dict(model="other"), 400, "model"),  # made for another base model
        (dict(prompt="the cat " * 200), 400, "prompt"),
        (dict(max_tokens=500), 400, "max_tokens"),
        (dict(temperature=-0.5), 400, "temperature"),
        (dict(temperature=3), 400, "temperature"),
        (dict(top_p=0), 400, "top_p"),
        (dict(max_tokens=0), 400, "max_tokens"),
        (dict(n=5), 400, "n"),  # more choices than rows (--max-batch 4)
        (dict(logprobs=21), 400, "logprobs"),
        (dict(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ],
)
def test_bad_requests_get_openai_errors(server, kw, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        server.client.completions.create(**({"model": "para", "prompt": "the cat", "max_tokens": 4} | kw))
    err = e.value.body
    assert e.value.status_code == status and err["param"] == param and err["type"] == "invalid_request_error"
    if kw.get("prompt") or kw.get("max_tokens") == 500:
        assert err["code"] == "context_length_exceeded"
    # ... and the server goes on serving.
    assert server.client.completions.create(model="para", prompt="the cat", max_tokens=2).usage.completion_tokens


def test_chat_over_the_context(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.chat.completions.create(model="base", messages=[{"role": "user", "content": "the cat " * 200}])
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"


def test_malformed_json(server):
    status, body = post(server.url + "/completions", b'{"model": "base", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(server.url + "/chat/completions", b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = post(server.url + "/no/such/path", b"{}")
    assert status == 404 and "no/such/path" in body["error"]["message"]


def test_disconnect_frees_row_and_overload_is_429(files):
    """One row, no queue: a second request while the first streams gets 429; a client that
    goes away mid-stream frees the row for the next."""
    s = Running(files, "--max-batch", "1", "--max-waiting", "0")
    try:
        stream = s.client.completions.create(
            model="lora", prompt="the cat", max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as e:
            s.client.completions.create(model="base", prompt="the cat", max_tokens=2)
        assert e.value.body["code"] == "rate_limit_exceeded"
        stream.close()  # the client goes away
        for _ in range(100):
            if s.server.engine.active() == 0:
                break
            time.sleep(0.05)
        assert s.server.engine.active() == 0
        assert s.client.completions.create(model="base", prompt="the cat", max_tokens=2).usage.completion_tokens
    finally:
        s.close()


def test_adapters_evicted_within_budget_still_serve(files):
    """A budget that holds one adapter: each request loads its own, evicting the other."""
    model_dir, adapters = files
    s = Running(files, "--adapter-memory", "0.001")
    try:
        for name in ("para", "lora", "para"):
            got = s.client.completions.create(model=name, prompt="sun moon", max_tokens=6, temperature=0)
            assert got.choices[0].text == alone(model_dir, adapters, name, "sun moon", 6)[0]
            assert list(s.server.pool.loaded) == [name]
    finally:
        s.close()


def test_sigterm_finishes_in_flight_requests(files):
    """SIGTERM while a request streams: it completes, then the process exits cleanly."""
    model_dir, adapters = files
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "minipara.serve",
            "--model",
            str(model_dir),
            "--adapters",
            str(adapters),
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:  # the refused adapter is reported first
            if "serving" in line:
                break
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        for _ in range(100):
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.1)
        stream = client.completions.create(
            model="para", prompt="the cat", max_tokens=150, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        it = iter(stream)
        pieces = [next(it).choices[0].text]
        proc.send_signal(signal.SIGTERM)
        for chunk in it:
            pieces.append(chunk.choices[0].text)
        assert chunk.choices[0].finish_reason == "length" and len("".join(pieces)) > 0
        # uvicorn re-raises the signal once it has shut down: the exit status is SIGTERM's.
        assert proc.wait(20) in (0, -signal.SIGTERM)
        assert "stopped, 0 unfinished requests cancelled" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_with_a_short_grace_ends_streams_with_an_error(files):
    """SIGTERM with --shutdown-timeout 0 while a stream runs: the stream ends with an error
    event (not a dropped connection) and the process exits."""
    model_dir, adapters = files
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "minipara.serve", "--model", str(model_dir), "--adapters", str(adapters)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--shutdown-timeout", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in proc.stdout:
            if "serving" in line:
                break
        for _ in range(100):  # "serving" is printed just before uvicorn listens
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except urllib.error.URLError:
                time.sleep(0.1)
        body = json.dumps(
            {"model": "base", "prompt": "the cat", "max_tokens": 240, "stream": True, "ignore_eos": True}
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
        )
        events = []
        with urllib.request.urlopen(req, timeout=60) as r:
            events.append(r.readline())
            proc.send_signal(signal.SIGTERM)
            for line in r:  # a dropped connection raises here instead of ending the loop
                if line.startswith(b"data:"):
                    events.append(line)
        assert any(b'"error"' in e for e in events[-2:]), events[-2:]
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_loadgen_runs(files, tmp_path):
    """The load generator starts its own server on random adapters and writes one row per run."""
    from minipara.bench import loadgen

    out = tmp_path / "load.jsonl"
    assert (
        loadgen.main(
            [
                "--model",
                str(files[0]),
                "--clients",
                "3",
                "--adapters",
                "2",
                "--methods",
                "base,mix",
                "--requests",
                "1",
                "--prompt-tokens",
                "8",
                "--max-tokens",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["clients"]) for r in rows] == [("base", 3), ("mix", 3)]
    assert all(r["tokens"] == 12 and r["tok_s"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] for r in rows)


def test_pool_warns_for_adapters_made_on_other_weights(tmp_path):
    """The server's pool checks the weights fingerprint as load_adapter does elsewhere: an
    adapter saved on other weights of the same architecture loads, with a warning."""
    import warnings

    from minipara.io.adapters import BaseModelWarning
    from minipara.serve.pool import AdapterPool

    args = tiny_args("llama")
    save_adapter(tmp_path / "mine.safetensors", build_adapter("para", args), args, weights_id="aaaa")
    save_adapter(tmp_path / "other.safetensors", build_adapter("para", args), args, weights_id="bbbb")
    pool = AdapterPool(tmp_path, args, "cpu", 2**30, weights_id="aaaa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pool.get("mine")
    with pytest.warns(BaseModelWarning, match="other weights"):
        pool.get("other")


def test_logprobs_n_and_seed(server, files):
    """n choices share one prefill, each from its own random stream of the seed (choice 0 is
    what generate.py gives for that seed); logprobs report the model's distribution."""
    c = server.client
    kw = dict(model="para", prompt="the cat", max_tokens=6, temperature=1.0, seed=11)
    first = [ch.text for ch in c.completions.create(n=3, **kw).choices]
    again = c.completions.create(n=3, **kw)
    assert [ch.text for ch in again.choices] == first and [ch.index for ch in again.choices] == [0, 1, 2]
    assert len(set(first)) > 1 and again.usage.completion_tokens == 18
    lm = _LMS.get(files[0]) or _LMS.setdefault(files[0], minipara.load(files[0]))
    ad = lm.load_adapter(files[1] / "para.safetensors")
    assert first[0] == lm.generate("the cat", adapter=ad, max_new_tokens=6, temperature=1.0, seed=11).text
    # Greedy: each token is the most likely one, and its logprob the largest of the top ones.
    got = c.completions.create(model="lora", prompt="the cat is", max_tokens=5, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == got.usage.completion_tokens == 5
    for tok, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # (up to 3: tokens that decode to the same text share a key, as in OpenAI's format)
        assert 1 <= len(top) <= 3 and v <= 0 and abs(v - max(top.values())) < 1e-5 and tok in top
    assert "".join(lp.tokens) == got.choices[0].text
    # Chat, streamed, two choices: every token's logprobs arrive with its choice's chunks.
    stream = c.chat.completions.create(
        model="lora",
        messages=[{"role": "user", "content": "red dog"}],
        max_tokens=4,
        temperature=0.8,
        seed=2,
        n=2,
        logprobs=True,
        top_logprobs=2,
        stream=True,
    )
    texts, entries = ["", ""], [[], []]
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            entries[ch.index] += ch.logprobs.content if ch.logprobs and ch.logprobs.content else []
    for text, es in zip(texts, entries):
        assert len(es) == 4 and "".join(e.token for e in es) == text
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in es)


# ---- issue 26: no client mistake is a 500; issue 25: health, metrics, request ids, adapters --------
DEEP = b'{"model": "base", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize(
    "raw, status, param",
    [
        (DEEP, 400, None),  # RecursionError in the parser
        (b'{"model": "base", "prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),  # digit limit
        (json.dumps({"model": "m" * 300, "prompt": "a"}).encode(), 404, "model"),  # file name too long
        (b'{"model": "base", "prompt": "the \\ud800 cat"}', 400, "prompt"),  # a lone surrogate
        (b'{"model": "base", "messages": [{"role": "user", "content": "\\udc00"}]}', 400, "messages"),
        (b'{"model": "base", "prompt": "a", "stop": ["\\ud800"]}', 400, "stop"),
        (b'{"model": "\\ud800", "prompt": "a"}', 400, "model"),
        (b'{"model": "base", "prompt": "a", "temperature": NaN}', 400, "temperature"),
        (b'{"model": "base", "prompt": "a", "top_p": NaN}', 400, "top_p"),
        (b'{"model": "base", "prompt": "a", "seed": 1180591620717411303424}', 400, "seed"),  # 2**70
        (b'{"model": "base", "prompt": "a", "n": 0}', 400, "n"),
        (b'{"model": "base", "prompt": "a", "best_of": 0}', 400, "best_of"),
        # the serving side's fields, through protocol.py too
        (b'{"model": "base", "prompt": "a", "seed": 9223372036854775808}', 400, "seed"),  # 2**63
        (b'{"model": "base", "prompt": "a", "n": 1e400}', 400, "n"),  # infinity
        (b'{"model": "base", "prompt": "a", "n": 5}', 400, "n"),  # over --max-batch 4
        (b'{"model": "base", "prompt": "a", "logprobs": -1}', 400, "logprobs"),
        (b'{"model": "base", "prompt": "a", "logprobs": true}', 400, "logprobs"),  # a count here
        (b'{"model": "base", "messages": [{"role": "user", "content": "a"}], "logprobs": 3}', 400, "logprobs"),
        (b'{"model": "base", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}', 400, "top_logprobs"),
        (
            b'{"model": "base", "messages": [{"role": "user", "content": "a"}], "logprobs": true, "top_logprobs": 21}',
            400,
            "top_logprobs",
        ),
        (b'{"model": "base", "prompt": "a", "ignore_eos": "yes"}', 400, "ignore_eos"),
        (b'{"model": "base", "prompt": "a", "stream_options": "yes"}', 400, "stream_options"),
    ],
)
def test_client_mistakes_are_4xx(server, raw, status, param):
    got, body = post(server.url + "/completions" if b"messages" not in raw else server.url + "/chat/completions", raw)
    assert got == status and body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error"


def test_tiny_temperature_is_greedy(server):
    """temperature 1e-300 is 0 as a float32: the sampler takes it as its limit, greedy."""
    c = server.client
    greedy = c.completions.create(model="lora", prompt="the cat", max_tokens=6, temperature=0).choices[0].text
    tiny = c.completions.create(model="lora", prompt="the cat", max_tokens=6, temperature=1e-300).choices[0].text
    assert tiny == greedy


def test_sampler_tiny_temperature():
    """generation.sample (which replaced _pick): a temperature that is 0 as a float32, or below
    float32's smallest normal number, samples as greedy, top-k and top-p or not."""
    from minipara.decode.generation import GenerationConfig, sample, sampling_rows, token_bits

    logits = torch.randn(3, 50)
    for t in (1e-300, 1e-45, torch.finfo(torch.float32).tiny / 2):
        for cfg in (
            GenerationConfig(temperature=t, seed=0),
            GenerationConfig(temperature=t, top_p=0.5, top_k=3, seed=0),
        ):
            temperature, top_k, top_p, key = sampling_rows(cfg, 3, "cpu")
            temperature = torch.full((3,), t, dtype=torch.float64)  # as given, not yet a float32
            for step in range(4):
                got = sample(
                    logits,
                    temperature,
                    top_k,
                    top_p,
                    key,
                    torch.full((3,), step),
                    token_bits(logits.shape[-1], logits.device),
                )
                assert torch.equal(got, logits.argmax(-1)), (t, cfg)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--port", "99999"], "--port"),
        (["--adapter-memory", "nan"], "--adapter-memory"),
        (["--context", "600"], "--context"),  # the tiny model has 256 positions
        (["--max-waiting", "-1"], "--max-waiting"),
        (["--prefill-budget", "-1"], "--prefill-budget"),
        (["--shutdown-timeout", "nan"], "--shutdown-timeout"),
        (["--max-body-mb", "0"], "--max-body-mb"),
        (["--header-timeout", "-1"], "--header-timeout"),
    ],
)
def test_bad_flags_refused(files, flags, words):
    from minipara.errors import UserError

    with pytest.raises(UserError, match=words):
        make_server(parse(["--model", str(files[0]), *flags]))


@pytest.fixture(scope="module")
def bad_folder(files, tmp_path_factory):
    """An adapter folder with one good adapter and every kind of bad file."""
    import os

    from minipara.io.adapters import load_adapter

    d = tmp_path_factory.mktemp("bad")
    shutil_copy = (files[1] / "lora.safetensors").read_bytes()
    (d / "good.safetensors").write_bytes(shutil_copy)
    (d / "dir.safetensors").mkdir()
    os.symlink(d / "nowhere", d / "dangling.safetensors")
    args = load_model(files[0], torch.float32, torch.device("cpu")).args
    ad = load_adapter(files[1] / "lora.safetensors", args)
    save_adapter(d / "template.safetensors", ad, args, template="no-such-template")
    # an adapter whose config asks for r=10**9 (hundreds of GB): the file's metadata edited
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(d / "good.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    config["r"] = 10**9
    save_file(tensors, str(d / "huge.safetensors"), {**meta, "config": json.dumps(config)})
    return files[0], d


def test_bad_adapter_files_are_skipped(bad_folder):
    s = Running(bad_folder)
    try:
        assert s.client.completions.create(model="good", prompt="the cat", max_tokens=2).usage.completion_tokens
        for name in ("template", "huge"):
            with pytest.raises(openai.BadRequestError) as e:
                s.client.completions.create(model=name, prompt="the cat", max_tokens=2)
            msg = e.value.body["message"]
            assert name in msg and str(bad_folder[1]) not in msg and "safetensors" not in msg, msg
        for name in ("dir", "dangling"):
            with pytest.raises(openai.NotFoundError):
                s.client.completions.create(model=name, prompt="the cat", max_tokens=2)
    finally:
        s.close()


def test_body_limits_and_timeouts(files):
    s = Running(files, "--max-body-mb", "0.01", "--header-timeout", "0.5", "--body-timeout", "0.5")
    try:
        status, body = post(s.url + "/completions", json.dumps({"model": "base", "prompt": "a " * 20000}).encode())
        assert status == 413, body
        host, port = s.url.split("//")[1].split("/")[0].split(":")
        idle = socket.create_connection((host, int(port)))
        slow = socket.create_connection((host, int(port)))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        idle.settimeout(5)
        slow.settimeout(5)
        assert idle.recv(100) == b""  # closed at the header deadline
        assert slow.recv(1000).startswith(b"HTTP/1.1 408")
        idle.close()
        slow.close()
    finally:
        s.close()


def test_health_metrics_request_id_models(server):
    from prometheus_client.parser import text_string_to_metric_families

    c = server.client
    raw = c.completions.with_raw_response.create(
        model="lora", prompt="the cat", max_tokens=4, extra_headers={"X-Request-Id": "abc-123"}
    )
    assert raw.headers["x-request-id"] == "abc-123"
    raw = c.completions.with_raw_response.create(model="lora", prompt="the cat", max_tokens=4)
    assert len(raw.headers["x-request-id"]) == 32  # made up
    models = {m.id: m for m in c.models.list()}
    assert models["lora"].parent == "base" and models["base"].parent is None
    base = server.url.removesuffix("/v1")
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("minipara:requests_total", (("model", "lora"),))] >= 2
    assert samples[("minipara:time_to_first_token_seconds_count", ())] >= 2
    assert samples[("minipara:generation_tokens_total", ())] >= 8
    assert ("minipara:num_requests_running", ()) in samples and ("minipara:adapters_resident", ()) in samples
    assert families["minipara:time_per_output_token_seconds"].type == "histogram"


def test_adapter_updates_only_with_the_flag(server, files, tmp_path):
    base = server.url
    assert post(base + "/load_lora_adapter", b'{"lora_name": "x"}')[0] == 404  # off by default
    s = Running(files, "--allow-adapter-updates")
    try:
        (tmp_path / "new.safetensors").write_bytes((files[1] / "para.safetensors").read_bytes())
        body = json.dumps({"lora_name": "tenant", "lora_path": str(tmp_path / "new.safetensors")}).encode()
        assert post(s.url + "/load_lora_adapter", body)[0] == 200
        assert "tenant" in [m.id for m in s.client.models.list()]
        assert s.client.completions.create(model="tenant", prompt="the cat", max_tokens=2).usage.completion_tokens
        assert post(s.url + "/unload_lora_adapter", b'{"lora_name": "tenant"}')[0] == 200
        with pytest.raises(openai.NotFoundError):
            s.client.completions.create(model="tenant", prompt="the cat", max_tokens=2)
        status, err = post(s.url + "/load_lora_adapter", json.dumps({"lora_name": "t2", "lora_path": "/nope"}).encode())
        assert status == 400 and err["error"]["param"] == "lora_path"
    finally:
        s.close()


def test_tokenising_runs_off_the_event_loop(server, monkeypatch):
    """A request whose prompt takes long to tokenise (a 20 MB prompt took 2 s) does not stall
    other clients: /health answers while it is being encoded."""
    slow_started, release = threading.Event(), threading.Event()
    encode = server.server.encode

    def slow(*args):
        slow_started.set()
        release.wait(10)
        return encode(*args)

    monkeypatch.setattr(server.server, "encode", slow)
    done = []
    t = threading.Thread(
        target=lambda: done.append(server.client.completions.create(model="base", prompt="the cat", max_tokens=2))
    )
    t.start()
    try:
        assert slow_started.wait(10)
        t0 = time.perf_counter()
        with urllib.request.urlopen(server.url.removesuffix("/v1") + "/health", timeout=5) as r:
            assert r.status == 200
        assert time.perf_counter() - t0 < 2
    finally:
        release.set()
        t.join(30)
    assert done and done[0].choices[0].text is not None
