"""Continuous batching: one running batch that requests join and leave between decode steps.

The engine owns one KV cache of `max_batch` rows and decodes all rows together, one token
per step. A new request joins at the next step:

1. It is prefilled alone, in a small cache of its own, with its own adapter: the adapter's
   generators run once, exactly as for a request run on its own (generation.generate).
   Its first token is picked from that prefill's logits.
2. Its cache entries (prefix entries and prompt) are copied into a free row of the big cache,
   in the slots just below the shared write slot, with their positions and validity; its
   per-layer adapter states are written into that row of the batch's packed states
   (scale 1 / bias 0 / zero low-rank pairs in rows that do not use them, as in Mixture).
3. From then on it decodes with everyone else and leaves when it stops (EOS, a stop
   string, its token limit, or its client going away); its row is free at once.

Why this works with a cache that writes every row at one shared slot: attention masks are
built from each slot's position and validity (cache.pos, cache.ok), never from slot order,
so a row's entries may sit in any slots. Slots run out as the shared slot advances; when
it reaches the end, each row's valid entries are moved to the front (`_compact`).

Prefill policy: between two decode steps the engine prefills waiting requests first come
first served, while rows are free, until `prefill_budget` prompt tokens have been prefilled
(always at least one request). A decoding row therefore waits at most the prefill of about
`prefill_budget` tokens for its next token; `stats()` reports the stalls it saw.
"""

import collections
import threading
import time
import traceback

import torch

from minipara.decode.generation import Decoder, GenerationConfig, _pick
from minipara.model.cache import KVCache
from minipara.model.layer_state import LayerState

FILL = {"scale": 1.0, "bias": 0.0, "lora_a": 0.0, "lora_b": 0.0}  # a row without the state: identity


class Overloaded(Exception):
    """The waiting queue is full: the client should retry later (HTTP 429)."""


class Request:
    """One generation request. The engine calls `emit(kind, value)` from its own thread:
    ("text", new text), ("done", finish reason: "stop" | "length"), ("error", message)."""

    def __init__(self, prompt: list[int], cfg: GenerationConfig, adapter=None, stop=(), emit=None):
        self.prompt, self.cfg, self.adapter, self.stop = list(prompt), cfg, adapter, tuple(stop)
        self.emit = emit or (lambda kind, value: None)
        self.tokens: list[int] = []  # generated ids, EOS included when produced
        self.sent = 0  # characters of text emitted so far
        self.cancelled = False
        self.gen = None  # the sampling generator, made at prefill on the model's device

    def cancel(self):
        """Stop generating (client gone): the engine frees its row before its next step."""
        self.cancelled = True


