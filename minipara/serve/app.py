"""An OpenAI-compatible HTTP server: one base model, many tenants' adapters of any method.

    python -m minipara.serve --adapters adapters/ --port 8000
    curl localhost:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tenant-a", "prompt": "Water boils at", "max_tokens": 16, "temperature": 0}'

`POST /v1/completions`, `POST /v1/chat/completions` (both streamed as server-sent events
with `"stream": true`), `GET /v1/models`. The request's `model` names an adapter in the
--adapters folder (see adapter_pool.py) or the base model (--name, default "base").
Requests are served by continuous batching (engine.py): each joins the running batch
at the next step with its own adapter, sampling settings and stop conditions.

Errors are OpenAI-style bodies, {"error": {"message", "type", "param", "code"}}: 400 for a
malformed or invalid request (prompt over the context, bad sampling values, bad JSON),
404 for an unknown model, 429 when --max-waiting requests already wait, 503 while
shutting down. On SIGTERM the server stops accepting connections, lets in-flight
requests finish for up to --shutdown-timeout seconds, then cancels the rest.

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

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from minipara.decode.generation import GenerationConfig
from minipara.errors import UserError
from minipara.serve.engine import TOP_LOGPROBS, Engine, Overloaded, Request


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}},
            status_code=self.status,
        )


def id_text(ids) -> str:
    """The text of generated ids for a model without a tokenizer: the ids, space-separated."""
    return "".join(f" {int(i)}" for i in ids)


class Server:
    """What the routes share: the engine, the adapters and, through the public API's
    LanguageModel `lm`, the tokenizer, templates and end markers (None for a random --shape
    model, which has no tokenizer: prompts are then token ids and the text is the ids)."""

    def __init__(self, engine: Engine, lm, pool, template: str = "auto", name: str = "base", context: int = 2048):
        self.engine, self.lm, self.pool, self.template, self.name = engine, lm, pool, template, name
        self.context = context
        self.created = int(time.time())

    def need_tokenizer(self, param: str):
        if self.lm is None:
            raise ApiError(
                400, "this server's model has no tokenizer: send the prompt as a list of token ids", param=param
            )

    # ---- reading a request ---------------------------------------------------------------
    async def body(self, http: HttpRequest) -> dict:
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def adapter(self, body: dict):
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required: the base model's name or an adapter's", param="model")
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
        except UserError as e:
            raise ApiError(400, f"adapter {name!r} cannot be used: {e}", param="model") from None

    def template_for(self, adapter) -> str:
        """The request's template, as generate.py chooses it (the adapter's training template...)."""
        return self.lm.template(self.template, [adapter]) if self.lm is not None else "none"

    def sampling(
        self, body: dict, adapter, n_prompt: int, default_max, prompt_param: str
    ) -> tuple[GenerationConfig, tuple, int, int | None]:
        """The request's GenerationConfig, stop strings, n (choices) and logprobs (None, or
        how many top tokens to report with each token's log-probability), every value checked."""

        def number(key, default, lo, hi, lo_open=False):
            v = body.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo or v > hi or (lo_open and v == lo):
                raise ApiError(
                    400, f"{key} must be a number {'>' if lo_open else '>='} {lo} and <= {hi}, got {v!r}", param=key
                )
            return v

        def integer(key, default, lo, hi=float("inf")):
            v = body.get(key)
            if v is None:
                return default
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                most = f" and <= {hi}" if hi < float("inf") else ""
                raise ApiError(400, f"{key} must be an integer >= {lo}{most}, got {v!r}", param=key)
            return v

        n = integer("n", 1, 1, self.engine.max_batch)
        if prompt_param == "messages":  # chat: logprobs true/false, top_logprobs the count
            if body.get("logprobs") not in (None, True, False):
                raise ApiError(400, f"logprobs must be true or false, got {body['logprobs']!r}", param="logprobs")
            top = integer("top_logprobs", 0, 0, TOP_LOGPROBS)
            if body.get("top_logprobs") is not None and not body.get("logprobs"):
                raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
            logprobs = top if body.get("logprobs") else None
        else:
            logprobs = integer("logprobs", None, 0, TOP_LOGPROBS)

        for key, neutral in (
            ("best_of", 1),
            ("presence_penalty", 0),
            ("frequency_penalty", 0),
            ("echo", False),
            ("logit_bias", None),
            ("suffix", None),
        ):
            if body.get(key) not in (None, neutral, False, {}):
                raise ApiError(400, f"{key}={body[key]!r} is not supported by this server", param=key)
        n_pre = adapter.n_prefix if adapter is not None else 0
        room = min(self.context - n_prompt, self.engine.slots - n_pre - n_prompt)
        if room < 1:
            raise ApiError(
                400,
                f"this model's maximum context length is {self.context} tokens and the prompt "
                f"has {n_prompt}: shorten it",
                param=prompt_param,
                code="context_length_exceeded",
            )
        max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_new = integer(max_key, min(default_max, room) if default_max else room, 1)
        if max_new > room:
            raise ApiError(
                400,
                f"this model's maximum context length is {self.context} tokens; the request "
                f"has {n_prompt} prompt tokens and asks for {max_new} more: shorten the prompt "
                f"or lower {max_key}",
                param=max_key,
                code="context_length_exceeded",
            )
        temperature = number("temperature", 1.0, 0, 2)
        top_p = number("top_p", 1.0, 0, 1, lo_open=True)
        top_k = integer("top_k", 0, 0)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
        stop = body.get("stop") or ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
        eos = () if body.get("ignore_eos") else self.eos_ids(self.template_for(adapter))
        cfg = GenerationConfig(
            max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_ids=eos
        )
        return cfg, tuple(stop), n, logprobs

    def eos_ids(self, template: str) -> tuple:
        return self.lm.stop_ids(template) if self.lm is not None else tuple(self.engine.model.args.eos_ids)

    def prompt_ids(self, prompt, template: str) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            self.need_tokenizer("prompt")
            if not prompt.strip():
                raise ApiError(400, "prompt is empty: give some text to continue", param="prompt")
            return self.lm.encode_prompt(prompt, template)
        vocab = self.engine.model.args.vocab_size
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt)
        ):
            return list(prompt)
        raise ApiError(
            400,
            f"prompt must be a string or a non-empty list of token ids in [0, {vocab}) (one prompt per request)",
            param="prompt",
        )

    def chat_ids(self, messages, template: str) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        turns = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            role = m.get("role") if isinstance(m, dict) else None
            if role not in ("system", "developer", "user", "assistant") or not isinstance(content, str):
                raise ApiError(
                    400, "each message needs a role (system, user or assistant) and text content", param="messages"
                )
            turns.append(("system" if role == "developer" else role, content))
        if turns[-1][0] != "user":
            raise ApiError(400, "the last message must be the user's", param="messages")
        self.need_tokenizer("messages")
        return chat_prompt(self.lm.tokenizer, template, turns)

    # ---- the routes ------------------------------------------------------------------------
    async def models(self, http: HttpRequest):
        names = [self.name] + await run_in_threadpool(self.pool.names)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": n, "object": "model", "created": self.created, "owned_by": "minipara"} for n in names],
            }
        )

    async def completions(self, http: HttpRequest):
        return await self.serve(http, chat=False)

    async def chat_completions(self, http: HttpRequest):
        return await self.serve(http, chat=True)

    async def stats(self, http: HttpRequest):
        """The engine's counters; ?since=N leaves out the first N prefill stalls."""
        since = http.query_params.get("since", "0")
        return JSONResponse(self.engine.stats(int(since) if since.isdigit() else 0))

    async def serve(self, http: HttpRequest, chat: bool):
        try:
            body = await self.body(http)
            adapter = await self.adapter(body)
            template = self.template_for(adapter)
            if chat:
                ids = self.chat_ids(body.get("messages"), template)
            else:
                if "prompt" not in body:
                    raise ApiError(400, "'prompt' is required", param="prompt")
                ids = self.prompt_ids(body["prompt"], template)
            cfg, stop, n, logprobs = self.sampling(
                body, adapter, len(ids), None if chat else 16, "messages" if chat else "prompt"
            )
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise ApiError(400, "stream must be true or false", param="stream")
            options = body.get("stream_options") or {}
            usage_chunk = isinstance(options, dict) and bool(options.get("include_usage"))
            loop, events = asyncio.get_running_loop(), asyncio.Queue()

            def emitter(i):
                def emit(kind, value):  # called from the engine's thread
                    with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
                        loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))

                return emit

            reqs = [Request(ids, cfg, adapter, stop, emitter(i), logprobs) for i in range(n)]
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
        except ApiError as e:
            return e.response()
        reply = Reply(self.name if adapter is None else body["model"], chat, len(ids), self.engine.decode_text)
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

        # A token's text is what it adds to the text before it (a lone token decodes without
        # the space a SentencePiece word starts with), so the tokens join into the text.
        def piece(j, t):
            before = req.tokens[:j]
            return self.decode_text([*before, t])[len(self.decode_text(before)) :]

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


