"""Continuous batching: one running batch that requests join and leave between decode steps.

The engine owns one KV cache of `max_batch` rows and decodes the rows in use together, one
token per step. A new request joins at the next step:

1. Waiting requests are prefilled together, left-padded, several prompts per call (up to
   `prefill_budget` prompt tokens), each with its own adapter (a Mixture: each adapter's
   generators run once, on its own rows, exactly as for the request alone). Its first token
   is picked from that prefill's logits. A request with n > 1 choices (`submit(*reqs)`) is
   prefilled once and placed in n rows.
2. Its cache entries are placed in a free row of the big cache (KVCache.place) and its
   per-layer adapter states in that row of the batch's states (SlotStates.fill).
3. From then on it decodes with everyone else and leaves when it stops (EOS, a stop
   string, its token limit, or its client going away); its row is free at once.

Static shapes: a step runs on the first k rows, k the smallest of `buckets` holding every
row in use (the rows above the last busy one are left out, the free ones below it are
padding that computes throw-away tokens). Everything the step reads lives in buffers made
once and updated in place: the cache, the adapter states (SlotStates: LoRA's is left out of
a step no busy LoRA row needs, so the base model does not pay for it; the element-wise kinds
are applied to every row, the identity where a row has none), and each row's token,
sampling settings (temperature, top-k, top-p, random stream and step) and outputs (`io`).
The step samples inside the graph (generation.sample), so a compiled step (`compile=`),
traced at `warmup`, replays whatever requests, tenants, lengths and settings come and go. It
has two forms (without and with LoRA), each traced twice whatever the buckets: for one row,
and once with a symbolic batch size for every larger bucket (the step slices its whole
buffers to the size of one input marked dynamic, as vLLM compiles its model once for all
batch sizes); on CUDA a graph is still recorded per bucket: a few runs of the step, no
compilation.

Why rows may sit anywhere: attention masks are built from each slot's position and
validity (cache.pos, cache.ok), never from slot order. Slots run out as the shared slot
advances; when it reaches the end, each row's valid entries move to the front
(KVCache.compact).

Prefill policy: between two decode steps the engine prefills waiting requests first come
first served, while rows are free, until `prefill_budget` prompt tokens have been prefilled
(always at least one request). A decoding row therefore waits at most the prefill of about
`prefill_budget` tokens for its next token; `stats()` reports the stalls it saw.
"""

import collections
import sys
import threading
import time
import traceback

import torch

from minipara.decode.compiled import compile_kwargs, mark_static, persistent_caches
from minipara.decode.generation import (
    Decoder,
    GenerationConfig,
    left_pad,
    sample,
    stream_key,
    token_bits,
    token_logprobs,
)
from minipara.methods.mixture import Mixture
from minipara.model.cache import Rows, SlotStates
from minipara.model.layer_state import LayerState
from minipara.serve.detokenize import Detokenizer

TOP_LOGPROBS = 20  # the most `logprobs` a request may ask for (OpenAI's limit)
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


class Overloaded(Exception):
    """The waiting queue is full: the client should retry later (HTTP 429)."""


