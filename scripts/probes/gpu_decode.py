"""GPU probe for issue 13: where the decode step and the prefill spend their time, and what
candidate settings buy, on the LLaMA-2-7B shape (random weights, bf16, 274-token prompt, 32 new
tokens, batch 1), each variant in the same process as the others.

  python scripts/probes/gpu_decode.py VARIANT[,VARIANT...] [--profile FILE] [--gemv FILE]

VARIANT is METHOD/bBEAMS/OPTS: the library's compiled decoder (fast.py) with METHOD's adapter
(base: none) at BEAMS beams; OPTS new: its defaults, old: the options before 2026-11-25 late
(reduce-overhead without coordinate-descent tuning: every product through cuBLAS; the prefill
is compiled either way); joined with `+`: tune (LoRA's steps tuned too), u1 (no reduction of
up to 8 elements unrolled into its consumer), bmm (LoRA's (x.A).B at decode through cuBLAS).
(Commit 583680c had f1/f0 for LoRA's x.A folded into the base product or not, since removed.)
--profile: per-kernel GPU times of one more generation of each variant (bench.py --profile's
table; the first runs used a 40-row version of it, with the total GPU time on its title line).
--gemv: matrix-vector products of the 7B's shapes, cuBLAS against inductor's reduction (one
row; three rows as three reductions fused into one kernel), in GB/s, and the copy bandwidth.
(It turns coordinate-descent tuning on for the rest of the process.)

The first run of this probe (commit 6ecacdc) patched the model instead, to try what the
library then took up (coordinate-descent tuning, products as reductions, a compiled prefill)
and what it did not (LoRA's x.A as r separate reductions or as cuBLAS products, one-token
attention as plain products): results/probes/gpu-decode-2026-11-25.txt.
"""

import argparse
import functools
import json
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, ".")
from minipara.bench import speed as bm  # noqa: E402
from minipara.decode import compiled as fast  # noqa: E402
from minipara.decode.compiled import compile_decoder  # noqa: E402
from minipara.model.layer_state import LayerState  # noqa: E402

APPLY = LayerState.apply


def gemv(file):
    shapes = {
        "qkv": (12288, 4096),
        "o": (4096, 4096),
        "gate_up": (22016, 4096),
        "down": (4096, 11008),
        "logits": (32000, 4096),
    }
    torch._inductor.config.coordinate_descent_tuning = True
    red = torch.compile(lambda x, w: torch.stack([(r * w).sum(-1) for r in x.unbind(0)]), dynamic=False)
    out = []
    for m in (1, 3):
        for name, (n, k) in shapes.items():
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]  # > L2
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"m": m, "shape": name, "n": n, "k": k}
            for label, fn in (("cublas", lambda w: F.linear(x, w)), ("inductor", lambda w: red(x, w))):
                for w in ws:
                    fn(w)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _ in range(5):
                        for w in ws:
                            fn(w)
                g.replay()
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(10):
                    g.replay()
                torch.cuda.synchronize()
                us = (time.perf_counter() - t) / 200 * 1e6
                row[label + "_us"] = round(us, 2)
                row[label + "_GBs"] = round(n * k * 2 / us / 1e3, 1)
            out.append(row)
            print(json.dumps(row), flush=True)
    buf = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(buf)
    dst.copy_(buf)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        dst.copy_(buf)
    torch.cuda.synchronize()
    copy = 2 * 2**30 * 20 / (time.perf_counter() - t) / 1e9
    print(json.dumps({"copy_GBs_read_plus_write": round(copy, 1)}), flush=True)
    with open(file, "w") as f:
        json.dump({"gemv": out, "copy_GBs": copy}, f, indent=1)


def bmm_apply(self, name, x, y, split=None):
    if name in self.lora and x.shape[-2] == 1:
        a, b = (t.to(x.dtype) for t in self.lora[name])
        n = 1 if split is None else len(split)
        xa = (x[..., None, :] * (a[:, None] if a.dim() == 3 else a)).sum(-1).unflatten(-1, (-1, n))  # (B, 1, r, n)
        y = y + torch.cat(
            [torch.matmul(xa[..., p], bp) for p, bp in enumerate(b.split(split or (b.shape[-1],), -1))], -1
        )
        st = LayerState(scale=self.scale, bias=self.bias)
        return st.apply(name, x, y)
    return APPLY(self, name, x, y, split)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("variants")
    p.add_argument("--profile", help="kernel tables of the beam-1 variants into this file")
    p.add_argument("--gemv", help="GEMV micro-benchmark JSON into this file")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test on CPU)")
    a = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(a.device)
    shape = "llama-2-7b"
    if a.tiny:
        bm.SHAPES["tiny"] = dict(
            bm.SHAPES[shape],
            n_layers=2,
            dim=256,
            n_heads=4,
            n_kv_heads=4,
            head_dim=64,
            ffn_dim=512,
            attn_scale=64**-0.5,
        )
        shape = "tiny"
    model = bm.random_model(shape, torch.bfloat16, dev)
    prompts = [bm.prompt_ids(None, 1, 32000)]
    if a.gemv:
        gemv(a.gemv)
    for v in a.variants.split(","):
        t0 = time.time()
        method, beams, how = v.split("/")
        beams = int(beams[1:])
        how = set(how.split("+"))
        opts = {"mode": "reduce-overhead"} if "old" in how else {}
        fast.compile_decoder = functools.partial(compile_decoder, **opts)  # what bench's Runner calls
        fast.TUNE_LORA_STEPS = "tune" in how
        # u1: no reduction unrolled into its consumer (inductor unrolls those of up to 8
        # elements, e.g. LoRA's x.A.B over the rank, into the norm after the residual add).
        torch._inductor.config.unroll_reductions_threshold = 1 if "u1" in how else 8
        apply = LayerState.apply
        if "bmm" in how:  # LoRA's (x.A).B at decode as a cuBLAS product, x.A as now
            LayerState.apply = bmm_apply
        m, ad = bm.make_adapter(method, model)
        r = bm.run_row(m, ad, prompts, beams, 32, a.runs, 2, True, profile=bool(a.profile))
        LayerState.apply = apply
        if "profile" in r:  # bench.py --profile's table; its footer gives the GPU time in kernels
            with open(a.profile, "a") as f:
                f.write(f"## {v}\n{r.pop('profile')}\n")
        fast.compile_decoder = compile_decoder
        r = {k: v2 for k, v2 in r.items() if isinstance(v2, (int, float))}
        print(json.dumps({"variant": v, "wall_s": round(time.time() - t0, 1), **r}), flush=True)
        bm.release(dev)


if __name__ == "__main__":
    main()
