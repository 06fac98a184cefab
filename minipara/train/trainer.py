"""Training an adapter on a frozen base model: the papers' recipe, resumable.

The core works on pre-tokenised examples, `(prompt_ids, response_ids)` pairs, and on
`EvalSet`s (prompts plus a scoring function over generated ids), so it runs without a
tokenizer or task files; `prepare_task` builds both from a task and a tokenizer.

- Loss: cross-entropy on response tokens only, averaged over all response tokens of the
  (accumulated) batch, so micro-batching gives the same gradient as one big batch. Logits
  are computed only where a response token is predicted (Gemma's vocabulary is 262k).
- Prompt poolers see prompt positions only (`pool_mask`): the generated vectors are the
  ones inference computes from the prompt alone.
- Bi-level (methods with rational activations, `arch_parameters()`): first-order DARTS.
  Each step first updates the rational parameters on a dev-split batch (their own AdamW,
  peak lr `arch_lr`), then everything else on a train-split batch (AdamW, peak lr `lr`);
  both follow the same linear decay after warm-up. Each group is frozen while the other
  one steps. Gradients are clipped to a global norm of 1.0 (the Transformers default).
- The best checkpoint and early stopping follow the dev loss, as the papers do; the dev
  metric is computed and logged at every evaluation too (`select="metric"` picks by it,
  ties broken by the lower dev loss).
- Examples longer than `max_len` (2048) tokens lose the start of their prompt (after BOS);
  the response is kept whole. `Trainer.cut` counts them per split.
- A checkpoint (adapter, optimizers, scheduler, data position, RNG states, best adapter,
  patience) is written after every evaluation and on request_stop(); resuming continues
  to the same result, bit for bit on the CPU, as an uninterrupted run.
"""

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from minipara.checks import check_fields, check_seed, default, kind, valid
from minipara.decode.generation import Decoder, GenerationConfig, context_room, generate
from minipara.errors import UserError
from minipara.io.files import atomic_write
from minipara.io.identity import base_record, canonical_args, compare_base
from minipara.io.tokenizer import encode_example, end_id
from minipara.methods import method_class
from minipara.methods.base import check_values, config_dict
from minipara.train.distributed import Ranks

CKPT_FORMAT = "minipara-train-checkpoint"
CKPT_VERSION = 3  # 2: progress as TrainState, dev-loss selection, the arch scheduler; 3: weights fingerprint
Pair = tuple[list[int], list[int]]


class Diverged(UserError):
    """The loss or the adapter became NaN, inf or absurd: the run stopped (lower the lr)."""


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 10
    max_steps: int | None = None  # None: epochs decide
    batch_size: int | None = None  # None: 16 for under 10k training examples, else 128
    micro_batch: int | None = None  # None: the whole batch at once
    lr: float = 1e-4
    arch_lr: float = 1e-6  # rational activations' own optimizer (bi-level)
    warmup: float = 0.06  # fraction of the steps
    weight_decay: float = 0.0  # HF Trainer's default; decay would pull PARA's scales (init 1) to 0
    max_grad_norm: float = 1.0  # global gradient clipping (0: none), per optimizer group
    max_len: int = 2048  # tokens per example; longer prompts are cut from the start
    select: str = "loss"  # the best checkpoint and early stopping: dev "loss" or dev "metric"
    eval_every: int | None = None  # None: 200 steps, or each epoch when an epoch is shorter
    patience: int = 10  # evaluations without a better selection score (see select) before stopping
    eval_beams: int = 3
    eval_batch: int = 16  # prompts decoded together

    def __post_init__(self):
        # Each option of its kind: an lr of "1e-4" fails here, not deep in AdamW; an infinite
        # one trains to NaN and would still save a "best" adapter.
        check_fields(self)

    def resolved(self, n_train: int) -> "TrainConfig":
        """A copy with the data-dependent defaults filled in, checked."""
        c = TrainConfig(**asdict(self))
        if c.batch_size is None:  # (0 is refused below, not taken for "the default")
            c.batch_size = 16 if n_train < 10_000 else 128
        if c.micro_batch is None:
            c.micro_batch = c.batch_size
        for name in ("batch_size", "micro_batch", "epochs", "eval_beams", "eval_batch"):
            if getattr(c, name) < 1:
                raise UserError(f"{name} must be at least 1 (got {getattr(c, name)})", (name,))
        if c.batch_size % c.micro_batch:
            raise UserError(
                f"batch_size {c.batch_size} is not divisible by micro_batch {c.micro_batch}",
                ("batch_size", "micro_batch"),
            )
        if c.max_steps is not None and c.max_steps < 1:
            raise UserError(f"max_steps must be at least 1 (got {c.max_steps})", ("max_steps",))
        if c.patience < 1 or (c.eval_every is not None and c.eval_every < 1):
            raise UserError("patience and eval_every must be at least 1", ("patience", "eval_every"))
        check_seed(c.seed)
        if c.lr <= 0 or c.arch_lr < 0 or not 0 <= c.warmup < 1:
            raise UserError("need lr > 0, arch_lr >= 0 and 0 <= warmup < 1", ("lr", "arch_lr", "warmup"))
        if c.max_grad_norm < 0 or c.max_len < 2:
            raise UserError("need max_grad_norm >= 0 (0: no clipping) and max_len >= 2", ("max_grad_norm", "max_len"))
        if c.select not in ("loss", "metric"):
            raise UserError(f"select must be loss or metric (got {c.select!r})", ("select",))
        per_epoch = math.ceil(n_train / c.batch_size)
        c.eval_every = c.eval_every or min(200, per_epoch)
        return c


