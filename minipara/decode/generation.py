"""Generation through the KV cache: greedy, sampling and beam search, for a batch of prompts.

The prompt is prefilled once per request (an adapter's generators run then, once);
beams are made by copying the prefilled cache rows, and beam search reorders
the cache with index ops. Beam search follows HF transformers' algorithm
(2K candidates per step, length-penalised finished hypotheses, the same
early-stop heuristic), so the two give the same sequences.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minipara.checks import check_fields, check_seed
from minipara.errors import UserError
from minipara.model.adapter import AdapterLike


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    beams: int = 1
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    length_penalty: float = 1.0
    seed: int | None = None
    eos_ids: tuple[int, ...] | None = None  # None: the model's; (): never stop early

    def check(self):
        check_fields(self)  # each of its kind (finite numbers): 1.5 new tokens would fail deep in decoding
        check_seed(self.seed, optional=True)
        if self.beams < 1:
            raise UserError(f"beams must be at least 1 (got {self.beams})", ("beams",))
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})", ("max_new_tokens",))
        if abs(self.length_penalty) > 50:  # the length's power overflows beyond (131072 ** 60 > 1e308)
            raise UserError(
                f"length_penalty must be between -50 and 50 (got {self.length_penalty})", ("length_penalty",)
            )
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0", ("temperature", "top_p", "top_k"))
        if self.beams > 1 and self.temperature > 0:
            raise UserError("beam search is deterministic here: use beams 1 to sample", ("beams",))


def context_room(context: int, n_prompt: int, n_prefix: int = 0) -> int:
    """How many new tokens fit after a prompt: the one context-length rule, used by generation,
    training, evaluation, the benchmark and the server. An adapter's prefix slots, the prompt
    and the new tokens together must fit the context (the model's max_seq_len, or less)."""
    return context - n_prefix - n_prompt


def check_context(context: int, n_prompt: int, n_new: int, n_prefix: int = 0, what: str = "prompt", new: str = ""):
    """A UserError unless `context_room` leaves `n_new` tokens; `what` names the prompt, `new`
    says what the new tokens are (default: max_new_tokens)."""
    if n_new > context_room(context, n_prompt, n_prefix):
        new = new or f"max_new_tokens ({n_new})"
        raise UserError(
            f"{what} ({n_prompt} tokens) plus {new}{f' plus {n_prefix} prefix slots' if n_prefix else ''} "
            f"exceeds the model's context of {context} tokens",
            ("max_new_tokens",),
        )


def left_pad(prompts: list[list[int]], pad_id: int, device):
    """(B, T) tokens and (B, T) validity mask, prompts aligned to the right."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, T - len(p) :] = torch.tensor(p)
            valid[i, T - len(p) :] = True
    return tokens.to(device), valid.to(device)


class Decoder:
    """Owns the caches, the prefill and the one-token step, so repeated calls reuse buffers
    (and, once compiled, CUDA graphs). `run_prefill` and `step` may be replaced by
    captured versions (see fast.py)."""

    def __init__(self, model):
        self.model = model
        self._caches = {}
        self._beams = {}

    def cache(self, batch: int, max_len: int, n_prefix: int):
        max_len = _bucket(max_len)
        key = (batch, max_len)
        if key not in self._caches:
            self._caches[key] = self.model.new_cache(batch, max_len, n_prefix)
        c = self._caches[key]
        c.reset(n_prefix)
        return c

    def prefill(self, tokens, valid, max_len, adapter: AdapterLike | None = None):
        """A cache holding the prompts (and the adapter's states), and the logits (B, V) of
        the first new token."""
        n_pre = adapter.n_prefix if adapter is not None else 0
        cache = self.cache(tokens.shape[0], max_len, n_pre)
        return cache, self.run_prefill(cache, tokens, valid, adapter)

    @torch.no_grad()
    def run_prefill(self, cache, tokens, valid, adapter: AdapterLike | None):
        """Fill an emptied cache with the prompts; last-position logits (B, V).
        May be replaced by a replayed CUDA graph (see fast.py)."""
        return self.model(tokens, valid=valid, cache=cache, adapter=adapter, last_only=True)[:, -1]

    def expand(self, cache, k: int):
        """A cache whose rows are each of `cache`'s rows repeated k times (for beams)."""
        if k == 1:
            return cache
        rows = torch.arange(cache.batch, device=cache.ok.device).repeat_interleave(k)
        big = self.cache(cache.batch * k, cache.max_len, cache.n_prefix)
        big.load_rows(cache, rows)
        return big

    @torch.no_grad()
    def step(self, cache, tokens):
        """Logits (B, V) for one new token per row."""
        return self.model(tokens[:, None], cache=cache)[:, -1]

    def beams(self, B: int, K: int, N: int, keep: int, V: int) -> "Beams":
        """Beam search's state for this shape, reused from request to request (fixed addresses
        for a captured step); N is rounded up, as the cache length is."""
        key = (B, K, _bucket(N), keep, V)
        if key not in self._beams:
            self._beams[key] = Beams(*key, device=self.model.tok_embeddings.weight.device)
        return self._beams[key]

    def beam_step(self, cache, beams: "Beams", since: int):
        """Beam search's step: row i first becomes old row beams.rows[i] (slots before `since`
        are shared by the rows it maps between, see KVCache.reorder), runs beams.tokens
        (`step`), and the search takes the logits (`Beams.update`). fast.py does all three in
        one captured graph."""
        cache.reorder(beams.rows, since=since)
        beams.update(self.step(cache, beams.tokens))


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    adapter: AdapterLike | None = None,
    decoder: Decoder | None = None,
    on_token=None,
) -> list[list[int]]:
    """Generated token ids for each prompt (EOS included when produced).

    on_token(row, token_id) is called as tokens are chosen (greedy/sampling only), for streaming.
    """
    cfg.check()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("empty prompt: give at least one token")
    a = model.args
    eos = tuple(a.eos_ids if cfg.eos_ids is None else cfg.eos_ids)
    n_pre = adapter.n_prefix if adapter is not None else 0
    longest = max(len(p) for p in prompts)
    check_context(a.max_seq_len, longest, cfg.max_new_tokens, n_pre)
    decoder = decoder or Decoder(model)
    device = model.tok_embeddings.weight.device
    tokens, valid = left_pad(prompts, a.pad_id, device)
    cache, logits = decoder.prefill(tokens, valid, n_pre + longest + cfg.max_new_tokens, adapter)
    if cfg.beams == 1:
        return _sample(decoder, cache, logits, cfg, eos, on_token)
    return _beam_search(decoder, cache, logits, cfg, eos)


M31 = 0x7FFFFFFF  # hashes keep 31 bits: every literal below fits int32, as Triton types them


def mix31(x):
    """A 31-bit integer hash (Wellons' lowbias32 shape, masked to 31 bits): on Python ints and
    int64 tensors alike. No literal reaches 2**31 and no product 2**63: on CUDA, inductor's
    Triton code types integer literals as int32 ("Scalar 2654435761 is out of range for type
    int32", seen on an H100 with 32-bit constants)."""
    x = x & M31
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M31
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & M31
    return x ^ (x >> 16)


def stream_key(seed: int, stream: int) -> int:
    """The random stream of row `stream` (a batch row, or one of a request's n choices) of a
    request seeded `seed`: what `sample` draws from, with the step."""
    return mix31(mix31(mix31(seed & M31) ^ ((seed >> 31) & M31) ^ (seed >> 62)) + stream)


_TOKEN_BITS: dict = {}


def token_bits(V: int, device) -> torch.Tensor:
    """Each token id's 31-bit hash (V,), computed once per vocabulary and device: a tensor the
    sampler reads, not an arange inside its graph, whose index Triton may hold in int32."""
    k = (V, str(device))
    if k not in _TOKEN_BITS:
        _TOKEN_BITS[k] = mix31(torch.arange(V, dtype=torch.long) * 0x1E3779B1 + 0x2545F491).to(device)
    return _TOKEN_BITS[k]


def sample(logits, temperature, top_k, top_p, key, step, bits):
    """One token per row of logits (B, V), with per-row settings as (B,) tensors: temperature
    (0: greedy), top_k (0: off), top_p, and the row's stream `key` (stream_key) and `step`;
    `bits` is token_bits(V, device), passed in so that a compiled caller holds it as an input.

    Sampling is an argmax of logits plus Gumbel noise hashed from (key, step, token id), not
    a stateful generator: a row's draws depend on its own seed and step only, so a request
    samples the same tokens alone, in any batch, and inside a captured graph.
    Every op is a tensor op, whatever the settings (so one graph serves all of them)."""
    logits = logits.float()
    V = logits.shape[-1]
    greedy = logits.argmax(-1)
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the
    # others to -inf (greedy, its limit) rather than everything to +-inf and NaN. A temperature
    # below float32's smallest normal number (or one that rounds to 0 as a float32) is greedy,
    # and the division never sees a 0 (0/0 is NaN).
    tiny = torch.finfo(torch.float32).tiny
    temperature = temperature.float()
    t = temperature.clamp(min=tiny)[:, None]
    scaled = (logits - logits.amax(-1, keepdim=True)) / t
    ranked, _ = scaled.sort(-1, descending=True)
    # The kept set is a prefix of the ranking: top-k's k, then top-p's smallest prefix that
    # reaches p; everything below the last kept value is dropped.
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    ranked = ranked.masked_fill(torch.arange(V, device=logits.device) >= k[:, None], float("-inf"))
    probs = ranked.softmax(-1)
    n_keep = ((probs.cumsum(-1) - probs) <= top_p.float()[:, None]).sum(-1).clamp(1, V)
    n_keep = torch.minimum(n_keep, k)
    floor = ranked.gather(1, (n_keep - 1)[:, None])
    scaled = scaled.masked_fill(scaled < floor, float("-inf"))
    row = mix31(key ^ mix31(step + 0x1E3779B9))  # (B,): this row's draw at this step
    h = mix31(row[:, None] ^ bits[None, :])
    u = ((h >> 7).float() + 0.5) * 2.0**-24  # in (0, 1)
    drawn = (scaled - (-u.log()).log()).argmax(-1)
    return torch.where(temperature >= tiny, drawn, greedy)


def token_logprobs(logits, tokens, k: int):
    """The model's log-probabilities (temperature 1, unfiltered, as OpenAI's API reports them)
    of `tokens` (B,), and the k most likely tokens' (values, ids), each (B, k)."""
    lp = logits.float().log_softmax(-1)
    top = lp.topk(min(k, lp.shape[-1]))
    return lp.gather(1, tokens[:, None])[:, 0], top.values, top.indices


def sampling_rows(cfg: GenerationConfig, B: int, device):
    """(temperature, top_k, top_p, key) for B rows of one request config: row b draws from
    stream b of the seed (a random seed if none)."""
    seed = cfg.seed if cfg.seed is not None else torch.seed()
    return (
        torch.full((B,), cfg.temperature, device=device),
        torch.full((B,), cfg.top_k, dtype=torch.long, device=device),
        torch.full((B,), cfg.top_p, device=device),
        torch.tensor([stream_key(seed, b) for b in range(B)], device=device),
    )


def _sample(decoder, cache, logits, cfg, eos, on_token):
    B = logits.shape[0]
    rows = sampling_rows(cfg, B, logits.device)
    bits = token_bits(logits.shape[-1], logits.device)
    eos_t = torch.tensor(eos, device=logits.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    out = []
    for t in range(cfg.max_new_tokens):
        nxt = (
            sample(logits, *rows, torch.full((B,), t, device=logits.device), bits)
            if cfg.temperature
            else logits.argmax(-1)
        )
        out.append(nxt)
        if on_token is not None:
            for row in (~done).nonzero().flatten().tolist():
                on_token(row, int(nxt[row]))
        if t + 1 == cfg.max_new_tokens:
            break
        if eos:  # checking needs a device-to-host sync: skip it when nothing can stop early
            done |= torch.isin(nxt, eos_t)
            if bool(done.all()):
                break
        logits = decoder.step(cache, nxt)
    toks = torch.stack(out, 1).tolist()
    return [_cut(row, eos) for row in toks]


def _bucket(n: int) -> int:
    """n rounded up to a multiple of 128, so that requests of similar length share one cache
    (and one compiled step): masked extra slots cost next to nothing."""
    return -(-n // 128) * 128


def _cut(row: list[int], eos) -> list[int]:
    for j, t in enumerate(row):
        if t in eos:
            return row[: j + 1]
    return row


def _beam_search(decoder, cache, logits, cfg, eos):
    """HF transformers' beam search (generation/utils.py `_beam_search`), batched; the
    algorithm is `Beams.update`, run once per step.

    The stop test never waits for the step it tests: each step's "still searching" flag is
    copied to the host without blocking and read while the next step runs, so the host keeps
    queueing steps (on a GPU, the next graph replay) instead of idling between them. The
    model step after a stop is therefore computed but changes nothing: every update is gated
    by the device-side flag `live`."""
    B, V = logits.shape
    K, N = cfg.beams, cfg.max_new_tokens
    beams = decoder.beams(B, K, N, max(2, 1 + len(eos)) * K, V)
    beams.reset(N, cfg.length_penalty, eos)
    cache = decoder.expand(cache, K)
    prompt_end = cache.length  # the beams of a prompt share everything before this slot
    cuda = logits.device.type == "cuda"
    flags = torch.ones(N, dtype=torch.bool, pin_memory=cuda)  # live after step t, on the host
    copied = {}  # CUDA: step -> the event after its flag copy (two at most)
    for t in range(N):
        if t == 0:
            beams.update(logits.repeat_interleave(K, 0))
        else:
            # Step t-2's flag, copied after step t-2 while step t-1 still runs: stop if the
            # search ended then (step t-1 was the one extra model step).
            if eos and t > 1:
                if cuda:
                    copied.pop(t - 2).synchronize()
                if not bool(flags[t - 2]):
                    break
            decoder.beam_step(cache, beams, prompt_end)  # reorder the cache, run the tokens, update: step t
        if eos:  # nothing stops early without EOS ids: no flags to read
            flags[t].copy_(beams.live, non_blocking=True)
            if cuda:
                copied[t] = torch.cuda.Event()
                copied[t].record()
    seqs, lens = beams.fin_seq[:, 0].tolist(), beams.fin_len[:, 0].tolist()
    return [s[:n] for s, n in zip(seqs, lens)]


def _take(x, idx):
    """x[b, idx[b, j]] for x (B, n, ...) and idx (B, m): the rows idx picks, per batch entry."""
    idx = idx.reshape(*idx.shape, *[1] * (x.dim() - 2))
    return x.gather(1, idx.expand(*idx.shape[:2], *x.shape[2:]))


class Beams(nn.Module):
    """Beam search's state for B prompts x K beams, in buffers that `update` changes in place,
    with the step index on the device: a captured step (fast.py) then serves every step and
    every request of this shape without copies. Made once per shape by `Decoder.beams`.

    Sequences hold N_max >= max_new_tokens slots (the rest stay 0), so requests of
    similar length share the buffers and the captured step."""

    def __init__(self, B: int, K: int, N_max: int, keep: int, V: int, device=None):
        super().__init__()
        self.keep = keep  # candidates per prompt and step: HF's max(2, 1 + #EOS ids) * K
        for name, shape, dtype in [
            ("run_seq", (B, K, N_max), torch.long),
            ("run_score", (B, K), torch.float),  # running beams
            ("fin_seq", (B, K, N_max), torch.long),
            ("fin_len", (B, K), torch.long),  # best finished ones
            ("fin_score", (B, K), torch.float),
            ("fin_done", (B, K), torch.bool),
            ("improvable", (B,), torch.bool),  # HF's early-stop heuristic, per prompt
            ("live", (), torch.bool),  # still searching: gates every update
            ("rows", (B * K,), torch.long),  # the next step's cache row for each beam ...
            ("tokens", (B * K,), torch.long),  # ... and its token
            ("t", (), torch.long),
            ("n_new", (), torch.long),  # the step; max_new_tokens
            ("lp", (), torch.float64),
            ("is_eos", (V,), torch.bool),
        ]:  # length penalty; EOS ids
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @torch.no_grad()
    def reset(self, n_new: int, length_penalty: float, eos):
        self.run_seq.zero_()
        self.run_score.zero_()
        self.run_score[:, 1:] = -1e9  # all beams start equal: only the first may expand at step 0
        self.fin_seq.zero_()
        self.fin_len.zero_()
        self.fin_score.fill_(-1e9)
        self.fin_done.zero_()
        self.improvable.fill_(True)
        self.live.fill_(True)
        self.t.zero_()
        self.n_new.fill_(n_new)
        self.lp.fill_(length_penalty)
        self.is_eos.zero_()
        if eos:
            self.is_eos[list(eos)] = True

    @torch.no_grad()
    def update(self, logits):
        """One step of the search, given the running beams' next-token logits (B*K, V):
        choose the beams' tokens, keep the best finished hypotheses, and set `rows` and
        `tokens` for the next model step. Every tensor op, and t a tensor, so that it can
        be captured. (Buffers change only by in-place ops: a captured graph writes them.)"""
        B, K, N = self.run_seq.shape
        V, t, live = logits.shape[-1], self.t, self.live
        logp = F.log_softmax(logits.float(), -1).view(B, K, V) + self.run_score[:, :, None]
        cand_score, idx = logp.view(B, K * V).topk(self.keep)
        beam, tok = idx // V, idx % V
        at_t = torch.arange(N, device=t.device) == t
        cand_seq = torch.where(at_t, tok[:, :, None], _take(self.run_seq, beam))  # with [:, :, t] = tok
        hits = self.is_eos[tok] | (t + 1 == self.n_new)
        # Running beams: the best K candidates that did not finish.
        alive = cand_score - 1e9 * hits.float()
        nxt = alive.topk(K).indices
        self.run_seq.copy_(torch.where(live, _take(cand_seq, nxt), self.run_seq))
        self.run_score.copy_(torch.where(live, alive.gather(1, nxt), self.run_score))
        self.rows.copy_((beam.gather(1, nxt) + K * torch.arange(B, device=t.device)[:, None]).flatten())
        self.tokens.copy_(tok.gather(1, nxt).flatten())
        # Finished hypotheses: candidates among the top K that hit EOS or the length limit.
        # The length's power in float64, as HF's Python float.
        penalty = ((t + 1).double() ** self.lp).float()
        just = hits & (torch.arange(self.keep, device=t.device) < K)
        fs = cand_score / penalty - 1e9 * (~self.improvable[:, None]).float() - 1e9 * (~just).float()
        m_score = torch.cat([self.fin_score, fs], 1)
        best = m_score.topk(K).indices
        for buf, new in (
            (self.fin_seq, cand_seq),
            (self.fin_len, (t + 1).expand(B, self.keep)),
            (self.fin_done, just),
            (self.fin_score, fs),
        ):
            buf.copy_(torch.where(live, _take(torch.cat([buf, new], 1), best), buf))
        best_running = self.run_score[:, 0] / penalty
        worst_fin = torch.where(self.fin_done.all(1), self.fin_score.min(1).values, -1e9)
        self.improvable.logical_and_(best_running > worst_fin)
        self.live.logical_and_(self.improvable.any() & ~hits.all())
        self.t.add_(1)
