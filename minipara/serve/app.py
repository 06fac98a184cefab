"""An OpenAI-compatible HTTP server: one base model, many tenants' adapters of any method.

    python -m minipara.serve --adapters adapters/ --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tenant-a", "prompt": "Water boils at", "max_tokens": 16, "temperature": 0}'

`POST /v1/completions`, `POST /v1/chat/completions` (both streamed as server-sent events
with `"stream": true`), `GET /v1/models` (each adapter's `parent` is the base), `GET /health`,
`GET /metrics` (Prometheus text), and with --allow-adapter-updates vLLM's
`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter`. Every response carries an
X-Request-Id (the client's, else a new one). The request's `model` names an adapter in the
--adapters folder (see pool.py) or the base model (--name, default "base").
Requests are served by continuous batching (engine.py): each joins the running batch
at the next step with its own adapter, sampling settings and stop conditions.

Errors are OpenAI-style bodies, {"error": {"message", "type", "param", "code"}} (protocol.py
checks every field): 400 for a malformed or invalid request (prompt over the context, bad
sampling values, bad JSON), 404 for an unknown model, 408/413 for a body too slow or too
large, 429 when --max-waiting requests already wait, 503 while shutting down. On SIGTERM
the server stops accepting connections, lets in-flight requests finish for up to
--shutdown-timeout seconds, then answers the rest with an error.

Sampling: `n` choices (up to --max-batch, sharing one prefill), `logprobs` (completions: 0 to
20 top tokens; chat: `logprobs` true and `top_logprobs` 0 to 20) and `seed` (each choice
draws from its own random stream of it, so a seeded request repeats, alone or in any batch).
Extensions beyond OpenAI's parameters: `top_k` and `ignore_eos` (as in vLLM).
"""

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from minipara import cli
from minipara.commands import model_args
from minipara.decode.compiled import PrefillGraphs
from minipara.decode.generation import Decoder, context_room
from minipara.errors import UserError
from minipara.io.checkpoints import parse_device, parse_dtype
from minipara.io.tokenizer import TEMPLATES, encode_conversation
from minipara.model.shapes import SHAPES, random_model
from minipara.serve import detokenize, protocol
from minipara.serve.engine import Engine, Overloaded, Request
from minipara.serve.metrics import Metrics
from minipara.serve.pool import AdapterPool
from minipara.serve.protocol import ApiError


def id_text(ids) -> str:
    """The text of generated ids for a model without a tokenizer: the ids, space-separated."""
    return "".join(f" {int(i)}" for i in ids)