class Request:
    """One generation request. The engine calls `emit(kind, value)` from its own thread:
    ("text", new text), ("done", finish reason: "stop" | "length"), ("error", message).

    logprobs: None, or k: keep each token's log-probability and the k most likely tokens'
    (`logprobs_out`: one (logprob, [(id, logprob)] * k) per token).
    index: which of a request's n choices this is: its random stream (generation.stream_key)."""

    def __init__(self, prompt: list[int], cfg: GenerationConfig, adapter=None, stop=(), emit=None, logprobs=None):
        self.prompt, self.cfg, self.adapter, self.stop = list(prompt), cfg, adapter, tuple(stop)
        self.emit = emit or (lambda kind, value: None)
        self.logprobs, self.index, self.seed = logprobs, 0, cfg.seed
        self.tokens: list[int] = []  # generated ids, EOS included when produced
        self.logprobs_out: list = []
        self.detok = Detokenizer()  # the text of `tokens`, decoded a few tokens at a time
        self.sent = 0  # characters of text emitted so far
        self.cancelled = False

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
        buckets=BUCKETS,
        compile=None,
    ):
        """compile: None (eager), "inductor" (on CUDA with CUDA graphs, see compiled.py), or a
        torch.compile backend (e.g. "eager" or a counting one in tests)."""
        self.model, self.decode_text = model, decode_text
        self.decoder = decoder or Decoder(model)
        self.cache = model.new_cache(max_batch, slots)
        self.states = SlotStates(model.args.n_layers, max_batch)
        self.device = model.tok_embeddings.weight.device
        self.max_batch, self.slots, self.max_waiting, self.prefill_budget = (
            max_batch,
            slots,
            max_waiting,
            prefill_budget,
        )
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        self.rows: list[Request | None] = [None] * max_batch
        dev, B, K = self.device, max_batch, min(TOP_LOGPROBS, model.args.vocab_size)
        self.io = {  # each row's step inputs and outputs, in place (see the module doc)
            "tokens": torch.zeros(B, dtype=torch.long, device=dev),
            "temperature": torch.zeros(B, device=dev),
            "top_k": torch.zeros(B, dtype=torch.long, device=dev),
            "top_p": torch.ones(B, device=dev),
            "key": torch.zeros(B, dtype=torch.long, device=dev),
            "step": torch.zeros(B, dtype=torch.long, device=dev),
            "logprob": torch.zeros(B, device=dev),
            "top_values": torch.zeros(B, K, device=dev),
            "top_ids": torch.zeros(B, K, dtype=torch.long, device=dev),
        }
        self.bits = token_bits(model.args.vocab_size, dev)  # the sampler's per-token hashes
        # A step of k rows gets every buffer whole and an empty tensor of k elements, whose
        # size it slices them to: marked dynamic above one row, that size is the one symbol of
        # the graph that serves every larger bucket (a symbol per input's batch size traced
        # about twice as slowly as a static graph).
        self._sizes = {k: torch.empty(k, device=dev) for k in self.buckets}
        self.structures = set()  # the kinds of adapter states the step was warmed up for (warmup)
        self.compiled = compile is not None
        self.cuda = self.device.type == "cuda"
        self._step_fns, self._marked = {}, set()
        if self.compiled:
            persistent_caches()
            lim = torch._dynamo.config
            lim.cache_size_limit = max(lim.cache_size_limit, 8 * len(self.buckets))
            lim.accumulated_cache_size_limit = max(lim.accumulated_cache_size_limit, 64 * len(self.buckets))
            # dynamic=False: every size is specialised except the one marked dynamic (the rows
            # of buckets above 1), so nothing else can make a graph dynamic.
            for tune in (True, False):  # LoRA's steps untuned: see compiled.py
                kw = compile_kwargs(self.cuda, tune) if compile == "inductor" else {"backend": compile}
                self._step_fns[tune] = torch.compile(self._decode, fullgraph=True, dynamic=False, **kw)
            for k, size in self._sizes.items():
                if k > 1:
                    torch._dynamo.mark_dynamic(size, 0, min=2, max=max_batch)
            if self.cuda:  # what the step reads and writes in place, at fixed addresses
                mark_static([*self.cache.buffers(), *self.io.values(), self.bits, *self._sizes.values()])
        self.warmup_s = 0.0
        self.waiting: collections.deque = collections.deque()  # groups: the n choices of one request
        self.cv = threading.Condition()
        self.stopping = False
        self.thread = None
        self.stalls: list[float] = []  # seconds decoding rows waited for prefills, per step with both
        self.steps = self.compactions = self.prefills = 0

    # ---- the HTTP side -------------------------------------------------------------------
    def room(self, req: Request) -> int:
        """Cache slots the request needs beyond what one row holds (0: it fits)."""
        return max(0, self._need(req) - self.slots)

    @staticmethod
    def _need(req: Request, n_pre: int = 0, prompt: int = 0) -> int:
        n_pre = max(n_pre, req.adapter.n_prefix if req.adapter is not None else 0)
        return n_pre + max(prompt, len(req.prompt)) + req.cfg.max_new_tokens

    def submit(self, *reqs: Request):
        """Queue a request; several: the n choices of one request (same prompt, settings and
        adapter), prefilled once, each choice sampling from its own random stream."""
        if self.room(reqs[0]):
            raise ValueError(f"the request needs {self.room(reqs[0])} more cache slots than a row holds ({self.slots})")
        if len(reqs) > self.max_batch:
            raise ValueError(f"n = {len(reqs)} choices exceed the {self.max_batch} rows")
        seed = reqs[0].cfg.seed if reqs[0].cfg.seed is not None else torch.seed()
        for i, req in enumerate(reqs):
            req.index, req.seed = i, seed
        with self.cv:
            if self.stopping:
                raise RuntimeError("the server is shutting down")
            # The bound counts requests beyond the free rows, which join at the next step.
            if len(self.waiting) >= self.max_waiting + self.rows.count(None):
                raise Overloaded(f"all {self.max_batch} rows are busy and {len(self.waiting)} requests wait")
            self.waiting.append(reqs)
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
        left = [*(r for g in self.waiting for r in g), *(r for r in self.rows if r is not None)]
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
            "prefills": self.prefills,
            "warmup_s": round(self.warmup_s, 3),
            "prefill_stalls": len(self.stalls),
            "stall_p50_s": q(0.5),
            "stall_p99_s": q(0.99),
            "stall_max_s": s[-1] if s else 0.0,
        }

    # ---- start-up -------------------------------------------------------------------------
    @torch.no_grad()
    def warmup(self, adapters=()) -> float:
        """Learn the adapter states that `adapters` give (a two-token prefill each) and, when
        compiled, run the step for every bucket in both forms (below): compiled once per form
        for one row and once for the rest, captured on CUDA for each bucket, so that serving
        them never waits on a compilation. Seconds taken."""
        t0 = time.perf_counter()
        for ad in adapters:
            tokens = torch.full((1, 2), self.model.args.bos_id, device=self.device)
            small, _ = self.decoder.prefill(tokens, torch.ones_like(tokens, dtype=torch.bool), ad.n_prefix + 2, ad)
            shapes = SlotStates.shapes(small.states)
            if shapes:
                ref = next(s for s in small.states if s is not None).tensors()
                t = next(iter(ref.values()))
                self.states.ensure(shapes, t.dtype, t.device)
        # Two structures, not one per mix of kinds: rows hold the identity in the kinds they
        # do not use (SlotStates.reset), and a multiplier or bias costs one element-wise op
        # that the compiler fuses into its neighbours, so every batch without LoRA runs with
        # all of them (the bare model's rows too); LoRA's two small products a linear are
        # worth a graph of their own. For PARA + LoRA tenants: 2 forms instead of 4 (none,
        # PARA, LoRA, both), half the compile time at a start.
        every = tuple(sorted(self.states.bufs))
        elementwise = tuple(k for k in every if not k[0].startswith("lora"))
        self.structures |= {elementwise, every}
        if self.compiled:
            for k in self.buckets:
                for keys in sorted(self.structures):
                    for _ in range(3 if self.cuda else 1):  # CUDA graphs: warm-up runs, then the recording
                        self._run_step(k, keys)
            self.cache.ok.zero_()
            self.cache.slot.zero_()
            self.cache.length = 0
            for t in self.io.values():
                t.zero_()
        self.warmup_s += time.perf_counter() - t0
        return time.perf_counter() - t0

    # ---- the engine thread ---------------------------------------------------------------
    def _run(self):
        while self.iteration(block=True):
            pass

    def iteration(self, block: bool = False) -> bool:
        """Free cancelled rows, prefill waiting requests into free rows, decode one step;
        False once stopping (or, with block=False, when there is nothing to do)."""
        with self.cv, torch.no_grad():
            while block and not self.stopping and not self.waiting and not self.active():
                self.cv.wait()
            if self.stopping or (not self.waiting and not self.active()):
                return False
            for r, req in enumerate(self.rows):
                if req is not None and req.cancelled:
                    self._release(r)
            decoding = self.active()
            joining = self._take_waiting()
        with torch.no_grad():
            t0 = time.perf_counter()
            if joining:
                try:
                    self._join(joining)
                except Exception as e:  # a bug or out of memory: these requests fail, the server goes on
                    traceback.print_exc()
                    for group, rows in joining:
                        for req, r in zip(group, rows):
                            if self.rows[r] is req:
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
        return True

    def _take_waiting(self) -> list:
        """Groups to prefill now, first come first served, with the rows taken for them."""
        joining, budget, free = [], self.prefill_budget, self.rows.count(None)
        n_pre = prompt = 0
        while self.waiting:
            group = self.waiting[0]
            if all(r.cancelled for r in group):
                self.waiting.popleft()
                continue
            head = group[0]
            p, t = max(n_pre, head.adapter.n_prefix if head.adapter else 0), max(prompt, len(head.prompt))
            # Prefilled together, prompts are padded to the longest and prefixes to the
            # largest: every member must still fit its row.
            fits = (
                all(self._need(g[0], p, t) <= self.slots for g, _ in joining) and self._need(head, p, t) <= self.slots
            )
            if len(group) > free or (joining and (budget <= 0 or not fits)):
                break
            self.waiting.popleft()
            rows = []
            for req in group:
                r = self.rows.index(None)
                self.rows[r] = req  # taken now: submit() counts the row as busy
                rows.append(r)
            joining.append((group, rows))
            budget, free, n_pre, prompt = budget - len(head.prompt), free - len(group), p, t
        return joining

    def _join(self, joining: list):
        """Prefill the groups together and place each request in its row."""
        heads = [g[0] for g, _ in joining]
        tokens, valid = left_pad([h.prompt for h in heads], self.model.args.pad_id, self.device)
        ads = list({id(h.adapter): h.adapter for h in heads if h.adapter is not None}.values())
        if not ads:
            adapter = None
        elif len(ads) == 1 and all(h.adapter is not None for h in heads):
            adapter = ads[0]
        else:  # tenants (or the bare model) side by side, each on its own rows
            adapter = Mixture(
                ads, [next(i for i, a in enumerate(ads) if a is h.adapter) if h.adapter else None for h in heads]
            )
        n_pre = adapter.n_prefix if adapter is not None else 0
        small, logits = self.decoder.prefill(tokens, valid, n_pre + tokens.shape[1], adapter)
        self.prefills += 1
        src, rows = [], []
        for j, (group, rs) in enumerate(joining):
            for req, r in zip(group, rs):
                self._settings(r, req)
                src.append(j)
                rows.append(r)
        sel = torch.tensor(rows, device=self.device)
        io = {n: t.index_select(0, sel) for n, t in self.io.items()}
        lg = logits.index_select(0, torch.tensor(src, device=self.device))
        first = sample(lg, io["temperature"], io["top_k"], io["top_p"], io["key"], io["step"], self.bits)
        lps = [t.tolist() for t in token_logprobs(lg, first, self.io["top_ids"].shape[1])]
        for i, (j, r) in enumerate(zip(src, rows)):
            req = self.rows[r]
            if req.cancelled or self._accept(req, int(first[i]), [t[i] for t in lps]):
                self._release(r)
                continue
            self.cache.place(r, small, j)
            self.states.fill(r, small.states, j)
            self.io["tokens"][r] = first[i]
            self.io["step"][r] = 1

    def _settings(self, r: int, req: Request):
        cfg, io = req.cfg, self.io
        io["temperature"][r], io["top_k"][r], io["top_p"][r] = cfg.temperature, cfg.top_k, cfg.top_p
        io["key"][r], io["step"][r] = stream_key(req.seed, req.index), 0

    def _step(self):
        live = [r for r, req in enumerate(self.rows) if req is not None]
        if self.cache.length >= self.slots:
            self.cache.compact(live)
            self.compactions += 1
        k = next(b for b in self.buckets if b > live[-1])
        self._run_step(k, self._structure(self.states.used(live)))
        self.cache.length += 1
        self.steps += 1
        io = self.io
        toks = io["tokens"].tolist()
        want = any(self.rows[r].logprobs is not None for r in live)
        lps = [io[n].tolist() for n in ("logprob", "top_values", "top_ids")] if want else None
        for r in live:
            req = self.rows[r]
            if not req.cancelled and self._accept(req, toks[r], [t[r] for t in lps] if lps else None):
                self._release(r)

    def _structure(self, used: frozenset) -> tuple:
        """The kinds of states the step applies: the smallest warmed-up set holding `used`."""
        if not self.compiled:
            return tuple(sorted(used))
        fits = [s for s in self.structures if used <= set(s)]
        if not fits:  # a kind of adapter not seen at warm-up: one more compilation
            print(f"minipara: compiling the decode step for new adapter states {sorted(used)}", file=sys.stderr)
            fits = [tuple(sorted(self.states.bufs))]
            self.structures.add(fits[0])
        return min(fits, key=len)

    def _run_step(self, k: int, keys: tuple):
        bufs = self.states.layers(keys)
        if not self.compiled:
            return self._decode(self._sizes[k], keys, bufs, self.io)
        if self.cuda:
            if (keys, self.states.version) not in self._marked:  # each kind's layer views: made once
                mark_static([t for layer in bufs for t in layer])
                self._marked.add((keys, self.states.version))
            torch.compiler.cudagraph_mark_step_begin()
        self._step_fns[not any(kind == "lora_a" for kind, _ in keys)](self._sizes[k], keys, bufs, self.io)

    def _decode(self, size, keys, bufs, io):
        """One step of the first k rows, k = size's length: every input read and every output
        written in place, so that one traced graph serves any requests."""
        k = size.shape[0]
        cache = Rows(self.cache, k)
        states = (
            [LayerState.from_tensors({key: t[:k] for key, t in zip(keys, layer)}) for layer in bufs] if keys else None
        )
        logits = self.model.step(io["tokens"][:k, None], cache, states=states)[:, -1]
        io = {n: t[:k] for n, t in io.items()}
        tok = sample(logits, io["temperature"], io["top_k"], io["top_p"], io["key"], io["step"], self.bits)
        lp, top_v, top_i = token_logprobs(logits, tok, io["top_ids"].shape[1])
        io["tokens"].copy_(tok)
        io["step"].add_(1)
        io["logprob"].copy_(lp)
        io["top_values"].copy_(top_v)
        io["top_ids"].copy_(top_i)

    def _accept(self, req: Request, tok: int, lp=None) -> bool:
        """Record a new token, emit the text that is now certain; True when the request is done."""
        req.tokens.append(tok)
        if req.logprobs is not None:  # lp: (its logprob, the top values, their ids)
            req.logprobs_out.append((lp[0], list(zip(lp[2], lp[1]))[: req.logprobs]))
        eos = tok in req.cfg.eos_ids
        text = req.detok.text(req.tokens[:-1] if eos else req.tokens, self.decode_text)
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
        self.cache.free(r)
        self.states.reset(r)