def chat_prompt(tok, template: str, turns: list[tuple[str, str]]) -> list[int]:
    """Token ids of a conversation in the model family's chat format (tokenizer.py's templates,
    extended to several turns); one user message gives exactly encode_example's prompt."""
    from minipara.io.tokenizer import LLAMA2_SYSTEM, encode_chat, encode_example

    if template in ("chatml", "llama3"):  # tokenizer.json chat models: their own template, all roles
        return encode_chat(tok, template, [{"role": r, "content": c} for r, c in turns])
    system = "\n\n".join(c for r, c in turns if r == "system")
    turns = [(r, c) for r, c in turns if r != "system"]
    if template == "none":  # a base model: the conversation as plain text
        return encode_example(tok, "none", "\n".join(([system] if system else []) + [c for _, c in turns]))[0]
    if template == "gemma":  # Gemma has no system role: it goes before the first user turn
        text = ""
        for i, (role, c) in enumerate(turns):
            if i == 0 and system:
                c = f"{system}\n\n{c}"
            text += f"<start_of_turn>{'user' if role == 'user' else 'model'}\n{c}<end_of_turn>\n"
        return [tok.bos_id] + tok.encode(text + "<start_of_turn>model\n")
    if template == "llama2":  # [INST] user [/INST] answer </s><s>[INST] ...
        ids, sys_block = [], f"<<SYS>>\n{system or LLAMA2_SYSTEM}\n<</SYS>>\n\n"
        for i, (role, c) in enumerate(turns):
            if role == "user":
                ids += [tok.bos_id] + tok.encode(f"[INST] {sys_block if i == 0 else ''}{c} [/INST]")
            else:
                ids += tok.encode(f" {c} ") + [tok.eos_id]
        return ids
    raise ApiError(400, f"no chat format for template {template!r}")


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
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

    return Starlette(
        routes=[
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/v1/completions", server.completions, methods=["POST"]),
            Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
            Route("/stats", server.stats, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


def parse(argv=None):
    from minipara import cli

    p = argparse.ArgumentParser(
        prog="python -m minipara.serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cli.add_model_args(p)
    p.add_argument(
        "--shape",
        help="serve a randomly initialised model of this shape instead of --model "
        "(load tests: prompts are token ids), e.g. llama-2-7b",
    )
    p.add_argument("--adapters", help="folder of adapters (NAME.safetensors files, PEFT directories)")
    p.add_argument("--name", default="base", help="the base model's name in requests (default: base)")
    p.add_argument("--template", default="auto", help="llama2 | gemma | none | auto (as generate.py)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
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
    p.add_argument("--adapter-memory", type=float, default=1024, help="MiB of adapters kept loaded")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the decode step for every batch bucket at start-up (default: on CUDA only)",
    )
    p.add_argument(
        "--buckets",
        default="1,2,4,8,16,24,32,48,64,96,128",
        help="batch sizes the step runs at (the rows in use are padded up to the next; --max-batch is added)",
    )
    p.add_argument(
        "--shutdown-timeout", type=float, default=30, help="seconds in-flight requests get to finish after SIGTERM"
    )
    return p.parse_args(argv)


def make_server(a) -> Server:
    """The model (through the public API), adapters and engine for parsed arguments."""
    from minipara import cli
    from minipara.io.checkpoints import parse_device, parse_dtype
    from minipara.serve.pool import AdapterPool

    if a.shape and a.model:
        raise UserError("give --model or --shape, not both")
    if a.adapters is not None and not os.path.isdir(a.adapters):
        raise UserError(f"--adapters {a.adapters} is not a folder")
    if a.shape:
        from minipara.bench.speed import SHAPES, random_model

        if a.shape not in SHAPES:
            raise UserError(f"unknown --shape {a.shape!r}; known: {', '.join(SHAPES)}")
        from minipara.decode.generation import Decoder

        lm, model = None, random_model(a.shape, parse_dtype(a.dtype), parse_device(a.device))
        decoder, text = Decoder(model), id_text
    else:
        lm = cli.load_lm(a)
        lm.template(a.template)  # an unknown name fails now, not at the first request
        model, decoder, text = lm.model, lm.decoder, lm.tokenizer.decode
    context = a.context or min(model.args.max_seq_len, 2048)
    if a.max_batch < 1 or context < 2:
        raise UserError("--max-batch must be at least 1 and --context at least 2")
    pool = AdapterPool(
        a.adapters, model.args, model.tok_embeddings.weight.device, int(a.adapter_memory * 2**20), model.weights_id
    )
    pool.preload()
    compiled = a.compile if a.compile is not None else model.tok_embeddings.weight.is_cuda
    if compiled and model.tok_embeddings.weight.is_cuda:
        from minipara.decode.compiled import compile_decoder

        compile_decoder(decoder)  # the prefill's CUDA graphs (the engine compiles its own step)
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
        buckets=[int(b) for b in a.buckets.split(",")],
        compile="inductor" if compiled else None,
    )
    took = engine.warmup(list(pool.loaded.values()))
    print(f"minipara: warmed up in {took:.1f} s ({'compiled' if compiled else 'eager'})", file=sys.stderr, flush=True)
    return Server(engine, lm, pool, a.template, a.name, context)


def main(argv=None):
    import uvicorn

    a = parse(argv)
    server = make_server(a)
    print(f"minipara: serving {a.name} with adapters {server.pool.names()} on http://{a.host}:{a.port}/v1", flush=True)
    uvicorn.run(
        build_app(server), host=a.host, port=a.port, log_level="warning", timeout_graceful_shutdown=a.shutdown_timeout
    )
    return 0