@dataclass
class EvalSet:
    """What evaluation decodes and how it is scored: `score(generated ids per prompt)` returns
    metrics with the primary one first. Generated ids come without the stop token."""

    prompts: list[list[int]]
    score: Callable[[list[list[int]]], dict]
    max_new_tokens: int
    stop_ids: tuple[int, ...]


# ---- batches and loss -----------------------------------------------------------------------
def collate(pairs: list[Pair], pad_id: int, device):
    """Right-padded prompt+response rows. Position j predicts token j+1, so the last response
    token is only a target. Returns tokens, valid, pool (prompt positions), target mask, targets."""
    T = max(len(p) + len(r) - 1 for p, r in pairs)
    B = len(pairs)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    targets = torch.zeros(B, T, dtype=torch.long)
    valid, pool, tmask = (torch.zeros(B, T, dtype=torch.bool) for _ in range(3))
    for i, (p, r) in enumerate(pairs):
        seq = p + r[:-1]
        tokens[i, : len(seq)] = torch.tensor(seq)
        valid[i, : len(seq)] = True
        pool[i, : len(p)] = True
        tmask[i, len(p) - 1 : len(p) - 1 + len(r)] = True
        targets[i, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(r)
    return tuple(t.to(device) for t in (tokens, valid, pool, tmask, targets))


def loss_sum(model, adapter, pairs: list[Pair]) -> torch.Tensor:
    """Summed cross-entropy over the response tokens of `pairs` (float32)."""
    tokens, valid, pool, tmask, targets = collate(pairs, model.args.pad_id, model.tok_embeddings.weight.device)
    h = model(tokens, valid=valid, adapter=adapter, pool_mask=pool, hidden_only=True)
    logits = model.logits(h[tmask]).float()  # only where a response token is predicted
    return F.cross_entropy(logits, targets[tmask], reduction="sum")


@torch.no_grad()
def mean_loss(model, adapter, pairs: list[Pair], batch: int, ranks: Ranks = Ranks()) -> float:
    """Mean cross-entropy per response token; split over the ranks unless the base is sharded."""
    mine = pairs if ranks.lockstep else ranks.share(pairs)
    total = sum(float(loss_sum(model, adapter, mine[i : i + batch])) for i in range(0, len(mine), batch))
    return (total if ranks.lockstep else ranks.sum(total)) / sum(len(r) for _, r in pairs)


def cut_prompt(prompt: list[int], keep: int) -> list[int]:
    """The prompt's first token (BOS) and its last keep - 1 tokens: a long prompt loses its start."""
    return prompt if len(prompt) <= keep else prompt[:1] + prompt[len(prompt) - keep + 1 :]


def fit_pairs(pairs: list[Pair], max_len: int, split: str) -> tuple[list[Pair], int]:
    """Pairs of at most max_len tokens, prompts cut from the start (the response is kept
    whole), and how many were cut."""
    out, n = [], 0
    for i, (p, r) in enumerate(pairs):
        if len(p) + len(r) > max_len:
            if len(r) + 2 > max_len:
                raise UserError(
                    f"{split} example {i + 1}: its response alone ({len(r)} tokens) leaves no room "
                    f"for a prompt within max_len {max_len}; raise it or drop the example",
                    ("max_len",),
                )
            out.append((cut_prompt(p, max_len - len(r)), r))
            n += 1
        else:
            out.append(pairs[i])
    return out, n


def fit_eval(ev: "EvalSet", max_len: int, split: str) -> tuple["EvalSet", int]:
    """The EvalSet with every prompt cut so that it and max_new_tokens fit in max_len."""
    keep = max_len - ev.max_new_tokens
    if keep < 2:
        raise UserError(
            f"{split}: {ev.max_new_tokens} new tokens leave no room for a prompt within "
            f"max_len {max_len}; raise max_len or lower max_new_tokens",
            ("max_len", "max_new_tokens"),
        )
    prompts = [cut_prompt(p, keep) for p in ev.prompts]
    return EvalSet(prompts, ev.score, ev.max_new_tokens, ev.stop_ids), sum(len(p) > keep for p in ev.prompts)


def check_pairs(pairs: list[Pair], split: str, max_len: int, n_prefix: int = 0):
    if not pairs:
        raise UserError(f"the {split} split is empty: it needs at least one example")
    for i, (p, r) in enumerate(pairs):
        if not p or not r:
            raise UserError(f"{split} example {i + 1} has an empty {'prompt' if not p else 'response'}")
        if len(r) > context_room(max_len, len(p), n_prefix):
            raise UserError(
                f"{split} example {i + 1}: prompt ({len(p)} tokens) plus response ({len(r)} tokens)"
                f"{f' plus {n_prefix} prefix slots' if n_prefix else ''} exceed the model's "
                f"context of {max_len} tokens; shorten or drop it"
            )


def check_eval(ev: "EvalSet", split: str, max_len: int, n_prefix: int = 0):
    for i, p in enumerate(ev.prompts):
        if ev.max_new_tokens > context_room(max_len, len(p), n_prefix):
            raise UserError(
                f"{split} example {i + 1}: prompt ({len(p)} tokens) plus {ev.max_new_tokens} new tokens"
                f"{f' plus {n_prefix} prefix slots' if n_prefix else ''} exceed the model's context "
                f"of {max_len} tokens; shorten it or lower --max-new-tokens"
            )


# ---- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def decode_all(
    model, adapter, ev: EvalSet, beams: int, batch: int, decoder=None, should_stop=None, ranks: Ranks = Ranks()
):
    """Generated ids (stop token removed) for every prompt, or None if should_stop() became true.
    Prompts are batched by length to waste little on padding; the order is kept in the result.
    Several ranks decode one contiguous part each of the length order, and all get the whole
    result (with a sharded base every rank decodes everything: they must run the same forwards)."""
    cfg = GenerationConfig(max_new_tokens=ev.max_new_tokens, beams=beams, eos_ids=tuple(ev.stop_ids))
    order = sorted(range(len(ev.prompts)), key=lambda i: len(ev.prompts[i]))
    out = [None] * len(order)
    if ranks.world > 1 and not ranks.lockstep:
        mine = ranks.share(order)
        part = decode_all(
            model,
            adapter,
            EvalSet([ev.prompts[i] for i in mine], ev.score, ev.max_new_tokens, ev.stop_ids),
            beams,
            batch,
            decoder,
        )
        for i, g in ranks.gather(list(zip(mine, part))):
            out[i] = g
        return out
    for s in range(0, len(order), batch):
        if should_stop is not None and should_stop():
            return None
        rows = order[s : s + batch]
        gens = generate(model, [ev.prompts[i] for i in rows], cfg, adapter=adapter, decoder=decoder)
        for i, g in zip(rows, gens):
            out[i] = g[:-1] if g and g[-1] in ev.stop_ids else g
    return out


