"""What an OpenAI-style request means: its JSON read and every field checked, or an ApiError
that becomes OpenAI's error body. No HTTP here: app.py routes, this module decides.

Every client mistake is a 4xx with the field named in `param`, never a 500: a value of the
wrong type, out of range, NaN, too deep or too large to parse, text a tokenizer cannot take.
"""

import json

from starlette.responses import JSONResponse

from minipara.decode.generation import GenerationConfig
from minipara.serve.engine import TOP_LOGPROBS

INT64 = (-(2**63), 2**63 - 1)  # a seed: OpenAI's and vLLM's signed 64-bit range
MAX_NAME = 200  # a model name longer than any file name the adapter folder can hold
MAX_STOP = 4  # OpenAI's limit on stop strings


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

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def read_json(raw: bytes) -> dict:
    """The request body as a JSON object. Python's parser raises RecursionError on deep nesting
    and ValueError on integers beyond 4300 digits: both are the client's malformed JSON."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON (nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the integer digit limit
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def text(v, param: str) -> str:
    """A string a tokenizer can take: JSON's \\ud800 escapes give Python strings that are not
    Unicode (lone surrogates) and cannot be encoded."""
    if not isinstance(v, str):
        raise ApiError(400, f"{param} must be a string", param=param)
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"{param} is not valid Unicode text (a lone surrogate escape)", param=param) from None
    return v


def model_name(body: dict) -> str:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' is required: the base model's name or an adapter's", param="model")
    text(name, "model")
    if len(name) > MAX_NAME:
        raise ApiError(404, f"no model has a name of {len(name)} characters", param="model", code="model_not_found")
    return name


def integer(body: dict, key: str, default, lo: int, hi: int | None = None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        want = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise ApiError(400, f"{key} must be {want}, got {short(v)}", param=key)
    return v


def number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    # `lo <= v <= hi` is False for NaN; an integer too large for a float fails it before float().
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and lo <= v <= hi and not (lo_open and v == lo)
    if not ok:
        raise ApiError(
            400, f"{key} must be a number {'>' if lo_open else '>='} {lo} and <= {hi}, got {short(v)}", param=key
        )
    return float(v)


def flag(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{key} must be true or false, got {short(v)}", param=key)
    return v


def short(v) -> str:
    """A client's value quoted in an error, cut to a readable length (a 4000-digit integer)."""
    r = repr(v) if not isinstance(v, int) or abs(v) < 10**30 else f"an integer of {len(str(abs(v)))} digits"
    return r if len(r) <= 60 else r[:57] + "..."


def unsupported(body: dict):
    """Parameters this server does not implement: refused unless they ask for the default."""
    if integer(body, "best_of", 1, 1) != 1:
        raise ApiError(400, f"best_of={body['best_of']} is not supported by this server: use 1 (or n)", param="best_of")
    for key in ("echo",):
        if flag(body, key):
            raise ApiError(400, f"{key} is not supported by this server", param=key)
    for key, neutral in (
        ("presence_penalty", 0),
        ("frequency_penalty", 0),
        ("logit_bias", None),
        ("suffix", None),
    ):
        if body.get(key) not in (None, neutral, False, {}):
            raise ApiError(400, f"{key}={short(body[key])} is not supported by this server", param=key)


def choices(body: dict, max_n: int) -> int:
    """n: how many choices, each a row of the batch (they share one prefill), so at most max_n."""
    return integer(body, "n", 1, 1, max_n)


def logprobs(body: dict, chat: bool) -> int | None:
    """None, or how many top tokens to report with each token's log-probability: completions'
    `logprobs` is that count; chat's `logprobs` is true or false and `top_logprobs` the count."""
    if not chat:
        return integer(body, "logprobs", None, 0, TOP_LOGPROBS)
    wanted = flag(body, "logprobs")
    top = integer(body, "top_logprobs", 0, 0, TOP_LOGPROBS)
    if body.get("top_logprobs") is not None and not wanted:
        raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    return top if wanted else None


def sampling(
    body: dict, n_prompt: int, room: int, context: int, default_max, prompt_param: str, eos: tuple, max_n: int = 1
) -> tuple[GenerationConfig, tuple, int, int | None]:
    """The request's GenerationConfig, stop strings, n (choices, at most max_n) and logprobs
    (None, or how many top tokens to report with each token's log-probability), every value
    checked. `room`: the most new tokens the context leaves after the prompt; eos: the
    template's end ids (kept unless ignore_eos); prompt_param "messages" for a chat request."""
    unsupported(body)
    n = choices(body, max_n)
    lp = logprobs(body, chat=prompt_param == "messages")
    if room < 1:
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens and the prompt has {n_prompt}: shorten it",
            param=prompt_param,
            code="context_length_exceeded",
        )
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_new = integer(body, max_key, min(default_max, room) if default_max else room, 1)
    if max_new > room:
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens; the request has {n_prompt} prompt "
            f"tokens and asks for {short(max_new)} more: shorten the prompt or lower {max_key}",
            param=max_key,
            code="context_length_exceeded",
        )
    temperature = number(body, "temperature", 1.0, 0, 2)
    top_p = number(body, "top_p", 1.0, 0, 1, lo_open=True)
    top_k = integer(body, "top_k", 0, 0)
    seed = integer(body, "seed", None, *INT64)
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a string or a list of up to {MAX_STOP} non-empty strings", param="stop")
    for s in stop:
        text(s, "stop")
    eos = () if flag(body, "ignore_eos") else eos
    cfg = GenerationConfig(
        max_new_tokens=max_new, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, eos_ids=eos
    )
    return cfg, tuple(stop), n, lp


def stream_options(body: dict) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    return stream, flag(options, "include_usage")


def prompt(body: dict, vocab: int):
    """The prompt: a string, or a list of token ids in [0, vocab) (a batch of one of either)."""
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", param="prompt")
    p = body["prompt"]
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one
    if isinstance(p, str):
        if not text(p, "prompt").strip():
            raise ApiError(400, "prompt is empty: give some text to continue", param="prompt")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
        return list(p)
    raise ApiError(
        400,
        f"prompt must be a string or a non-empty list of token ids in [0, {vocab}) (one prompt per request)",
        param="prompt",
    )


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def messages(body: dict) -> list[tuple[str, str]]:
    """A chat request's (role, text) turns, the last one the user's."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns = []
    for m in msgs:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise ApiError(400, "only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES or not isinstance(content, str):
            raise ApiError(
                400, "each message needs a role (system, user or assistant) and text content", param="messages"
            )
        turns.append((ROLES[role], text(content, "messages")))
    if turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's", param="messages")
    return turns