class Server:
    """What the routes share: the engine, the adapters and, through the public API's
    LanguageModel `lm`, the tokenizer, templates and end markers (None for a random --shape
    model, which has no tokenizer: prompts are then token ids and the text is the ids)."""

    def __init__(
        self,
        engine: Engine,
        lm,
        pool,
        template: str = "auto",
        name: str = "base",
        context: int = 2048,
        max_body: int = 2**24,
        body_timeout: float = 30.0,
        adapter_updates: bool = False,
    ):
        self.engine, self.lm, self.pool, self.template, self.name = engine, lm, pool, template, name
        self.context, self.max_body, self.body_timeout = context, max_body, body_timeout
        self.adapter_updates = adapter_updates
        self.created = int(time.time())
        self.metrics = Metrics()

    # ---- reading a request ---------------------------------------------------------------
    async def body(self, http: HttpRequest) -> dict:
        """The JSON body, read within --body-timeout and --max-body: a slow or huge upload
        holds no connection and no memory for long."""
        size = http.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.max_body:
            raise ApiError(413, f"the request body has {size} bytes; this server takes at most {self.max_body}")

        async def read():
            chunks, n = [], 0
            async for chunk in http.stream():
                n += len(chunk)
                if n > self.max_body:
                    raise ApiError(413, f"the request body is over this server's limit of {self.max_body} bytes")
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            raw = await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s") from None
        return protocol.read_json(raw)

    async def adapter(self, name: str):
        if name == self.name:
            return None
        try:
            return await run_in_threadpool(self.pool.get, name)
        except KeyError:
            raise ApiError(
                404,
                f"the model {name!r} does not exist: GET /v1/models lists the base model and the adapters",
                param="model",
                code="model_not_found",
            ) from None
        except UserError as e:  # the pool's message names the adapter, not the server's files
            raise ApiError(400, str(e), param="model") from None

    def template_for(self, adapter, name: str) -> str:
        """The request's template, as generate.py chooses it (the adapter's training template...)."""
        if self.lm is None:
            return "none"
        try:
            return self.lm.template(self.template, [adapter])
        except UserError as e:  # an adapter whose file names a template this model cannot use
            raise ApiError(400, f"adapter {name!r} cannot be used: {e}", param="model") from None

    def eos_ids(self, template: str) -> tuple:
        return self.lm.stop_ids(template) if self.lm is not None else tuple(self.engine.model.args.eos_ids)

    def need_tokenizer(self, param: str):
        if self.lm is None:
            raise ApiError(
                400, "this server's model has no tokenizer: send the prompt as a list of token ids", param=param
            )

    def encode(self, body: dict, chat: bool, template: str) -> list[int]:
        """The request's prompt ids (run in a worker thread: a long prompt's tokenisation must
        not stall the event loop and every other client with it)."""
        if chat:
            turns = protocol.messages(body)
            self.need_tokenizer("messages")
            return encode_conversation(self.lm.tokenizer, template, turns)
        prompt = protocol.prompt(body, self.engine.model.args.vocab_size)
        if isinstance(prompt, list):
            return prompt
        self.need_tokenizer("prompt")
        return self.lm.encode_prompt(prompt, template)

    # ---- the routes ------------------------------------------------------------------------
    async def models(self, http: HttpRequest):
        card = {"object": "model", "created": self.created, "owned_by": "minipara"}
        base = {"id": self.name, **card, "root": self.name, "parent": None, "max_model_len": self.context}
        adapters = [
            {"id": n, **card, "root": n, "parent": self.name, "max_model_len": self.context}
            for n in await run_in_threadpool(self.pool.names)
        ]
        return JSONResponse({"object": "list", "data": [base, *adapters]})

    async def health(self, http: HttpRequest):
        """200 while the engine runs (vLLM's /health: for load balancers and orchestrators)."""
        thread = self.engine.thread
        if self.engine.stopping or thread is None or not thread.is_alive():
            return ApiError(503, "the engine is not running", kind="server_error").response()
        return Response(status_code=200)

    async def prometheus(self, http: HttpRequest):
        return Response(
            self.metrics.render(self.engine.stats(), self.pool), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    async def completions(self, http: HttpRequest):
        return await self.serve(http, chat=False)

    async def chat_completions(self, http: HttpRequest):
        return await self.serve(http, chat=True)

    async def stats(self, http: HttpRequest):
        """The engine's counters; ?since=N leaves out the first N prefill stalls."""
        since = http.query_params.get("since", "0")
        return JSONResponse(self.engine.stats(int(since) if since.isdigit() and len(since) < 10 else 0))

    async def load_adapter(self, http: HttpRequest):
        """POST {"lora_name", "lora_path"?}: serve an adapter file from now on (vLLM's
        /v1/load_lora_adapter), loaded now so a bad file is refused here. Off unless
        --allow-adapter-updates: it reads files of the server's choosing."""
        try:
            body = await self.body(http)
            name = protocol.text(body.get("lora_name"), "lora_name")
            path = body.get("lora_path")
            path = None if path is None else protocol.text(path, "lora_path")
            try:
                await run_in_threadpool(self.pool.add, name, path)
            except UserError as e:
                raise ApiError(400, str(e), param="lora_path" if path else "lora_name") from None
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "adapter", "id": name, "loaded": True})

    async def unload_adapter(self, http: HttpRequest):
        """POST {"lora_name"}: stop serving an adapter (vLLM's /v1/unload_lora_adapter)."""
        try:
            body = await self.body(http)
            name = protocol.text(body.get("lora_name"), "lora_name")
            if not await run_in_threadpool(self.pool.remove, name):
                raise ApiError(404, f"no adapter {name!r} is served", param="lora_name", code="model_not_found")
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "adapter", "id": name, "loaded": False})

    async def serve(self, http: HttpRequest, chat: bool):
        t0 = time.perf_counter()
        try:
            body = await self.body(http)
            name = protocol.model_name(body)
            adapter = await self.adapter(name)
            template = self.template_for(adapter, name)
            ids = await run_in_threadpool(self.encode, body, chat, template)
            n_pre = adapter.n_prefix if adapter is not None else 0
            room = min(context_room(self.context, len(ids), n_pre), self.engine.slots - n_pre - len(ids))
            cfg, stop, n, logprobs = protocol.sampling(
                body,
                len(ids),
                room,
                self.context,
                None if chat else 16,
                "messages" if chat else "prompt",
                self.eos_ids(template),
                self.engine.max_batch,
            )
            stream, usage_chunk = protocol.stream_options(body)
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            timing = self.metrics.request(name if adapter is not None else self.name, len(ids), t0, n)

            def emitter(i):
                def emit(kind, value):  # called from the engine's thread
                    timing.event(kind, i)
                    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                        loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))

                return emit

            reqs = [Request(ids, cfg, adapter, stop, emitter(i), logprobs) for i in range(n)]
            timing.reqs = reqs
            try:
                self.engine.submit(*reqs)
            except Overloaded as e:
                raise ApiError(
                    429,
                    f"the server is overloaded ({e}): retry later",
                    kind="rate_limit_exceeded",
                    code="rate_limit_exceeded",
                ) from None
            except RuntimeError as e:
                raise ApiError(503, str(e), kind="server_error", code="shutting_down") from None
        except UserError as e:  # the tokenizer's refusals (no room for a marker, ...)
            return ApiError(400, str(e)).response()
        except ApiError as e:
            return e.response()
        reply = Reply(name, chat, len(ids), self.engine.decode_text)
        if stream:
            return StreamingResponse(
                self.stream(http, reqs, events, reply, usage_chunk), media_type="text/event-stream"
            )
        text, reasons = [[] for _ in reqs], [None] * n
        try:
            while None in reasons:
                try:
                    i, kind, value = await asyncio.wait_for(events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if kind == "text":
                    text[i].append(value)
                elif kind == "done":
                    reasons[i] = value
                elif self.engine.stopping:
                    return ApiError(503, value, kind="server_error", code="shutting_down").response()
                else:
                    return ApiError(500, value, kind="server_error").response()
        finally:
            for req in reqs:
                req.cancel()  # a no-op once finished; frees the row if the client went away
        return JSONResponse(reply.whole(["".join(t) for t in text], reasons, reqs))

    async def stream(self, http, reqs, events, reply, usage_chunk):
        try:
            if reply.chat:
                for i in range(len(reqs)):
                    yield sse(reply.chunk({"role": "assistant", "content": ""}, None, i))
            done, told = 0, [0] * len(reqs)  # choices finished; tokens whose logprobs were sent
            while True:
                try:
                    i, kind, value = await asyncio.wait_for(events.get(), 1.0)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    continue
                if kind == "error":
                    yield sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                    return
                req, upto = reqs[i], len(reqs[i].logprobs_out)
                lp = reply.logprobs(req, told[i], upto)
                told[i] = upto
                if kind == "text":
                    yield sse(reply.chunk(value, None, i, lp))
                else:
                    yield sse(reply.chunk("" if not reply.chat else {}, value, i, lp))
                    done += 1
                    if done == len(reqs):
                        if usage_chunk:
                            yield sse(reply.usage_chunk(sum(len(r.tokens) for r in reqs)))
                        yield "data: [DONE]\n\n"
                        return
        finally:
            for req in reqs:
                req.cancel()


class Reply:
    """OpenAI's response shapes for one request: whole, or as stream chunks."""

    def __init__(self, model: str, chat: bool, n_prompt: int, decode_text):
        self.model, self.chat, self.n_prompt, self.decode_text = model, chat, n_prompt, decode_text
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, n: int) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": n, "total_tokens": self.n_prompt + n}

    def logprobs(self, req, start: int = 0, end: int | None = None) -> dict | None:
        """OpenAI's logprobs object for the request's tokens [start, end), None if not asked."""
        if req.logprobs is None:
            return None
        end = len(req.logprobs_out) if end is None else end

        def piece(j, t):  # what token t adds to the text before it
            return detokenize.piece(req.tokens, j, t, self.decode_text)

        rows = [
            (piece(j, req.tokens[j]), lp, [(piece(j, t), v) for t, v in top])
            for j, (lp, top) in enumerate(req.logprobs_out[start:end], start)
        ]
        if self.chat:
            entry = lambda s, lp: {"token": s, "logprob": lp, "bytes": list(s.encode())}  # noqa: E731
            return {"content": [{**entry(s, lp), "top_logprobs": [entry(t, v) for t, v in top]} for s, lp, top in rows]}
        offsets = [sum(len(s) for s, _, _ in rows[:j]) for j in range(len(rows))]
        return {
            "tokens": [s for s, _, _ in rows],
            "token_logprobs": [lp for _, lp, _ in rows],
            "top_logprobs": [dict(reversed(top)) for _, _, top in rows],  # a shared key keeps the likeliest
            "text_offset": offsets,
        }

    def whole(self, texts: list, reasons: list, reqs: list) -> dict:
        n = sum(len(r.tokens) for r in reqs)
        if self.chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": self.logprobs(req),
                    "finish_reason": reason,
                }
                for i, (text, reason, req) in enumerate(zip(texts, reasons, reqs))
            ]
            return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(n)}
        choices = [
            {"index": i, "text": text, "logprobs": self.logprobs(req), "finish_reason": reason}
            for i, (text, reason, req) in enumerate(zip(texts, reasons, reqs))
        ]
        return {**self._head("text_completion"), "choices": choices, "usage": self.usage(n)}

    def chunk(self, piece, reason, index: int = 0, logprobs=None) -> dict:
        """piece: new text (completions), or the chat delta (a dict, or text for its content)."""
        if self.chat:
            delta = piece if isinstance(piece, dict) else {"content": piece}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        return {
            **self._head("text_completion"),
            "choices": [{"index": index, "text": piece, "logprobs": logprobs, "finish_reason": reason}],
        }

    def usage_chunk(self, n: int) -> dict:
        return {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [],
            "usage": self.usage(n),
        }


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class RequestId:
    """ASGI middleware: every response carries X-Request-Id, the client's (when it is a short
    printable token) or a new one, so a client's log and the server's name the same request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        rid = given if 0 < len(given) <= 128 and given.isascii() and given.decode().isprintable() else None
        rid = rid or uuid.uuid4().hex.encode()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid)]
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_app(server: Server) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        # uvicorn has stopped accepting connections and waited for in-flight requests (up to
        # --shutdown-timeout); whatever is left is cancelled here.
        cancelled = server.engine.stop()
        print(f"minipara: stopped, {cancelled} unfinished requests cancelled", flush=True)

    async def http_error(http, exc):  # unknown path, wrong method: OpenAI's body too
        return ApiError(exc.status_code, f"{http.method} {http.url.path}: {exc.detail}").response()

    async def server_error(http, exc):  # a bug: the traceback goes to the log, the client gets a body
        return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()

    routes = [
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.prometheus, methods=["GET"]),
        Route("/stats", server.stats, methods=["GET"]),
    ]
    if server.adapter_updates:
        routes += [
            Route("/v1/load_lora_adapter", server.load_adapter, methods=["POST"]),
            Route("/v1/unload_lora_adapter", server.unload_adapter, methods=["POST"]),
        ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(RequestId)],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


class HeadTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's head (request line and
    headers): uvicorn times out idle keep-alive connections only after a first response, and
    any byte restarts that timer, so a client trickling a header a byte at a time, or never
    sending one, would hold its connection for ever. Past the deadline the connection is closed."""

    head_timeout = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def _arm(self):
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _head_late(self):
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self):
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._head_timer.cancel()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            self._head_timer.cancel()
            self._arm()  # the next request on this connection has the same deadline

    def connection_lost(self, exc):
        self._head_timer.cancel()
        super().connection_lost(exc)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose shutdown answers what is still running when --shutdown-timeout
    ends: the engine stops and each unfinished request gets an error body (503, or an error
    event in its stream) before uvicorn, a moment later, closes the connections."""

    def __init__(self, config, server: Server, grace: float):
        super().__init__(config)
        self.minipara, self.grace = server, grace

    async def shutdown(self, sockets=None):
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.grace, lambda: loop.run_in_executor(None, self.minipara.engine.stop))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def uvicorn_server(server: Server, a, **config) -> GracefulServer:
    """The uvicorn server for parsed flags (config: uvicorn.Config's, e.g. host and port)."""
    HeadTimeoutProtocol.head_timeout = a.header_timeout
    cfg = uvicorn.Config(
        build_app(server),
        log_level="warning",
        http=HeadTimeoutProtocol,
        timeout_keep_alive=max(1, int(a.header_timeout)),
        # uvicorn's own deadline comes after ours: by then every request has had its answer
        timeout_graceful_shutdown=a.shutdown_timeout + 5,
        **config,
    )
    return GracefulServer(cfg, server, a.shutdown_timeout)


def buckets(text: str) -> list[int]:
    """--buckets: a comma-separated list of batch sizes, each at least 1 (argparse type)."""
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"needs batch sizes of at least 1, got {text!r}")
    return sizes


