"""The papers' efficiency setting: generation speed and memory of every method against the base.

A 274-token prompt (the news-article instruction of paper 002, Appendix F), exactly
32 new tokens with EOS ignored, beam 1 and 3, batch 1; a warm-up, then the median
(and min/max) of repeated runs. Tokens per second as the papers count them: new
tokens over the whole generation time (prefill included).
"""

import gc
import json
import platform
import resource
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity

from minipara.bench.hf_compare import HFGenerate
from minipara.decode.compiled import compile_decoder
from minipara.decode.generation import Decoder, GenerationConfig, generate
from minipara.methods import build_adapter
from minipara.model.shapes import SHAPES, random_model  # noqa: F401 - bench.py and loadgen name shapes through here
from minipara.train.trainer import EvalSet, TrainConfig, Trainer

PROMPT_TOKENS = 274
NEWS_PROMPT = (
    "Generate a blog post of 500 words or less that discusses the following news article:\n\n"
    "The Department of Child Protection (DCP) must pay compensation and medical expenses to a youth worker "
    "who developed pericarditis after getting a Covid booster under a workplace vaccination directive, the "
    "South Australian Employment Tribunal has ruled.\n\n"
    "In a decision handed down on 15 January 2024, the Tribunal determined that Daniel Shepherd\u2019s "
    "employment was \u201ca significant contributing cause\u201d to his injury, which has since rendered him "
    "incapable of performing his role at work.\n\n"
    "Shepherd got a Covid booster in February 2022 as a requirement for his ongoing employment with the DCP. "
    "The DCP admitted that Shepherd\u2019s pericarditis had been caused by the booster, but denied responsibility "
    "for the injury, arguing that it did not arise from Shepherd\u2019s employment, but from a lawful State "
    "Government Public Health Order (PHO), issued under the Emergency Management Act 2004 (EMA)."
)

# Each method's adapter as the papers configure it; "lora-merged" is LoRA folded into a copy of the weights.
VARIANTS = ("base", "para", "pedro", "parade", "iapt", "lora", "lora-merged", "ia3", "bitfit", "ptuning_v2")


def prompt_ids(tokenizer, bos_id: int, vocab_size: int, n: int = PROMPT_TOKENS) -> list[int]:
    """Exactly n ids: the news prompt tokenised (BOS first), cut or repeated to length (its
    LLaMA-2 tokenisation is the papers' 274 tokens; other tokenizers give other counts).
    Without a tokenizer (random-shape models), a fixed pseudo-random sequence."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        return [bos_id] + torch.randint(3, vocab_size, (n - 1,), generator=g).tolist()
    body = tokenizer.encode(NEWS_PROMPT)
    ids = [bos_id] + body
    while len(ids) < n:
        ids += body
    return ids[:n]


class TimedDecoder(Decoder):
    """Records the time to first token (prefill plus the first pick's logits)."""

    def prefill(self, *a, **kw):
        out = super().prefill(*a, **kw)
        _sync(out[1])
        self.first_token_at = time.perf_counter()
        return out


def _sync(t):
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def reset_peak(device):
    """Start a new peak-memory measurement (CUDA: allocated tensors; CPU: resident set, where
    Linux lets a process reset its high-water mark)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # the high-water mark since reset_peak
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):  # ru_maxrss (KiB): the process's peak, which only grows
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release(device):
    """Free what earlier rows left behind (compiled graphs and their CUDA-graph memory pools,
    caches), so that the next row's memory is its own."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_adapter(variant: str, model, seed: int = 0):
    """(model to run, adapter) for a variant; adapters get small random weights so that
    none is trivially the identity (speed does not depend on the values)."""
    if variant == "base":
        return model, None
    method = "lora" if variant == "lora-merged" else variant
    torch.manual_seed(seed)
    ad = build_adapter(method, model.args).to(model.tok_embeddings.weight.device)
    with torch.no_grad():
        for p in ad.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0, 0.01)
    if variant == "lora-merged":
        return ad.merge(model), None
    return model, ad