class Engine:
    def __init__(
        self,
        model,
        decode_text,
        max_batch: int = 8,
        slots: int = 2048,
        max_waiting: int = 64,
        prefill_budget: int = 512,
        decoder: Decoder | None = None,
    ):
        self.model, self.decode_text = model, decode_text
        self.decoder = decoder or Decoder(model)
        self.cache = model.new_cache(max_batch, slots)
        self.device = model.tok_embeddings.weight.device
        self.max_batch, self.slots, self.max_waiting, self.prefill_budget = (
            max_batch,
            slots,
            max_waiting,
            prefill_budget,
        )
        self.rows: list[Request | None] = [None] * max_batch
        self.next_tok = torch.zeros(max_batch, dtype=torch.long, device=self.device)
        self.packed: dict = {}  # (kind, linear) -> (layers, rows, ...) states of all rows
        self.users: dict = {}  # (kind, linear) -> rows whose adapter uses it
        self._views: dict = {}  # k -> a cache over the first k rows (see _first_rows)
        self.waiting: collections.deque = collections.deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = None
        self.stalls: list[float] = []  # seconds decoding rows waited for prefills, per step with both
        self.steps = self.compactions = 0

    # ---- the HTTP side -------------------------------------------------------------------
    def room(self, req: Request) -> int:
        """Cache slots the request needs beyond what one row holds (0: it fits)."""
        n_pre = req.adapter.n_prefix if req.adapter is not None else 0
        return max(0, n_pre + len(req.prompt) + req.cfg.max_new_tokens - self.slots)

    def submit(self, req: Request):
        if self.room(req):
            raise ValueError(f"the request needs {self.room(req)} more cache slots than a row holds ({self.slots})")
        with self.cv:
            if self.stopping:
                raise RuntimeError("the server is shutting down")
            # The bound counts requests beyond the free rows, which join at the next step.
            if len(self.waiting) >= self.max_waiting + self.rows.count(None):
                raise Overloaded(f"all {self.max_batch} rows are busy and {len(self.waiting)} requests wait")
            self.waiting.append(req)
            self.cv.notify()

    def start(self):
        self.thread = threading.Thread(target=self._run, name="minipara-engine", daemon=True)
        self.thread.start()

    def stop(self):
        """Cancel whatever is still waiting or running (each gets an error event) and end the
        thread; the number of requests cancelled."""
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join()
        left = [*self.waiting, *(r for r in self.rows if r is not None)]
        for req in left:
            req.emit("error", "the server shut down before the request finished")
        self.waiting.clear()
        self.rows = [None] * self.max_batch
        return len(left)

    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    def stats(self, since: int = 0) -> dict:
        """Steps, rows, queue and the prefill stalls (`since`: skip the first stalls, to see a later period)."""
        s = sorted(self.stalls[since:])

        def q(f):
            return s[min(len(s) - 1, int(f * len(s)))] if s else 0.0

        return {
            "steps": self.steps,
            "active": self.active(),
            "waiting": len(self.waiting),
            "prefill_stalls": len(self.stalls),
            "stall_p50_s": q(0.5),
            "stall_p99_s": q(0.99),
            "stall_max_s": s[-1] if s else 0.0,
        }

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self):
        while True:
            with self.cv, torch.no_grad():
                while not self.stopping and not self.waiting and not self.active():
                    self.cv.wait()
                if self.stopping:
                    return
                for r, req in enumerate(self.rows):
                    if req is not None and req.cancelled:
                        self._release(r)
                decoding = self.active()
                joining, budget = [], self.prefill_budget
                while self.waiting and None in self.rows and (not joining or budget > 0):
                    req = self.waiting.popleft()
                    if not req.cancelled:
                        r = self.rows.index(None)
                        self.rows[r] = req  # taken now: submit() counts the row as busy
                        joining.append((r, req))
                        budget -= len(req.prompt)
            with torch.no_grad():
                t0 = time.perf_counter()
                for r, req in joining:
                    try:
                        self._join(r, req)
                    except Exception as e:  # a bug or out of memory: this request fails, the server goes on
                        traceback.print_exc()
                        req.emit("error", f"generation failed: {type(e).__name__}: {e}")
                        self._release(r)
                if joining and decoding:
                    self.stalls.append(time.perf_counter() - t0)
                if self.active():
                    try:
                        self._step()
                    except Exception as e:
                        traceback.print_exc()
                        for r, req in enumerate(self.rows):
                            if req is not None:
                                req.emit("error", f"generation failed: {type(e).__name__}: {e}")
                                self._release(r)

    def _join(self, r: int, req: Request):
        """Prefill `req` alone and place it in row r (taken for it by _run)."""
        cfg, ad = req.cfg, req.adapter
        if cfg.temperature > 0:
            req.gen = torch.Generator(device=self.device)
            req.gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
        n_pre, n = (ad.n_prefix if ad is not None else 0), len(req.prompt)
        tokens = torch.tensor([req.prompt], device=self.device)
        valid = torch.ones_like(tokens, dtype=torch.bool)
        # The same cache length as generate() gives a request alone, so its prefill is the same.
        small, logits = self.decoder.prefill(tokens, valid, n_pre + n + cfg.max_new_tokens, ad)
        first = int(self._pick(req, logits))
        if self._accept(req, first):
            self._release(r)
            return
        c, need = self.cache, n_pre + n
        if c.length < need:  # move the shared slot on: the slots skipped stay invalid in every row
            c.slot.fill_(need)
            c.length = need
        s = c.length - need
        c.ok[r] = False
        c.clear(r, c.length)  # what the row's last request left (slots from c.length on are zero)
        for i in range(self.model.args.n_layers):
            for dst, src in zip(c.kv(i), small.kv(i)):
                dst[r, :, s : s + need] = src[0, :, :need]
        c.pos[r, s : s + need] = small.pos[0, :need]
        c.ok[r, s : s + need] = small.ok[0, :need]
        c.next_pos[r] = small.next_pos[0]
        self._set_states(r, small.states)
        self.next_tok[r] = first

    def _step(self):
        c = self.cache
        if c.length >= self.slots:
            self._compact()
        # Decode only the rows up to the last one in use, rounded up to a power of two (rows are
        # taken lowest first): one client does not pay for a batch of 32.
        last = max(r for r, req in enumerate(self.rows) if req is not None) + 1
        k = min(self.max_batch, 1 << (last - 1).bit_length())
        view = self._first_rows(k)
        view.length = c.length
        logits = self.decoder.step(view, self.next_tok[:k])
        c.length = view.length
        nxt = logits.argmax(-1)
        for r, req in enumerate(self.rows[:k]):
            if req is not None and req.cfg.temperature > 0:
                nxt[r] = self._pick(req, logits[r : r + 1])
        self.next_tok[:k].copy_(nxt)
        self.steps += 1
        for r, tok in enumerate(nxt.tolist()):
            req = self.rows[r]
            if req is not None and not req.cancelled and self._accept(req, tok):
                self._release(r)

    def _first_rows(self, k: int) -> KVCache:
        """The cache's first k rows as a cache of their own: views, so the step writes into the
        big cache (the shared slot too), with those rows' adapter states. Kept per k (fixed
        addresses for a compiled step) until the states' structure changes."""
        if k == self.max_batch:
            return self.cache
        v = self._views.get(k)
        if v is None:
            v = self._views[k] = self.model.new_cache(k, 1)
            for name, buf in self.cache.named_buffers():
                setattr(v, name, buf if name == "slot" else buf[:k])
            v.max_len, v.packed = self.cache.max_len, None
        if v.packed is None:
            v.packed = {key: b[:, :k] for key, b in self.packed.items()}
            v.states = (
                [LayerState.from_tensors({key: b[i] for key, b in v.packed.items()}) for i in range(v.n_layers)]
                if v.packed
                else [None] * v.n_layers
            )
        return v

    def _pick(self, req: Request, logits):
        return _pick(logits, req.cfg, req.gen)[0]

    def _accept(self, req: Request, tok: int) -> bool:
        """Record a new token, emit the text that is now certain; True when the request is done."""
        req.tokens.append(tok)
        eos = tok in req.cfg.eos_ids
        text = self.decode_text(req.tokens[:-1] if eos else req.tokens)
        reason, end = ("stop" if eos else None), len(text)
        for s in req.stop:
            i = text.find(s)
            if i >= 0 and i < end:
                reason, end = "stop", i
        if reason is None and len(req.tokens) >= req.cfg.max_new_tokens:
            reason = "length"
        if reason is None:  # hold back what may still become a stop string or a whole character
            end = len(text.rstrip("\ufffd")) - max((len(s) - 1 for s in req.stop), default=0)
        if end > req.sent:
            req.emit("text", text[req.sent : end])
            req.sent = end
        if reason is not None:
            req.emit("done", reason)
        return reason is not None

    def _release(self, r: int):
        self.rows[r] = None
        self.cache.ok[r] = False
        changed = False
        for key in list(self.users):
            if r in self.users[key]:
                self.users[key].discard(r)
                if self.users[key]:
                    self.packed[key][:, r] = FILL[key[0]]
                else:  # no row needs it any more: stop applying it at every step
                    del self.users[key], self.packed[key]
                    changed = True
        if changed:
            self._repack()

    def _set_states(self, r: int, states: list):
        """Write a newcomer's per-layer adapter states into row r of the packed states."""
        per_layer = [s.tensors() if s is not None else {} for s in states]
        changed = False
        for key in sorted({k for p in per_layer for k in p}):
            kind = key[0]
            rows = [p.get(key) for p in per_layer]
            ref = next(t for t in rows if t is not None)
            shape = ref.shape[-2:]
            buf = self.packed.get(key)
            if buf is None or buf.shape[-2:] != shape:
                # A new kind of state, or a LoRA rank larger than the batch's: (re)make the
                # buffer, keeping the other rows (low-rank pairs zero-padded to the largest rank).
                big = tuple(max(a, b) for a, b in zip(shape, buf.shape[-2:])) if buf is not None else tuple(shape)
                new = torch.full((len(rows), self.max_batch, *big), FILL[kind], dtype=ref.dtype, device=ref.device)
                if buf is not None:
                    new[..., : buf.shape[-2], : buf.shape[-1]] = buf
                buf = self.packed[key] = new
                changed = True
            for i, t in enumerate(rows):
                if t is not None:
                    t = t.reshape(-1, *t.shape[-2:])[0]
                    buf[i, r, : t.shape[0], : t.shape[1]] = t
            self.users.setdefault(key, set()).add(r)
        if changed:
            self._repack()

    def _repack(self):
        for v in self._views.values():
            v.packed = None  # rebuilt from the new buffers when next used
        c, n = self.cache, self.model.args.n_layers
        c.packed = dict(self.packed)
        c.states = (
            [LayerState.from_tensors({k: b[i] for k, b in self.packed.items()}) for i in range(n)]
            if self.packed
            else [None] * n
        )

    def _compact(self):
        """Move each row's valid entries to the front of its slots (order does not matter to
        attention, see the module doc) and the shared slot back to the longest row."""
        c = self.cache
        for r, req in enumerate(self.rows):
            if req is None:
                c.ok[r] = False  # idle rows wrote throw-away entries at every step
        order = (~c.ok).to(torch.int8).argsort(dim=1, stable=True)  # valid slots first
        for i in range(self.model.args.n_layers):
            for buf in c.kv(i):
                buf.copy_(buf.gather(2, order[:, None, :, None].expand_as(buf)))
        c.pos.copy_(c.pos.gather(1, order))
        c.ok.copy_(c.ok.gather(1, order))
        n = int(c.ok.sum(1).max())
        for i in range(self.model.args.n_layers):
            for buf in c.kv(i):
                buf[:, :, n:].zero_()  # no row's entries are left there: keep them zero for _join
        c.slot.fill_(n)
        c.length = n
        self.compactions += 1