def evaluate(
    model, adapter, ev: EvalSet, beams: int = 3, batch: int = 16, decoder=None, ranks: Ranks = Ranks()
) -> dict:
    return ev.score(decode_all(model, adapter, ev, beams, batch, decoder, ranks=ranks))


def warmup_linear(total: int, warmup: int):
    """HF's get_linear_schedule_with_warmup as a LambdaLR factor."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=list).encode()).hexdigest()


def _clone(state: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# ---- the trainer ------------------------------------------------------------------------------
@dataclass
class Result:
    status: str  # "finished" (early stop, epochs or max steps) or "interrupted"
    step: int
    total_steps: int
    best_metric: float | None  # the dev metric of the selected checkpoint
    best_dev: dict | None
    best_step: int | None
    stopped_by: str = ""  # why training ended: max_steps | epochs | early_stopping
    wall_time: float = 0.0  # seconds, summed over interrupted sessions
    history: list = field(default_factory=list)
    best_dev_loss: float | None = None


@dataclass
class TrainState:
    """A run's progress: what a checkpoint keeps besides tensors and RNG states, and all a
    resume needs to continue the same run."""

    step: int = 0
    epoch: int = 0  # the train split's permutation in use, and the next batch in it
    pos: int = 0
    dev_epoch: int = 0  # the same for bi-level dev batches
    dev_pos: int = 0
    best: list | None = None  # the selection score of the best evaluation (higher is better)
    best_dev: dict | None = None  # its dev metrics, dev loss and step
    best_dev_loss: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # evaluations since the best one
    eval_due: bool = False
    done: bool = False
    stopped_by: str = ""
    loss_total: float = 0.0  # train loss since the last evaluation
    loss_count: int = 0
    elapsed: float = 0.0  # seconds of earlier sessions
    history: list = field(default_factory=list)  # one event per evaluation


class Trainer:
    """Train `adapter` on a frozen `model`.

    train, dev: pairs; dev_eval: the dev EvalSet (its metric is logged at every evaluation);
    dev pairs also give the dev loss (what selects and stops, by default) and the bi-level
    batches. ckpt_path: where checkpoints go (None: none). log(event dict), on_best(adapter),
    on_step(trainer): hooks for the caller. `state` holds the progress, `cut` the number of
    examples per split whose prompt was cut to `max_len`. ranks: the torchrun processes
    training together (distributed.py); log, on_best, progress and checkpoints are rank 0's.
    """

    def __init__(
        self,
        model,
        adapter,
        train: list[Pair],
        dev: list[Pair],
        dev_eval: EvalSet,
        cfg: TrainConfig,
        ckpt_path=None,
        log=None,
        on_best=None,
        on_step=None,
        progress=None,
        ranks: Ranks = Ranks(),
    ):
        self.cfg = c = cfg.resolved(len(train))
        train, n_train = fit_pairs(train, c.max_len, "train")
        dev, n_dev = fit_pairs(dev, c.max_len, "dev")
        dev_eval, n_eval = fit_eval(dev_eval, c.max_len, "dev")
        self.cut = {"train": n_train, "dev": n_dev, "dev_eval": n_eval}
        check_pairs(train, "train", model.args.max_seq_len, adapter.n_prefix)
        check_pairs(dev, "dev", model.args.max_seq_len, adapter.n_prefix)
        check_eval(dev_eval, "dev", model.args.max_seq_len, adapter.n_prefix)
        self.model, self.adapter, self.train, self.dev, self.dev_eval = model, adapter, train, dev, dev_eval
        self.ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
        self.ranks = ranks
        self.log, self.on_best, self.progress = (log, on_best, progress) if ranks.main else (None, None, None)
        self.on_step = on_step
        model.requires_grad_(False)  # the base stays frozen: only adapter tensors train
        arch = list(adapter.arch_parameters()) if hasattr(adapter, "arch_parameters") else []
        ids = {id(p) for p in arch}
        self.arch = arch
        self.weights = [p for p in adapter.parameters() if id(p) not in ids]
        self.per_epoch = math.ceil(len(train) / c.batch_size)
        self.total = min(c.max_steps or math.inf, c.epochs * self.per_epoch)
        adapter.requires_grad_(True)
        warm = math.ceil(c.warmup * self.total)
        self.opt = torch.optim.AdamW(self.weights, lr=c.lr, weight_decay=c.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_linear(self.total, warm))
        self.arch_opt = self.arch_sched = None
        if arch:  # the architecture parameters follow the same schedule at their own peak lr
            self.arch_opt = torch.optim.AdamW(self.arch, lr=c.arch_lr, weight_decay=0.0)
            self.arch_sched = torch.optim.lr_scheduler.LambdaLR(self.arch_opt, warmup_linear(self.total, warm))
        self.decoder = Decoder(model)
        self.stop_reason = None
        self.state = TrainState()
        self.best_state = None  # the best adapter's tensors (saved in the checkpoint too)
        self.identity = self.run_identity()  # once: hashing a large training set takes a moment
        torch.manual_seed(c.seed)
        random.seed(c.seed)

    # -- identity of a run, checked on resume --
    def run_identity(self) -> dict:
        return {
            "method": self.adapter.method,
            "adapter_config": json.loads(json.dumps(config_dict(self.adapter.config), default=list)),
            "model": base_record(self.model.args, self.model.weights_id),
            "model_args": canonical_args(self.model.args),
            "train_config": asdict(self.cfg),
            "data": fingerprint(
                [
                    self.train,
                    self.dev,
                    self.dev_eval.prompts,
                    self.dev_eval.max_new_tokens,
                    list(self.dev_eval.stop_ids),
                ]
            ),
        }

    def request_stop(self, reason: str = "stop requested"):
        """Stop after the current step (or abort a running evaluation), save a checkpoint and
        return an interrupted Result. The CLI's signal handler calls this."""
        self.stop_reason = reason

    # -- data order: a fixed permutation per (seed, epoch), so a position is all a resume needs --
    def _order(self, n: int, salt: int, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed((self.cfg.seed << 24) + (salt << 20) + epoch)
        return torch.randperm(n, generator=g).tolist()

    def _next_train(self) -> list[Pair]:
        b, s = self.cfg.batch_size, self.state
        idx = self._order(len(self.train), 0, s.epoch)[s.pos * b : (s.pos + 1) * b]
        s.pos += 1
        if s.pos == self.per_epoch:
            s.epoch, s.pos = s.epoch + 1, 0
        return [self.train[i] for i in idx]

    def _next_dev(self) -> list[Pair]:
        b, s = min(self.cfg.batch_size, len(self.dev)), self.state
        idx = self._order(len(self.dev), 1, s.dev_epoch)[s.dev_pos * b : (s.dev_pos + 1) * b]
        s.dev_pos += 1
        if s.dev_pos == math.ceil(len(self.dev) / b):
            s.dev_epoch, s.dev_pos = s.dev_epoch + 1, 0
        return [self.dev[i] for i in idx]

    def _update(self, pairs: list[Pair], params: list, opt) -> float:
        """One optimizer step of `params` on `pairs`, accumulated over micro-batches and
        clipped to the global norm; the adapter's other parameters are frozen meanwhile.
        Returns the mean token loss."""
        keep = {id(p) for p in params}
        for p in self.adapter.parameters():
            p.requires_grad_(id(p) in keep)
        opt.zero_grad(set_to_none=True)
        n_tok = sum(len(r) for _, r in pairs)  # of the global batch: N ranks sum to one process's gradient
        total = 0.0
        for part, counts in self.ranks.micro_batches(pairs, self.cfg.micro_batch):
            loss = loss_sum(self.model, self.adapter, part)
            if not counts:  # a sharded base's padding: the ranks run the same passes, this one adds nothing
                loss = loss * 0.0
            (loss / n_tok).backward()
            total += loss.item()
        self.ranks.sum_grads(params)  # before clipping: the global norm is that of the summed gradient
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return self.ranks.sum(total) / n_tok

    def _train_step(self):
        if self.arch:  # first-order DARTS: the rational parameters step on dev data at the current weights
            arch_loss = self._update(self._next_dev(), self.arch, self.arch_opt)
            self._check_diverged(arch_loss, "dev loss of the bi-level step", self.state.step + 1)
            self.arch_sched.step()
        loss = self._update(self._next_train(), self.weights, self.opt)
        self._check_diverged(loss, "train loss", self.state.step + 1)
        self.sched.step()
        s = self.state
        s.step += 1
        s.loss_total += loss
        s.loss_count += 1
        return loss

    def _check_diverged(self, loss: float, what: str, step: int):
        """Stop the run at the first step whose loss, or whose adapter, is NaN, inf or absurd
        (check_values): training on would write NaN adapters and reports. Every rank sees the
        same summed loss and the same adapter, so all stop together. The files stay as the last
        evaluation left them; the adapter in memory becomes the best one, if any."""
        try:
            if not math.isfinite(loss):
                raise UserError(f"the {what} is {loss}")
            check_values(self.adapter, "the adapter")
        except UserError as e:
            s = self.state
            self.adapter.requires_grad_(True)  # undo _update's freezing of one group
            self.load_best()
            kept = "no adapter was saved" if s.best is None else f"the best adapter (step {s.best_step}) is kept"
            if self.ckpt_path is not None and self.ckpt_path.exists():
                kept += ", and the last checkpoint"
            self._log({"event": "diverged", "step": step, "reason": str(e)})
            raise Diverged(
                f"training diverged at step {step}: {e}; {kept}. Lower lr (this run's peak is {self.cfg.lr:g})",
                ("lr",),
            ) from None

    def _evaluate_dev(self) -> bool:
        """Score the dev set, track the best adapter and patience. False if interrupted."""
        model, ad, s = self.model, self.adapter, self.state
        alone = self.ranks.world == 1  # ranks abort only together, between steps
        gens = decode_all(
            model,
            ad,
            self.dev_eval,
            self.cfg.eval_beams,
            self.cfg.eval_batch,
            self.decoder,
            should_stop=(lambda: self.stop_reason is not None) if alone else None,
            ranks=self.ranks,
        )
        if gens is None:
            return False
        metrics = self.dev_eval.score(gens)
        primary = next(iter(metrics.values()))
        dev_loss = mean_loss(model, ad, self.dev, self.cfg.micro_batch, self.ranks)
        self._check_diverged(dev_loss, "dev loss", s.step)
        score = [-dev_loss] if self.cfg.select == "loss" else [float(primary), -dev_loss]
        if s.best is None or score > s.best:
            s.best, s.best_dev, s.best_dev_loss, s.best_step, s.bad_evals = score, metrics, dev_loss, s.step, 0
            self.best_state = _clone(ad.state_dict())
            if self.on_best is not None:
                self.on_best(ad)
        else:
            s.bad_evals += 1
        event = {
            "event": "eval",
            "step": s.step,
            "epoch": round(s.step / self.per_epoch, 3),
            "train_loss": s.loss_total / max(1, s.loss_count),
            "lr": self.sched.get_last_lr()[0],
            "dev": metrics,
            "dev_loss": dev_loss,
            "best_step": s.best_step,
            "best_dev_loss": s.best_dev_loss,
            "bad_evals": s.bad_evals,
            "elapsed": round(s.elapsed + time.time() - self._t0, 3),
        }
        s.history.append(event)
        self._log(event)
        s.loss_total, s.loss_count = 0.0, 0
        return True

    def _log(self, event: dict):
        if self.log is not None:
            self.log(event)

    def run(self) -> Result:
        c, s = self.cfg, self.state
        self._t0 = time.time()
        if self.progress is not None:
            self.progress.start(s.step, self.total)
        while not s.done:
            if s.eval_due:
                if not self._evaluate_dev():
                    break
                s.eval_due = False
                if s.bad_evals >= c.patience:
                    s.done, s.stopped_by = True, "early_stopping"
                elif s.step >= self.total:
                    s.done = True
                    s.stopped_by = "max_steps" if c.max_steps == self.total else "epochs"
                self.save_checkpoint()
                continue
            if self.ranks.any(self.stop_reason is not None):  # a signal may reach one rank only
                self.stop_reason = self.stop_reason or "stopped by another rank"
                break
            loss = self._train_step()
            s.eval_due = s.step % c.eval_every == 0 or s.step >= self.total
            if self.progress is not None:
                self.progress.update(s.step, loss, self.sched.get_last_lr()[0])
            if self.on_step is not None:
                self.on_step(self)
        if self.progress is not None:
            self.progress.finish()
        self.adapter.requires_grad_(True)  # undo _update's freezing of one group
        if not s.done:
            self.save_checkpoint()
            self._log({"event": "interrupted", "step": s.step, "reason": self.stop_reason})
        return self.result()

    def result(self) -> Result:
        s = self.state
        best_metric = float(next(iter(s.best_dev.values()))) if s.best_dev else None
        return Result(
            "finished" if s.done else "interrupted",
            s.step,
            self.total,
            best_metric,
            s.best_dev,
            s.best_step,
            s.stopped_by,
            s.elapsed + (time.time() - self._t0 if hasattr(self, "_t0") else 0.0),
            s.history,
            s.best_dev_loss,
        )

    def load_best(self):
        """Put the best adapter (by the selection score) into the adapter, in place."""
        if self.best_state is not None:
            with torch.no_grad():
                self.adapter.load_state_dict(self.best_state)

    # -- checkpoints: tensors, lists, dicts, numbers and strings only (torch.load weights_only) --
    def save_checkpoint(self):
        if self.ckpt_path is None:
            return
        if not self.ranks.main:  # rank 0 writes; the others wait, so none runs ahead of the file
            self.ranks.barrier()
            return
        rng = {"torch": torch.get_rng_state(), "python": _py_state(random.getstate())}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        progress = asdict(self.state)
        progress["elapsed"] = self.state.elapsed + time.time() - self._t0
        ck = {
            "format": CKPT_FORMAT,
            "version": CKPT_VERSION,
            "identity": self.identity,
            "adapter": _clone(self.adapter.state_dict()),
            "best_adapter": self.best_state,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "arch_optimizer": self.arch_opt.state_dict() if self.arch_opt else None,
            "arch_scheduler": self.arch_sched.state_dict() if self.arch_sched else None,
            "progress": progress,
            "rng": rng,
        }
        atomic_write(self.ckpt_path, lambda tmp: torch.save(ck, tmp))
        self.ranks.barrier()

    def resume(self, path=None):
        """Continue from a checkpoint written by a run with the same method, model, options and data."""
        path = Path(path or self.ckpt_path)
        if not path.is_file():
            raise UserError(
                f"--resume: no checkpoint {path} (it is written at the first evaluation or when a run is interrupted)"
            )
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user problem
            raise UserError(f"--resume: {path} is not a readable training checkpoint ({type(e).__name__})") from None
        if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
            raise UserError(f"--resume: {path} is not a minipara training checkpoint")
        if ck.get("version") != CKPT_VERSION:
            raise UserError(
                f"--resume: {path} was written by an older minipara (checkpoint version "
                f"{ck.get('version')}, this one reads {CKPT_VERSION}); start over with --force"
            )
        if not isinstance(ck.get("identity"), dict) or set(ck["identity"]) != set(self.identity):
            raise UserError(f"--resume: {path} lacks the record of the run that wrote it; start over with --force")
        _check_identity(path, ck["identity"], self.identity, self.model)
        state = _checked_progress(path, ck.get("progress"))
        dev = next(self.adapter.parameters()).device
        try:  # a damaged checkpoint: mis-shaped or missing tensors, optimizer state of another size
            with torch.no_grad():
                if ck["best_adapter"] is not None:
                    self.adapter.load_state_dict(ck["best_adapter"])  # to check its names and shapes
                self.adapter.load_state_dict({k: v.to(dev) for k, v in ck["adapter"].items()})
            self.opt.load_state_dict(ck["optimizer"])
            self.sched.load_state_dict(ck["scheduler"])
            if self.arch_opt is not None:
                self.arch_opt.load_state_dict(ck["arch_optimizer"])
                self.arch_sched.load_state_dict(ck["arch_scheduler"])
            torch.set_rng_state(ck["rng"]["torch"])
            random.setstate(_py_state(ck["rng"]["python"], back=True))
            if "cuda" in ck["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise UserError(
                f"--resume: {path} is damaged ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                "start over with --force"
            ) from None
        self.best_state = ck["best_adapter"]
        self.state = state
        self._log({"event": "resumed", "step": self.state.step, "from": str(path)})


def _py_state(state, back: bool = False):
    """random.getstate() is (version, tuple of ints, gauss) and the checkpoint keeps lists."""
    if back:
        return (state[0], tuple(state[1]), state[2])
    return [state[0], list(state[1]), state[2]]


def _checked_progress(path, progress) -> TrainState:
    """The checkpoint's TrainState, each field of its kind (minipara.checks; counts at least 0,
    None where the default is None), so a damaged record is refused rather than trained on."""
    if not isinstance(progress, dict) or set(progress) != {f.name for f in fields(TrainState)}:
        raise UserError(f"--resume: {path} has a damaged progress record; start over with --force")
    for f in fields(TrainState):
        v = progress[f.name]
        if not (v is None and default(f) is None or valid(v, kind(f), least=0)):
            raise UserError(
                f"--resume: {path} has a damaged progress record ({f.name} = {v!r}); start over with --force"
            )
    return TrainState(**progress)


def _check_identity(path, saved: dict, here: dict, model):
    if saved["method"] != here["method"]:
        raise UserError(f"--resume: {path} is a checkpoint of method {saved['method']}, not {here['method']}")
    if not isinstance(saved["model"], dict):
        raise UserError(f"--resume: {path} lacks the record of its base model; start over with --force")
    refusal, other_weights = compare_base(saved["model"], saved.get("model_args"), model.args, model.weights_id)
    if refusal or other_weights:  # a run continues on the very weights it started on
        raise UserError(
            f"--resume: {path} is a checkpoint of another model: it was {refusal or other_weights}; "
            "resume with the original --model"
        )
    # A checkpoint from before a method option existed ran with the value that keeps old files' behaviour.
    if isinstance(saved["adapter_config"], dict):
        saved = {**saved, "adapter_config": method_class(saved["method"]).config_cls.stored(saved["adapter_config"])}
    for key, what in (("adapter_config", "method option"), ("train_config", "training option")):
        s, h = saved[key], here[key]
        for k in sorted(set(s) | set(h)):
            if s.get(k) != h.get(k):
                raise UserError(
                    f"--resume: {path} was made with {what} {k}={s.get(k)!r}, this command gives "
                    f"{h.get(k)!r}; rerun with the original options"
                )
    if saved["data"] != here["data"]:
        raise UserError(
            f"--resume: {path} was made on different training or dev data (task, template or "
            "files changed); rerun with the original data or start over with --force"
        )


# ---- progress bar -----------------------------------------------------------------------------
class Progress:
    """step/total, loss, lr, it/s and ETA on one stderr line (a new line every 10 s when stderr
    is not a terminal, so logs stay readable)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def start(self, step: int, total: int):
        self.first, self.total, self.t0, self.last = step, total, time.time(), 0.0

    def update(self, step: int, loss: float, lr: float):
        now = time.time()
        if not self.tty and now - self.last < 10 and step != self.total:
            return
        self.last = now
        rate = (step - self.first) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0
        line = (
            f"step {step}/{self.total} | loss {loss:.4f} | lr {lr:.2e} | {rate:.2f} it/s | "
            f"ETA {int(eta // 3600):d}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}"
        )
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()

    def finish(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---- tasks on top: tokenise, score with the task's metric -------------------------------------
def prepare_task(
    task,
    tokenizer,
    template: str,
    max_eval: int | None = None,
    max_new_tokens: int | None = None,
    max_test: int | None = None,
):
    """(train pairs, dev pairs, dev EvalSet, test EvalSet) of a loaded task. max_eval caps the
    evaluated dev (and test) examples; max_test caps the test ones apart (0: all of them)."""

    def encode(examples):
        return [tuple(encode_example(tokenizer, template, e.prompt, e.response)) for e in examples]

    train, dev = encode(task.splits["train"]), encode(task.splits["dev"])
    stop = tuple(dict.fromkeys([end_id(tokenizer, template), tokenizer.eos_id]))
    new = max_new_tokens or max(len(r) for _, r in train + dev)

    def evalset(examples, pairs, cap):
        examples, pairs = examples[:cap], pairs[:cap]

        def score(gens):
            return task.metric([tokenizer.decode(g).strip() for g in gens], examples)

        return EvalSet([p for p, _ in pairs], score, new, stop)

    test_cap = max_eval if max_test is None else (max_test or None)
    return (
        train,
        dev,
        evalset(task.splits["dev"], dev, max_eval),
        evalset(task.splits["test"], encode(task.splits["test"]), test_cap),
    )