class Runner:
    """Timed generations of one setting (model, adapter, beams) through its own decoder."""

    def __init__(self, model, adapter, prompts, beams, new_tokens, compile_step):
        self.model, self.adapter, self.prompts, self.n = model, adapter, prompts, new_tokens
        self.weight = model.tok_embeddings.weight  # for device syncs
        self.device = self.weight.device
        self.decoder = TimedDecoder(model)
        if compile_step:
            compile_decoder(self.decoder)
        self.cfg = GenerationConfig(max_new_tokens=new_tokens, beams=beams, eos_ids=())
        self.totals, self.ttfts, self.warmup_s, self.peak_mb, self.last = [], [], 0.0, 0.0, None

    def generate(self):
        return generate(self.model, self.prompts, self.cfg, adapter=self.adapter, decoder=self.decoder)

    def first_token_at(self) -> float:
        return self.decoder.first_token_at

    def kv_cache_mb(self) -> float:
        """The KV caches (and positions) this setting holds: the prefill's and, for beams, the
        expanded one."""
        caches = getattr(self.decoder, "_caches", {}).values()
        return sum(b.numel() * b.element_size() for c in caches for b in c.buffers()) / 2**20

    def warm(self, n: int):
        """Untimed runs: the first compiles the decode step; on CUDA the second records the prefill."""
        t = time.perf_counter()
        for _ in range(n):
            self.generate()
        _sync(self.weight)
        self.warmup_s += time.perf_counter() - t

    def once(self):
        """One timed generation: its total time, time to first token and peak memory are kept."""
        _sync(self.weight)
        reset_peak(self.device)
        t0 = time.perf_counter()
        out = self.generate()
        _sync(self.weight)
        t1 = time.perf_counter()
        self.peak_mb = max(self.peak_mb, peak_memory_mb(self.device))
        assert all(len(o) == self.n for o in out), "EOS is ignored: every row makes exactly N tokens"
        self.totals.append(t1 - t0)
        self.ttfts.append(self.first_token_at() - t0)
        self.last = out

    def profile(self) -> str:
        """torch.profiler's table of the costliest ops of one more generation."""
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with torch.profiler.profile(activities=acts) as prof:
            self.generate()
            _sync(self.weight)
        key = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=110)

    def summary(self) -> dict:
        n, b = self.n, len(self.prompts)
        tps = sorted(n / t for t in self.totals)
        decode_tps = sorted((n - 1) / (t - f) for t, f in zip(self.totals, self.ttfts))
        return {
            "tps": statistics.median(tps),
            "tps_min": tps[0],
            "tps_max": tps[-1],
            "tps_all_rows": statistics.median(tps) * b,
            "decode_tps": statistics.median(decode_tps),
            "ttft_ms": statistics.median(self.ttfts) * 1e3,
            "peak_mb": self.peak_mb,
            "kv_mb": self.kv_cache_mb(),
            "warmup_s": self.warmup_s,
        }


class HFRunner(Runner):
    """The same timed generations through HF transformers' generate() (hf_compare.py)."""

    def __init__(self, hf, extra, prompts, beams, new_tokens, pad_id):
        self.prompts, self.n = prompts, new_tokens
        self.weight = hf.get_input_embeddings().weight
        self.device = self.weight.device
        self.generate = HFGenerate(hf, extra, prompts, beams, new_tokens, pad_id)
        self.totals, self.ttfts, self.warmup_s, self.peak_mb, self.last = [], [], 0.0, 0.0, None

    def first_token_at(self) -> float:
        return self.generate.clock.first_token_at

    def kv_cache_mb(self) -> float:
        return float("nan")  # HF's cache grows inside generate()


def run_row(model, adapter, prompts, beams, new_tokens, runs, warmup, compile_step, hf=None, profile=False):
    """Median figures of `runs` generations after `warmup` ones, from a clean state (earlier
    rows' graphs and pools released). hf: (HF model, generate kwargs) to run the same setting
    through HF generate() too, its runs taken in turns with minipara's; its figures are added
    as hf_* with x_hf = minipara's tok/s over HF's, and for the bare model (the same weights
    on both sides) the fraction of identical tokens. profile: also torch.profiler's table of
    one more generation."""
    device = model.tok_embeddings.weight.device
    release(device)
    ours = Runner(model, adapter, prompts, beams, new_tokens, compile_step)
    runners = [ours] + ([HFRunner(*hf, prompts, beams, new_tokens, model.args.pad_id)] if hf else [])
    for r in runners:
        r.warm(warmup)
    for _ in range(runs):
        for r in runners:
            r.once()
    out = ours.summary()
    if hf:
        theirs = runners[1].summary()
        out.update({f"hf_{k}": v for k, v in theirs.items() if k != "kv_mb"})
        out["x_hf"] = out["tps"] / theirs["tps"]
        if adapter is None and not hf[1]:
            out["hf_same_tokens"] = sum(x == y for a, b in zip(ours.last, runners[1].last) for x, y in zip(a, b)) / (
                new_tokens * len(prompts)
            )
    if profile:
        out["profile"] = ours.profile()
    del ours, runners
    release(device)
    return out


