"""Load generator for the server: aggregate tokens/s and per-request latency under concurrent clients.

    python -m minipara.bench.loadgen --shape llama-2-7b --dtype bfloat16 --device cuda
    python -m minipara.bench.loadgen --model DIR --clients 1,4 --adapters 1,4 --prompt-tokens 32 --max-tokens 8

It writes random adapters (LoRA and PARA, as the papers configure them) into a temporary
folder, starts `python -m minipara.serve` on them (127.0.0.1), and for every combination of
--clients, --adapters and --methods runs that many closed-loop clients, each sending
--requests streamed completions one after another: a fixed prompt of --prompt-tokens token
ids, exactly --max-tokens new tokens (ignore_eos), greedy. Request i of a run uses adapter
i mod A; "mix" alternates LoRA and PARA adapters (A >= 2), "base" uses none.

Reported per run: aggregate completion tokens/s over the run's wall time, time to first
token (TTFT) and time per output token after the first (TPOT) at p50/p99 over requests,
the largest gap between two tokens of one request, and the server's prefill stalls
(time decoding rows waited for newcomers' prefills, GET /stats).

The client speaks HTTP/1.1 through h11 (uvicorn's own protocol library) on asyncio
streams, so it runs wherever the server does, without an HTTP client package.
"""

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h11
import torch

from minipara.bench.speed import SHAPES, prompt_ids
from minipara.errors import UserError
from minipara.io.adapters import save_adapter
from minipara.methods import build_adapter
from minipara.model.config import ModelArgs


