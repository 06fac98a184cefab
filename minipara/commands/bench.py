"""Generation speed and memory of every method against the bare model (the papers' setting).

python bench.py                                    # default model, CPU, beams 1 and 3
python bench.py --shape llama-2-7b --dtype bfloat16 --device cuda --json out.json
python bench.py --shape llama-2-7b --dtype bfloat16 --device cuda --batch 8 --tenants 4 --methods lora,para
torchrun --nproc-per-node 2 bench.py --train-steps 10 --shape llama-2-7b --dtype bfloat16 --device cuda --methods para
"""

import argparse
import gc
import json
import os
import sys
from pathlib import Path

import torch

from minipara import cli
from minipara.bench import speed as bm
from minipara.bench.hf_compare import hf_variant as make_hf
from minipara.commands import model_args
from minipara.decode.generation import context_room
from minipara.errors import UserError
from minipara.io.checkpoints import parse_device, parse_dtype
from minipara.io.files import check_output
from minipara.io.weights import model_dir
from minipara.methods import build_adapter
from minipara.methods.mixture import Mixture
from minipara.train import distributed


def parse(argv=None):
    p = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args.add_model_args(p)
    p.add_argument(
        "--shape",
        choices=sorted(bm.SHAPES),
        help="a randomly initialised model of this shape instead of --model (no weights needed)",
    )
    p.add_argument("--methods", default=",".join(bm.VARIANTS), help=f"comma-separated, from: {', '.join(bm.VARIANTS)}")
    p.add_argument("--beams", default="1,3", help="comma-separated beam sizes")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=bm.PROMPT_TOKENS,
        help="prompt length (default: the papers' 274; shorter only for quick checks)",
    )
    p.add_argument("--batch", type=int, default=1, help="requests per batch")
    p.add_argument(
        "--tenants",
        type=int,
        default=0,
        help="spread the batch over this many different adapters of each method (multi-tenant)",
    )
    p.add_argument(
        "--mix", action="store_true", help="with --tenants: the adapters are of different methods (those of --methods)"
    )
    p.add_argument(
        "--compile",
        choices=["auto", "yes", "no"],
        default="auto",
        help="capture the decode step with torch.compile (auto: on CUDA only)",
    )
    p.add_argument(
        "--compare-hf",
        action="store_true",
        help="also run each row through HF transformers generate() on the same weights (PEFT for "
        "LoRA and (IA)^3), runs taken in turns with minipara's; adds HF's figures and the ratio x_hf "
        "(needs transformers, and peft for the adapter rows)",
    )
    p.add_argument("--json", help="write every figure and the machine to this file")
    p.add_argument("--markdown", help="write the table as markdown to this file")
    p.add_argument("--plot", help="bar chart of tokens/s per method (needs matplotlib)")
    p.add_argument(
        "--interleave",
        action="store_true",
        help="take the timed runs of all rows (methods, or --tenants rows) in turns (A, B, A, B, "
        "...) rather than row after row, so a machine whose speed drifts affects all alike (peak "
        "memory is then the whole run's)",
    )
    p.add_argument(
        "--train-steps",
        type=int,
        help="measure training instead: optimizer steps/s over this many "
        "steps (after --warmup ones) of each of --methods on synthetic data; under torchrun data-parallel",
    )
    p.add_argument("--train-batch", type=int, default=16, help="global batch of --train-steps")
    p.add_argument("--micro-batch", type=int, help="examples per forward pass and rank (default: the rank's share)")
    p.add_argument(
        "--profile",
        help="append, per row, torch.profiler's table of the costliest ops of one more generation to this text file",
    )
    return p.parse_args(argv)


