"""The server's counters in Prometheus text format (GET /metrics), named as vLLM names its own
(`vllm:num_requests_running` is `minipara:num_requests_running` here), so dashboards carry over.

Measured in the HTTP layer from the engine's events: time to first token from the request's
arrival, time per output token after the first (per choice: each of a request's n choices is
a sequence of its own, as vLLM counts them), tokens in and out, requests per model; the
engine's own stats() give the rows running (one per choice) and the requests waiting.
"""

import threading
import time

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float):
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum, self.n = self.sum + v, self.n + 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum}", f"{name}_count {self.n}"]


class Timing:
    """One request's clock: its first event (TTFT); per choice (engine Request in `reqs`), its
    first event, its last and its generated token count."""

    def __init__(self, metrics: "Metrics", t0: float, n: int = 1):
        self.metrics, self.t0, self.first, self.reqs = metrics, t0, None, []
        self.lock = threading.Lock()  # the choices' events may come from more than one thread
        self.starts: list[float | None] = [None] * n

    def event(self, kind: str, i: int = 0):  # from the engine's thread (or its stop())
        now = time.perf_counter()
        with self.lock:
            first = self.first is None
            if first:
                self.first = now
            if self.starts[i] is None:
                self.starts[i] = now
            start = self.starts[i]
        if first:
            self.metrics.observe_ttft(now - self.t0)
        if kind != "text":  # done or error: this choice is over
            n = len(self.reqs[i].tokens) if i < len(self.reqs) else 0
            self.metrics.finish(n, (now - start) / (n - 1) if n > 1 else None)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft, self.tpot = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS)
        self.prompt_tokens = self.generation_tokens = 0
        self.requests: dict[str, int] = {}

    def request(self, model: str, n_prompt: int, t0: float, n: int = 1) -> Timing:
        """A request admitted for `model` with n_prompt tokens (prefilled once for its n
        choices), arrived at perf_counter() t0."""
        with self.lock:
            self.requests[model] = self.requests.get(model, 0) + 1
            self.prompt_tokens += n_prompt
        return Timing(self, t0, n)

    def observe_ttft(self, s: float):
        with self.lock:
            self.ttft.observe(s)

    def finish(self, n_generated: int, per_token: float | None):
        with self.lock:
            self.generation_tokens += n_generated
            if per_token is not None:
                self.tpot.observe(per_token)

    def render(self, stats: dict, pool) -> str:
        with pool.lock:
            resident, used = len(pool.loaded), pool.used()
        with self.lock:
            per_model = [f'requests_total{{model="{label(m)}"}} {n}' for m, n in sorted(self.requests.items())]
            table = [  # (name, type, help, sample lines)
                (
                    "num_requests_running",
                    "gauge",
                    "Sequences being decoded: rows of the batch, one per choice of a request.",
                    [f"num_requests_running {stats['active']}"],
                ),
                (
                    "num_requests_waiting",
                    "gauge",
                    "Requests waiting to join the batch (all of a request's n choices join together).",
                    [f"num_requests_waiting {stats['waiting']}"],
                ),
                (
                    "time_to_first_token_seconds",
                    "histogram",
                    "Arrival to first token.",
                    self.ttft.lines("time_to_first_token_seconds"),
                ),
                (
                    "time_per_output_token_seconds",
                    "histogram",
                    "Mean time per token after the first, per request.",
                    self.tpot.lines("time_per_output_token_seconds"),
                ),
                (
                    "prompt_tokens_total",
                    "counter",
                    "Prompt tokens admitted.",
                    [f"prompt_tokens_total {self.prompt_tokens}"],
                ),
                (
                    "generation_tokens_total",
                    "counter",
                    "Tokens generated.",
                    [f"generation_tokens_total {self.generation_tokens}"],
                ),
                ("requests_total", "counter", "Requests admitted, per model (the base or an adapter).", per_model),
                ("adapters_resident", "gauge", "Adapters loaded on the device.", [f"adapters_resident {resident}"]),
                (
                    "adapter_memory_bytes",
                    "gauge",
                    "Bytes the resident adapters take.",
                    [f"adapter_memory_bytes {used}"],
                ),
            ]
        out = []
        for name, kind, help_, lines in table:
            out += [f"# HELP minipara:{name} {help_}", f"# TYPE minipara:{name} {kind}"]
            out += [f"minipara:{line}" for line in lines]
        return "\n".join(out) + "\n"


def label(v: str) -> str:
    """A label value escaped as the text format wants."""
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