async def http(host: str, port: int, method: str, target: str, body: dict | None = None, on_data=None):
    """(status, body bytes) of one request on a fresh connection; on_data(bytes) sees each piece."""
    reader, writer = await asyncio.open_connection(host, port)
    conn = h11.Connection(h11.CLIENT)
    data = json.dumps(body).encode() if body is not None else b""
    headers = [("Host", f"{host}:{port}"), ("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    writer.write(conn.send(h11.Request(method=method, target=target, headers=headers)))
    writer.write(conn.send(h11.Data(data=data)) + conn.send(h11.EndOfMessage()))
    await writer.drain()
    status, out = None, bytearray()
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                out += event.data
                if on_data is not None:
                    on_data(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(out)
    finally:
        writer.close()


async def one_request(host, port, body) -> dict:
    """Stream one completion; its TTFT, token times and token count."""
    t0, times, buf, usage = time.perf_counter(), [], b"", {}

    def on_data(piece):
        nonlocal buf, usage
        buf += piece
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            chunk = json.loads(event[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk.get("choices") and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
            elif "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])

    status, raw = await http(host, port, "POST", "/v1/completions", body, on_data)
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {raw[:300]!r}")
    n = usage.get("completion_tokens", len(times))
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {
        "ttft": times[0] - t0,
        "tpot": (times[-1] - times[0]) / max(1, n - 1),
        "tokens": n,
        "max_gap": max(gaps, default=0.0),
    }


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run_load(host, port, clients: int, requests: int, names: list, prompt: list, max_tokens: int) -> dict:
    """`clients` closed-loop clients, `requests` each; request i uses adapter names[i % len]."""
    _, raw = await http(host, port, "GET", "/stats")
    since = json.loads(raw)["prefill_stalls"]
    results = []

    async def client(c):
        for j in range(requests):
            name = names[(c * requests + j) % len(names)]
            body = {
                "model": name,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
            results.append(await one_request(host, port, body))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    _, raw = await http(host, port, "GET", f"/stats?since={since}")
    stats = json.loads(raw)
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tok_s": round(tokens / wall, 1),
        **{
            f"{k}_p{int(q * 100)}_ms": round(1000 * pct([r[k] for r in results], q), 1)
            for k in ("ttft", "tpot")
            for q in (0.5, 0.99)
        },
        "max_gap_ms": round(1000 * max(r["max_gap"] for r in results), 1),
        "stall_p99_ms": round(1000 * stats["stall_p99_s"], 1),
        "stall_max_ms": round(1000 * stats["stall_max_s"], 1),
    }


def tenant_names(method: str, n: int) -> list[str]:
    if method == "base":
        return ["base"]
    if method == "mix":
        return [f"{'lora' if k % 2 == 0 else 'para'}-{k // 2}" for k in range(n)]
    return [f"{method}-{k}" for k in range(n)]


def write_adapters(folder: Path, args, methods: set, n: int):
    """n random adapters per method (LoRA and PARA as the papers configure them); tensors left
    at a constant init get noise, so none is trivially the identity."""
    for method in sorted(methods):
        for k in range(n):
            torch.manual_seed(k)
            ad = build_adapter(method, args)
            with torch.no_grad():
                for p in ad.parameters():
                    if p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                        p.normal_(0, 0.01)
            save_adapter(folder / f"{method}-{k}.safetensors", ad, args)


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m minipara.bench.loadgen",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--shape", help="a random model of this shape (see minipara/benchmark.py), e.g. llama-2-7b")
    g.add_argument("--model", help="an HF-format model directory")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--adapters", default="1,4,16")
    p.add_argument("--methods", default="base,lora,para,mix")
    p.add_argument("--requests", type=int, default=2, help="requests per client in each run")
    p.add_argument("--prompt-tokens", type=int, default=274)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prefill-budget", type=int, default=512)
    p.add_argument("--compile", action="store_true", help="start the server with --compile (its default on CUDA)")
    p.add_argument("--buckets", help="the server's --buckets (batch sizes its step is compiled for)")
    p.add_argument("--out", help="also write one JSON line per run to this file")
    return p.parse_args(argv)


def main(argv=None):
    a = parse(argv)
    clients = [int(x) for x in a.clients.split(",")]
    counts = [int(x) for x in a.adapters.split(",")]
    methods = a.methods.split(",")
    bad = sorted(set(methods) - {"base", "lora", "para", "mix"})
    if bad:
        raise UserError(f"--methods: unknown {bad[0]!r}; choose among base, lora, para, mix")
    if a.shape and a.shape not in SHAPES:
        raise UserError(f"unknown --shape {a.shape!r}; known: {', '.join(SHAPES)}")
    args = ModelArgs(**SHAPES[a.shape]) if a.shape else ModelArgs.from_dir(a.model)
    prompt = prompt_ids(None, args.bos_id, min(args.vocab_size, 32000), a.prompt_tokens)
    with tempfile.TemporaryDirectory(prefix="minipara-loadgen-") as tmp, socket.socket() as sock:
        folder = Path(tmp)
        t = time.perf_counter()
        write_adapters(
            folder,
            args,
            {m for m in methods if m in ("lora", "para")} | ({"lora", "para"} if "mix" in methods else set()),
            max(counts),
        )
        print(f"adapters written in {time.perf_counter() - t:.1f} s", flush=True)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        cmd = [
            sys.executable,
            "-m",
            "minipara.serve",
            *(["--shape", a.shape] if a.shape else ["--model", a.model]),
            "--dtype",
            a.dtype,
            "--device",
            a.device,
            "--adapters",
            str(folder),
            "--port",
            str(port),
            "--max-batch",
            str(max(clients)),
            "--context",
            str(a.prompt_tokens + a.max_tokens),
            "--max-waiting",
            "1024",
            "--adapter-memory",
            "1000000",
            "--prefill-budget",
            str(a.prefill_budget),
            *(["--compile"] if a.compile else []),
            *(["--buckets", a.buckets] if a.buckets else []),
        ]
        server = subprocess.Popen(cmd)
        try:
            rows = asyncio.run(_runs(a, port, server, clients, counts, methods, prompt))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    print(
        f"\n`python -m minipara.bench.loadgen {' '.join(sys.argv[1:] if argv is None else argv)}`; "
        f"{torch.cuda.get_device_name() if torch.cuda.is_available() and 'cuda' in a.device else 'CPU'}, "
        f"{time.strftime('%Y-%m-%d')}\n"
    )
    keys = [
        "method",
        "adapters",
        "clients",
        "tok_s",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "tpot_p50_ms",
        "tpot_p99_ms",
        "max_gap_ms",
        "stall_p99_ms",
    ]
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")
    if a.out:
        with open(a.out, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


async def _runs(a, port, server, clients, counts, methods, prompt) -> list[dict]:
    host = "127.0.0.1"
    for _ in range(1200):  # the server loads the model (minutes for a 7B shape on a slow disk)
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with status {server.returncode}")
        try:
            if (await http(host, port, "GET", "/v1/models"))[0] == 200:
                break
        except OSError:
            await asyncio.sleep(0.5)
    # Warm-up: every tenant once (first use of shapes and adapters), not measured.
    names = sorted({n for m in methods for c in counts for n in tenant_names(m, c)})
    await run_load(host, port, len(names), 1, names, prompt, a.max_tokens)
    rows = []
    for method in methods:
        for n in [1] if method == "base" else [n for n in counts if method != "mix" or n > 1]:
            for c in clients:
                r = {
                    "method": method,
                    "adapters": n if method != "base" else 0,
                    "clients": c,
                    **await run_load(host, port, c, a.requests, tenant_names(method, n), prompt, a.max_tokens),
                }
                print(json.dumps(r), flush=True)
                rows.append(r)
    return rows


if __name__ == "__main__":
    from minipara.cli import run

    run(main)