def check_options(a) -> tuple[list[str], list[int]]:
    """(variants, beam sizes), every option checked before the model loads or a row runs."""
    variants = [
        v.strip() if v.strip() == "lora-merged" else v.strip().replace("-", "_")
        for v in a.methods.split(",")
        if v.strip()
    ]
    if not variants:
        raise UserError(f"--methods {a.methods!r} names no method; choose from {', '.join(bm.VARIANTS)}")
    bad = [v for v in variants if v not in bm.VARIANTS]
    if bad:
        raise UserError(f"unknown method {bad[0]!r} for --methods; choose from {', '.join(bm.VARIANTS)}")
    try:
        beams = [int(b) for b in a.beams.split(",")]
    except ValueError:
        raise UserError(f"--beams {a.beams!r} must be comma-separated integers, such as 1,3") from None
    least = {
        "--runs": (a.runs, 1),
        "--warmup": (a.warmup, 0),
        "--new-tokens": (a.new_tokens, 2),
        "--prompt-tokens": (a.prompt_tokens, 1),
        "--batch": (a.batch, 1),
        "--tenants": (a.tenants, 0),
        "--train-steps": (a.train_steps, 1),
        "--train-batch": (a.train_batch, 1),
        "--micro-batch": (a.micro_batch, 1),
        "--beams": (min(beams), 1),
    }
    for flag, (v, low) in least.items():
        if v is not None and v < low:
            why = " (decode speed needs a token after the first)" if flag == "--new-tokens" else ""
            raise UserError(f"{flag} must be at least {low}{why}, got {v}")
    if a.mix and not a.tenants:
        raise UserError("--mix spreads --tenants over methods: give --tenants too")
    if a.tenants and not [v for v in variants if v not in ("base", "lora-merged")]:
        raise UserError("--tenants needs at least one adapter method in --methods (base and lora-merged have none)")
    for flag in ("json", "markdown", "profile", "plot"):
        path = getattr(a, flag)
        if path is not None:  # before measuring: a bad path would lose the whole benchmark
            check_output(path, f"--{flag}", (model_dir(a.model),))
            folder = Path(path).absolute().parent
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                raise UserError(f"--{flag} {path}: {folder} is not a writable folder")
    if a.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib (pip install matplotlib), which is not installed") from None
    return variants, beams


def check_context(model, variants: list[str], a):
    """Prompt, new tokens and the largest prefix (P-tuning v2, IAPT) must fit the context."""
    with torch.device("meta"):  # only n_prefix is wanted: no memory, no time
        prefix = max(
            (build_adapter(v, model.args).n_prefix for v in variants if v not in ("base", "lora-merged")), default=0
        )
    if a.new_tokens > context_room(model.args.max_seq_len, a.prompt_tokens, prefix):
        raise UserError(
            f"--prompt-tokens {a.prompt_tokens} plus --new-tokens {a.new_tokens}"
            + (f" plus {prefix} prefix slots" if prefix else "")
            + f" exceed the model's context of {model.args.max_seq_len} tokens"
        )


