"""Generation through the KV cache: greedy, sampling and beam search, for a batch of prompts.

The prompt is prefilled once per request (an adapter's generators run then, once);
beams are made by copying the prefilled cache rows, and beam search reorders
the cache with index ops. Beam search follows HF transformers' algorithm
(2K candidates per step, length-penalised finished hypotheses, the same
early-stop heuristic), so the two give the same sequences.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError


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
        if self.beams < 1:
            raise UserError(f"beams must be at least 1 (got {self.beams})", ("beams",))
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})", ("max_new_tokens",))
        if abs(self.length_penalty) > 50:  # the length's power overflows beyond (131072 ** 60 > 1e308)
            raise UserError(f"length_penalty must be between -50 and 50 (got {self.length_penalty})",
                            ("length_penalty",))
        if not all(map(math.isfinite, (self.temperature, self.top_p, self.length_penalty))):
            raise UserError("temperature, top_p and length_penalty must be finite numbers",
                            ("temperature", "top_p", "length_penalty"))
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0", ("temperature", "top_p", "top_k"))
        if self.beams > 1 and self.temperature > 0:
            raise UserError("beam search is deterministic here: use beams 1 to sample", ("beams",))


def left_pad(prompts: list[list[int]], pad_id: int, device):
    """(B, T) tokens and (B, T) validity mask, prompts aligned to the right."""
    T = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), T, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            tokens[i, T - len(p):] = torch.tensor(p)
            valid[i, T - len(p):] = True
    return tokens.to(device), valid.to(device)


class Decoder:
    """Owns the caches, the prefill and the one-token step, so repeated calls reuse buffers
    (and, once compiled, CUDA graphs). `run_prefill` and `step` may be replaced by
    captured versions (see fast.py)."""

    def __init__(self, model):
        self.model = model
        self._caches = {}

    def cache(self, batch: int, max_len: int, n_prefix: int):
        # Round the length up, so requests of similar length share one cache (and one
        # compiled step): masked extra slots cost next to nothing.
        max_len = -(-max_len // 128) * 128
        key = (batch, max_len)
        if key not in self._caches:
            self._caches[key] = self.model.new_cache(batch, max_len, n_prefix)
        c = self._caches[key]
        c.reset(n_prefix)
        return c

    def prefill(self, tokens, valid, max_len, adapter=None):
        """A cache holding the prompts (and the adapter's states), and the logits (B, V) of
        the first new token."""
        n_pre = adapter.n_prefix if adapter is not None else 0
        cache = self.cache(tokens.shape[0], max_len, n_pre)
        return cache, self.run_prefill(cache, tokens, valid, adapter)

    @torch.no_grad()
    def run_prefill(self, cache, tokens, valid, adapter):
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

    def beam_step(self, cache, rows, since: int, tokens):
        """Beam search's step: row i first becomes old row rows[i] (slots before `since` are
        shared by the rows it maps between, see KVCache.reorder), then `step`. fast.py does
        both in one captured graph."""
        cache.reorder(rows, since=since)
        return self.step(cache, tokens)


@torch.no_grad()
def generate(model, prompts: list[list[int]], cfg: GenerationConfig, adapter=None,
             decoder: Decoder | None = None, on_token=None) -> list[list[int]]:
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
    if n_pre + longest + cfg.max_new_tokens > a.max_seq_len:
        raise UserError(f"prompt ({longest} tokens) plus max_new_tokens ({cfg.max_new_tokens})"
                        f"{f' plus {n_pre} prefix slots' if n_pre else ''} exceeds the model's context "
                        f"of {a.max_seq_len} tokens", ("max_new_tokens",))
    decoder = decoder or Decoder(model)
    device = model.tok_embeddings.weight.device
    tokens, valid = left_pad(prompts, a.pad_id, device)
    cache, logits = decoder.prefill(tokens, valid, n_pre + longest + cfg.max_new_tokens, adapter)
    if cfg.beams == 1:
        return _sample(decoder, cache, logits, cfg, eos, on_token)
    return _beam_search(decoder, cache, logits, cfg, eos)


def _pick(logits, cfg: GenerationConfig, gen):
    if cfg.temperature == 0:
        return logits.argmax(-1)
    # Shifted so the largest logit is 0 before dividing: a tiny temperature then sends the others
    # to -inf (greedy, its limit) rather than everything to +-inf and NaN.
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1:
        sorted_l, order = logits.sort(-1, descending=True)
        cum = sorted_l.softmax(-1).cumsum(-1)
        drop = cum - sorted_l.softmax(-1) > cfg.top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_l.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


def _sample(decoder, cache, logits, cfg, eos, on_token):
    B = logits.shape[0]
    gen = None
    if cfg.temperature > 0:
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(cfg.seed if cfg.seed is not None else torch.seed())
    eos_t = torch.tensor(eos, device=logits.device, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool, device=logits.device)
    out = []
    for t in range(cfg.max_new_tokens):
        nxt = _pick(logits, cfg, gen)
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


def _cut(row: list[int], eos) -> list[int]:
    for j, t in enumerate(row):
        if t in eos:
            return row[: j + 1]
    return row


def _beam_search(decoder, cache, logits, cfg, eos):
    """HF transformers' beam search (generation/utils.py `_beam_search`), batched.

    The stop test never waits for the step it tests: each step's "still searching" flag is
    copied to the host without blocking and read one step later, when the device has long
    finished it, so the host keeps queueing steps (on a GPU, the next graph replay) instead
    of idling between them. The step after a stop is therefore computed but changes nothing:
    every update is gated by the device-side flag `live`."""
    B, V = logits.shape
    K, N, lp = cfg.beams, cfg.max_new_tokens, cfg.length_penalty
    dev = logits.device
    keep = max(2, 1 + len(eos)) * K
    cache = decoder.expand(cache, K)
    prompt_end = cache.length  # the beams of a prompt share everything before this slot
    logits = logits.repeat_interleave(K, 0)
    eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
    run_seq = torch.zeros(B, K, N, dtype=torch.long, device=dev)
    run_score = torch.zeros(B, K, device=dev)
    run_score[:, 1:] = -1e9  # all beams start equal: only the first may expand at step 0
    fin_seq = torch.zeros(B, K, N, dtype=torch.long, device=dev)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    fin_score = torch.full((B, K), -1e9, device=dev)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, dtype=torch.bool, device=dev)
    live = torch.ones((), dtype=torch.bool, device=dev)
    top_k_mask = torch.arange(keep, device=dev) < K
    batch_off = (torch.arange(B, device=dev) * K)[:, None]
    cuda = dev.type == "cuda"
    flags = torch.ones(N, dtype=torch.bool, pin_memory=cuda)  # live after step t, on the host
    copied = None  # CUDA: the event after the previous step's flag copy
    for t in range(N):
        logp = F.log_softmax(logits.float(), -1).view(B, K, V) + run_score[:, :, None]
        cand_score, idx = logp.view(B, K * V).topk(keep)
        beam, tok = idx // V, idx % V
        cand_seq = run_seq.gather(1, beam[:, :, None].expand(B, keep, N)).clone()
        cand_seq[:, :, t] = tok
        hits = torch.isin(tok, eos_t) | (t + 1 == N)
        # Running beams: the best K candidates that did not finish.
        alive = cand_score - 1e9 * hits.float()
        nxt = alive.topk(K).indices
        run_seq = torch.where(live, cand_seq.gather(1, nxt[:, :, None].expand(B, K, N)), run_seq)
        run_score = torch.where(live, alive.gather(1, nxt), run_score)
        src_beam = beam.gather(1, nxt)
        # Finished hypotheses: candidates among the top K that hit EOS or the length limit.
        just = hits & top_k_mask[None]
        fs = cand_score / ((t + 1) ** lp) - 1e9 * (~improvable[:, None]).float() - 1e9 * (~just).float()
        m_score = torch.cat([fin_score, fs], 1)
        best = m_score.topk(K).indices
        fin_seq = torch.where(live, torch.cat([fin_seq, cand_seq], 1).gather(1, best[:, :, None].expand(B, K, N)),
                              fin_seq)
        fin_len = torch.where(live, torch.cat([fin_len, torch.full_like(fs, t + 1, dtype=torch.long)], 1)
                              .gather(1, best), fin_len)
        fin_done = torch.where(live, torch.cat([fin_done, just], 1).gather(1, best), fin_done)
        fin_score = torch.where(live, m_score.gather(1, best), fin_score)
        best_running = run_score[:, 0] / ((t + 1) ** lp)
        worst_fin = torch.where(fin_done.all(1), fin_score.min(1).values, torch.full_like(best_running, -1e9))
        improvable &= best_running > worst_fin
        if t + 1 == N:
            break
        if eos:
            live = live & improvable.any() & ~hits.all()
            flags[t].copy_(live, non_blocking=True)
            if t > 0:  # read a step late: see the docstring
                if copied is not None:
                    copied.synchronize()
                if not bool(flags[t - 1]):
                    break
            if cuda:
                copied = torch.cuda.Event()
                copied.record()
        logits = decoder.beam_step(cache, (src_beam + batch_off).flatten(), prompt_end, run_seq[:, :, t].flatten())
    return [fin_seq[b, 0, : fin_len[b, 0]].tolist() for b in range(B)]