def parse(argv=None):
    p = cli.Parser(
        prog="python -m minipara.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model_args.add_model_args(p)
    p.add_argument(
        "--shape",
        help="serve a randomly initialised model of this shape instead of --model "
        "(load tests: prompts are token ids), e.g. llama-2-7b",
    )
    p.add_argument("--adapters", help="folder of adapters (NAME.safetensors files, PEFT directories)")
    p.add_argument("--name", default="base", help="the base model's name in requests (default: base)")
    p.add_argument("--template", default="auto", help=f"{' | '.join(TEMPLATES)} | auto (as generate.py)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 to 65535 (0: any free port)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoded together (default 8)")
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="longest prompt plus completion, in tokens (default: the model's, at most 2048)",
    )
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued beyond the batch before 429")
    p.add_argument(
        "--prefill-budget",
        type=int,
        default=512,
        help="prompt tokens prefilled between two decode steps (at least one request)",
    )
    p.add_argument("--adapter-memory", type=cli.finite, default=1024, help="MiB of adapters kept loaded")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the decode step for every batch bucket at start-up (default: on CUDA only)",
    )
    p.add_argument(
        "--buckets",
        type=buckets,
        default="1,2,4,8,16,24,32,48,64,96,128",
        help="batch sizes the step runs at (the rows in use are padded up to the next; --max-batch is added)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=cli.finite,
        default=30,
        help="seconds in-flight requests get to finish after SIGTERM; then they get an error",
    )
    p.add_argument(
        "--header-timeout", type=cli.finite, default=10, help="seconds a client has to send a request's headers"
    )
    p.add_argument("--body-timeout", type=cli.finite, default=30, help="seconds a client has to send a request's body")
    p.add_argument("--max-body-mb", type=cli.finite, default=16, help="largest request body, in MiB (default 16)")
    p.add_argument(
        "--allow-adapter-updates",
        action="store_true",
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (they read server files)",
    )
    a = p.parse_args(argv)
    for flag, lo in (
        ("max_batch", 1),
        ("max_waiting", 0),
        ("prefill_budget", 1),
        ("adapter_memory", 0),
        ("shutdown_timeout", 0),
    ):
        if getattr(a, flag) < lo:
            p.error(f"--{flag.replace('_', '-')} must be at least {lo}, got {getattr(a, flag)}")
    for flag in ("header_timeout", "body_timeout", "max_body_mb"):
        if getattr(a, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be above 0, got {getattr(a, flag)}")
    if not 0 <= a.port <= 65535:
        p.error(f"--port must be between 0 and 65535, got {a.port}")
    return a


def make_server(a) -> Server:
    """The model (through the public API), adapters and engine for parsed arguments."""
    if a.shape and a.model:
        raise UserError("give --model or --shape, not both")
    if a.adapters is not None and not os.path.isdir(a.adapters):
        raise UserError(f"--adapters {a.adapters} is not a folder")
    if a.shape:
        if a.shape not in SHAPES:
            raise UserError(f"unknown --shape {a.shape!r}; known: {', '.join(SHAPES)}")
        lm, model = None, random_model(a.shape, parse_dtype(a.dtype), parse_device(a.device))
        decoder, text = Decoder(model), id_text
    else:
        lm = model_args.load_lm(a)
        lm.template(a.template)  # an unknown name fails now, not at the first request
        model, decoder, text = lm.model, lm.decoder, lm.tokenizer.decode
    limit = model.args.max_seq_len
    context = a.context or min(limit, 2048)
    if not 2 <= context <= limit:
        raise UserError(f"--context must be between 2 and the model's {limit} positions, got {context}")
    pool = AdapterPool(
        a.adapters, model.args, model.tok_embeddings.weight.device, int(a.adapter_memory * 2**20), model.weights_id
    )
    pool.preload()
    compiled = a.compile if a.compile is not None else model.tok_embeddings.weight.is_cuda
    if compiled and model.tok_embeddings.weight.is_cuda:
        # A prefill shape met again is replayed from a CUDA graph of the eager prefill (one
        # launch for its thousands of small kernels), never compiled: prompt shapes are not
        # known at start-up, and compiling one while serving would stall every decoding row
        # for the whole compilation. (The engine compiles its own step.)
        decoder.run_prefill = PrefillGraphs(decoder.run_prefill, decoder.run_prefill)
    # Slots beyond the context leave room for prefix entries and for rows joining below the
    # shared slot before the cache must be compacted (engine.py).
    slots = -(-(context + context // 2 + 64) // 128) * 128
    engine = Engine(
        model,
        text,
        max_batch=a.max_batch,
        slots=slots,
        max_waiting=a.max_waiting,
        prefill_budget=a.prefill_budget,
        decoder=decoder,
        buckets=a.buckets,
        compile="inductor" if compiled else None,
    )
    took = engine.warmup(list(pool.loaded.values()))
    print(f"minipara: warmed up in {took:.1f} s ({'compiled' if compiled else 'eager'})", file=sys.stderr, flush=True)
    return Server(
        engine,
        lm,
        pool,
        a.template,
        a.name,
        context,
        max_body=int(a.max_body_mb * 2**20),
        body_timeout=a.body_timeout,
        adapter_updates=a.allow_adapter_updates,
    )


def main(argv=None):
    a = parse(argv)
    server = make_server(a)
    print(f"minipara: serving {a.name} with adapters {server.pool.names()} on http://{a.host}:{a.port}/v1", flush=True)
    uvicorn_server(server, a, host=a.host, port=a.port).run()
    return 0