def main(argv=None):
    a = parse(argv)
    device, dtype = parse_device(a.device), parse_dtype(a.dtype)
    variants, beams = check_options(a)
    if a.interleave and (a.profile or a.compare_hf):
        raise UserError(
            "--interleave takes the rows' runs in turns: leave out --profile (one more generation per "
            "row) and --compare-hf (which takes minipara's and HF's runs in turns itself)"
        )
    if a.tenants and a.batch < a.tenants:
        raise UserError(f"--batch {a.batch} is smaller than --tenants {a.tenants}: each tenant needs a row")
    if a.compare_hf:
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise UserError("--compare-hf needs HF transformers: pip install transformers peft") from None
    if a.train_steps:
        return train_speed(a, variants, dtype)
    if a.shape:
        model, tok, path = bm.random_model(a.shape, dtype, device), None, None
    else:
        model, tok, path = model_args.load(a)
    check_context(model, variants, a)
    compile_step = a.compile == "yes" or (a.compile == "auto" and device.type == "cuda")
    prompt = bm.prompt_ids(tok, model.args.bos_id, model.args.vocab_size, a.prompt_tokens)
    prompts = [prompt] * a.batch
    info = bm.machine_info(device)
    info.update(
        model=a.shape or str(a.model or "default (gemma-3-270m)"),
        dtype=str(dtype).replace("torch.", ""),
        compiled=compile_step,
    )
    print(f"# {info}", file=sys.stderr)
    rows = []

    def record(name, m, ad, nb, hf_variant=None):
        hf = None
        if a.compare_hf and hf_variant:
            try:
                hf = make_hf(m, hf_variant, path, a.tenants, a.batch)
            except ImportError as e:
                raise UserError(f"--compare-hf needs {e.name} for the {hf_variant} row: pip install {e.name}") from None
        r = bm.run_row(m, ad, prompts, nb, a.new_tokens, a.runs, a.warmup, compile_step, hf, bool(a.profile))
        del hf
        if a.profile:
            with open(a.profile, "a") as f:
                f.write(f"## {name} beams={nb} batch={a.batch}: {r['tps']:.1f} tok/s\n{r.pop('profile')}\n")
        rows.append({"variant": name, "batch": a.batch, "beams": nb, **r})
        vs_hf = f", HF {r['hf_tps']:.1f} tok/s (x{r['x_hf']:.2f})" if "hf_tps" in r else ""
        print(
            f"# {name} beams={nb} batch={a.batch}: {r['tps']:.1f} tok/s, decode {r['decode_tps']:.1f}, "
            f"warm-up {r['warmup_s']:.0f} s, KV cache {r['kv_mb']:.0f} MiB, peak {r['peak_mb']:.0f} MiB{vs_hf}",
            file=sys.stderr,
            flush=True,
        )
        if a.json:  # after every row, so an interrupted run keeps what it measured
            bm.save_json(a.json, rows, info, vars(a))

    # The merged LoRA copies the weights: measure it last, once nothing else needs the original.
    order = sorted(variants, key=lambda v: v == "lora-merged")
    if a.tenants:
        methods = [v for v in order if v not in ("base", "lora-merged")]
        if a.mix:  # one batch, its tenants cycling through the methods
            groups = [[methods[i % len(methods)] for i in range(a.tenants)]]
        else:  # per method, a batch spread over `tenants` adapters of that method
            groups = [[v] * a.tenants for v in methods]
        named = [("base", None, "base")] + [
            (
                f"{'+'.join(sorted(set(g)))} x{a.tenants} mixed",
                tenant_mixture(model, g, a.batch),
                g[0] if len(set(g)) == 1 else None,
            )
            for g in groups
        ]
        if a.interleave:
            results = bm.run_interleaved(
                [(model, ad, beams[0]) for _, ad, _ in named], prompts, a.new_tokens, a.runs, a.warmup, compile_step
            )
            rows += [{"variant": n, "batch": a.batch, "beams": beams[0], **r} for (n, _, _), r in zip(named, results)]
        else:
            for name, ad, hf_variant in named:
                record(name, model, ad, beams[0], hf_variant)
    elif a.interleave:  # (--compare-hf interleaves each row with HF's instead)
        made = {v: bm.make_adapter(v, model) for v in order}
        settings = [(v, nb) for v in order for nb in beams]
        results = bm.run_interleaved(
            [(*made[v], nb) for v, nb in settings], prompts, a.new_tokens, a.runs, a.warmup, compile_step
        )
        rows += [{"variant": v, "batch": a.batch, "beams": nb, **r} for (v, nb), r in zip(settings, results)]
    else:
        for v in order:
            m, ad = bm.make_adapter(v, model)
            if v == "lora-merged":  # free the original weights before measuring the merged copy's memory:
                del model  # compiled graphs hold references to it too
                torch._dynamo.reset()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for nb in beams:
                record(v, m, ad, nb, v)
            del m, ad
    bm.add_ratios(rows)
    bm.print_table(rows)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(f"{' '.join(sys.argv)}\n\n{info}\n\n")
            bm.print_table(rows, f, markdown=True)
    if a.json:
        bm.save_json(a.json, rows, info, vars(a))
    if a.plot:
        plot(rows, a.plot)
    return 0


def train_speed(a, methods: list[str], dtype) -> int:
    """Training steps/s per method, on one process or data-parallel under torchrun; rank 0 prints."""
    methods = [m for m in methods if m not in ("base", "lora-merged")]  # nothing to train
    ranks, device = distributed.init(a.device)
    torch.manual_seed(0)  # every rank the same random base
    try:
        model = (
            bm.random_model(a.shape, dtype, device)
            if a.shape
            else model_args.load(argparse.Namespace(**{**vars(a), "device": device}))[0]
        )
        info = {**bm.machine_info(model.tok_embeddings.weight.device), "model": a.shape or a.model, "dtype": a.dtype}
        for m in methods:
            r = bm.train_speed(model, m, ranks, a.train_steps, a.warmup, a.train_batch, a.micro_batch, a.prompt_tokens)
            if ranks.main:
                print(json.dumps({**info, **r}), flush=True)
    finally:
        distributed.finish()
    return 0


def tenant_mixture(model, methods: list[str], batch: int):
    """A Mixture of one adapter per entry of `methods` (each with its own random weights),
    rows assigned round-robin."""
    ads = [bm.make_adapter(m, model, seed=i)[1] for i, m in enumerate(methods)]
    return Mixture(ads, [i % len(ads) for i in range(batch)])


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # checked before the run; kept for a matplotlib that fails to import later
        print("--plot needs matplotlib (pip install matplotlib); skipped", file=sys.stderr)
        return
    labels = [f"{r['variant']} b{r['beams']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.6), 4))
    ax.bar(labels, [r["tps"] for r in rows])
    ax.set_ylabel("tokens / s")
    ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path)