def run_interleaved(settings: list[tuple], prompts, new_tokens, runs, warmup, compile_step) -> list[dict]:
    """run_row for several (model, adapter, beams) settings, their timed runs taken in turns
    (A, B, C, A, B, C, ...), so that a machine whose speed drifts during the measurement
    (CPUs under other load, thermal limits) affects every setting alike. Each row's peak
    memory is the highest over its own runs (with the other settings' buffers alive)."""
    runners = [Runner(m, ad, prompts, nb, new_tokens, compile_step) for m, ad, nb in settings]
    for r in runners:
        r.warm(warmup)
    for _ in range(runs):
        for r in runners:
            r.once()
    return [r.summary() for r in runners]


def machine_info(device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


COLUMNS = [
    ("variant", "{}"),
    ("batch", "{}"),
    ("beams", "{}"),
    ("tps", "{:.1f}"),
    ("tps_min", "{:.1f}"),
    ("tps_max", "{:.1f}"),
    ("x_base", "{:.2f}"),
    ("decode_tps", "{:.1f}"),
    ("x_base_decode", "{:.2f}"),
    ("ttft_ms", "{:.1f}"),
    ("peak_mb", "{:.0f}"),
    ("kv_mb", "{:.0f}"),
    ("tps_all_rows", "{:.1f}"),
    ("warmup_s", "{:.0f}"),
    ("hf_tps", "{:.1f}"),
    ("hf_decode_tps", "{:.1f}"),
    ("hf_ttft_ms", "{:.1f}"),
    ("hf_peak_mb", "{:.0f}"),
    ("x_hf", "{:.2f}"),
    ("hf_same_tokens", "{:.2f}"),
]


def print_table(rows: list[dict], file=sys.stdout, markdown=False):
    """The rows as aligned text, or as a markdown table; columns no row has are left out."""
    cols = [(c, f) for c, f in COLUMNS if any(c in r for r in rows)]
    cells = [[c for c, _ in cols]] + [[f.format(r[c]) if c in r else "-" for c, f in cols] for r in rows]
    if markdown:
        for i, row in enumerate(cells):
            print("| " + " | ".join(row) + " |", file=file)
            if i == 0:
                print("|" + "---|" * len(row), file=file)
        return
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths)), file=file)


def add_ratios(rows: list[dict]):
    """Each row's speed over the base's at the same batch and beams, measured in this process."""
    base = {(r["batch"], r["beams"]): r for r in rows if r["variant"] == "base"}
    for r in rows:
        b = base.get((r["batch"], r["beams"]))
        if b:
            r["x_base"] = r["tps"] / b["tps"]
            r["x_base_decode"] = r["decode_tps"] / b["decode_tps"]


def save_json(path, rows, info, settings):
    with open(path, "w") as f:
        json.dump({"machine": info, "settings": settings, "results": rows}, f, indent=1)


def train_speed(
    model, method: str, ranks, steps: int, warmup: int, batch: int, micro_batch: int | None, prompt_tokens: int
) -> dict:
    """Optimizer steps per second of training `method` on `model` through the Trainer's own
    step, over synthetic examples (random prompts of prompt_tokens ids, 2-token responses);
    with several ranks (torchrun) each takes its share of every global batch of `batch`.
    Evaluation is not timed. The figures are this rank's; every rank waits for the slowest."""
    g = torch.Generator().manual_seed(0)
    a = model.args
    eos = a.eos_ids[0]

    def example():
        prompt = [a.bos_id] + torch.randint(3, a.vocab_size, (prompt_tokens - 1,), generator=g).tolist()
        return prompt, [int(torch.randint(3, a.vocab_size, (1,), generator=g)), eos]

    train = [example() for _ in range(batch * (steps + warmup))]  # no example seen twice
    dev = train[:batch]
    ev = EvalSet([p for p, _ in dev[:1]], lambda gens: {"none": 0.0}, 1, (eos,))
    _, ad = make_adapter(method, model)
    cfg = TrainConfig(max_steps=steps + warmup, batch_size=batch, micro_batch=micro_batch, eval_every=10**9)
    trainer = Trainer(model, ad, train, dev, ev, cfg, ranks=ranks)
    device = model.tok_embeddings.weight.device
    for _ in range(warmup):
        trainer._train_step()
    reset_peak(device)
    t = time.perf_counter()
    for _ in range(steps):
        trainer._train_step()
    _sync(torch.empty(0, device=device))
    dt = time.perf_counter() - t
    return {
        "method": method,
        "ranks": ranks.world,
        "batch": batch,
        "micro_batch": trainer.cfg.micro_batch,
        "prompt_tokens": prompt_tokens,
        "steps": steps,
        "steps_per_s": steps / dt,
        "examples_per_s": steps * batch / dt,
        "peak_mb": peak_memory_mb(device),
    }
