"""Where a LoRA prefill's low-rank products go (issue 13): one fused linear plus its low-rank
update, y = x W^T + (x A^T) Bm^T, compiled as the prefill compiles it, on the LLaMA-2-7B
shapes, timed per variant of the update (median of 5 rounds of 20 calls, synchronized).

  python scripts/probes/lora_prefill.py [--batch 8] [--tokens 274] [--rank 4] [--per-row]

Variants: `none` (the base linear alone), `lib` (layer_state.lora_update as it is), and
FIRST+SECOND: the first product x.A as a GEMM (`bmm`), with A's rows padded to 16
(`pad16`, `pad16T`: stored (in, 16)), or as a reduction (`red`); the second one (x.A).B per part
as a GEMM of K = r (`bmm`) or as a rank sum fused into the add (`sum`); `pad8+badd`: both products
padded to 8 ranks, the second one against a block-diagonal B, added into y by cuBLAS (baddbmm),
which the library had in e806ce0 and gave back (results/probes/lora-prefill-2026-11-26.txt; in
its call-5 runs `lib` was that form and `bmm+bmm`, since dropped, the library's form, `lib` now).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minipara.model.layer_state import lora_update

SHAPES = {
    "qkv": (4096, (4096, 4096, 4096)),
    "o": (4096, (4096,)),
    "gate_up": (4096, (11008, 11008)),
    "down": (11008, (4096,)),
}


def first_bmm(x, a):  # x.A as a GEMM against A's (R, in) rows
    return x @ a.mT


def first_red(x, a):  # as a reduction over `in`, which the compiler writes itself
    return (x[..., None, :] * (a[:, None] if a.dim() == 3 else a)).sum(-1)


def pad16(a):  # A's rows padded to 16 (16-byte aligned bfloat16 rows of x.A), once, outside the timing
    return F.pad(a, (0, 0, 0, 16 - a.shape[-2]))


def second_bmm(xa, bm, split):  # each part's (x.A) . B as a GEMM of K = r
    n = len(split)
    return torch.cat([xa[..., p::n] @ b for p, b in enumerate(bm.split(split, -1))], -1)


def second_badd(y, xa, bm, split):  # one GEMM against B made block-diagonal, added into y by cuBLAS
    n = len(split)  # xa: (B, T, r * n + pad), A's rows padded to a multiple of 8
    bd = torch.cat([F.pad(b.unsqueeze(-2), (0, 0, p, n - 1 - p)) for p, b in enumerate(bm.split(split, -1))], -1)
    bd = F.pad(bd.flatten(-3, -2), (0, 0, 0, xa.shape[-1] - n * bm.shape[-2]))  # part p's B at rows j * n + p
    if bd.dim() == 2:
        return torch.addmm(y.flatten(0, -2), xa.flatten(0, -2), bd).view_as(y)
    return torch.baddbmm(y, xa, bd)


def second_sum(xa, bm, split):  # as a rank sum, which the compiler fuses into the add
    n, r = len(split), bm.shape[-2]
    if bm.dim() == 3:
        bm = bm[:, None]
    return torch.cat(
        [sum(xa[..., j * n + p, None] * b[..., j, :] for j in range(r)) for p, b in enumerate(bm.split(split, -1))], -1
    )


# name: (prepare A once, first product, second product)
VARIANTS = {
    "none": None,
    "lib": (None, None, None),
    "bmm+sum": (lambda a: a, first_bmm, second_sum),
    "pad16+bmm": (pad16, first_bmm, second_bmm),
    "pad16+sum": (pad16, first_bmm, second_sum),
    "pad16T+sum": (lambda a: pad16(a).mT.contiguous().mT, first_bmm, second_sum),
    "red+sum": (lambda a: a, first_red, second_sum),
    "pad8+badd": (lambda a: F.pad(a, (0, 0, 0, -a.shape[-2] % 8)), first_bmm, second_badd),
}


def with_update(variant, y, x, a, bm, split):
    if variant == (None, None, None):
        return y + lora_update(x, a, bm, split if len(split) > 1 else None)
    _, first, second = variant
    if second is second_badd:
        return second_badd(y, first(x, a), bm, split)
    R = len(split) * bm.shape[-2]
    return y + second(first(x, a)[..., :R], bm, split)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=274)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--per-row", action="store_true", help="each row its own pair (a mixture's tenants)")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--profile", action="store_true", help="kernel table of each variant")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test (timings mean nothing there)")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64  # every shape and variant compiled, none left eager
    dev, dt = args.device, torch.bfloat16
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    print(vars(args))
    for name, (fan_in, split) in SHAPES.items():
        B, T, r, n = args.batch, args.tokens, args.rank, len(split)
        x = torch.randn(B, T, fan_in, device=dev, dtype=dt)
        w = torch.randn(sum(split), fan_in, device=dev, dtype=dt) * fan_in**-0.5
        lead = (B,) if args.per_row else ()
        a = torch.randn(*lead, r * n, fan_in, device=dev, dtype=dt) * fan_in**-0.5
        bm = torch.randn(*lead, r, sum(split), device=dev, dtype=dt)
        ref = None
        row = []
        for vname, v in VARIANTS.items():

            def f(x, w, a, bm, v=v, split=split):
                y = x @ w.T
                return y if v is None else with_update(v, y, x, a, bm, split)

            g = f if args.eager else torch.compile(f, dynamic=False)
            av = a if v is None or v[0] is None else v[0](a)
            y = g(x, w, av, bm)
            if vname == "lib":
                ref = y.float()
            elif ref is not None:
                assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max(), (name, vname)
            rounds = []
            for _ in range(5):
                sync()
                t0 = time.perf_counter()
                for _ in range(20):
                    g(x, w, av, bm)
                sync()
                rounds.append((time.perf_counter() - t0) / 20 * 1e6)
            row.append(f"{vname} {statistics.median(rounds):6.1f}")
            if args.profile and dev == "cuda":
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        g(x, w, av, bm)
                    sync()
                print(f"## {name} {vname} (10 calls)")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))
        print(f"{name:8s} us: " + "  ".join(row), flush=True)


if __name__ == "__main__":
    main()
