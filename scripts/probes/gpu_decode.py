"""GPU probe for issue 13: where the decode step and the prefill spend their time, and what
candidate changes buy, on the LLaMA-2-7B shape (random weights, bf16, 274-token prompt, 32 new
tokens, batch 1), each variant in the same process as the base it is compared to.

  python scripts/probes/gpu_decode.py VARIANT[,VARIANT...] [--profile FILE] [--gemv]

Variants are patches applied for one row and removed after it (not the library's code paths):
  base        the library as it is
  cdt         inductor's coordinate-descent tuning of its generated kernels (gpt-fast sets it)
  attn_math   one-token attention as two products and a softmax, instead of SDPA's kernel
  redlin      one-token linears as (x * W).sum(-1), which inductor generates as its own
              reduction kernels (and may fuse neighbours into), instead of cuBLAS GEMV
  redlin_cdt  both
  lora        LoRA r4 all linears, as the library computes it at decode
  lora_split  LoRA with x.A written as r reductions shaped like the RMSNorm's (fusable with it)
  lora_mm     LoRA with plain matmuls (cuBLAS) at decode
  prefill_c   the prefill compiled by inductor (then recorded as a CUDA graph as today)
--gemv: matrix-vector products of the 7B's shapes, cuBLAS against inductor's reduction,
  in GB/s, and the copy bandwidth.
"""
import argparse
import contextlib
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, ".")
from minipara import benchmark as bm  # noqa: E402
from minipara import layer_state, model as model_mod, generation  # noqa: E402


def _red_linear(self, x):
    if x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= 4:
        y = (x[..., None, :] * self.weight).sum(-1)
        return y if self.bias is None else y + self.bias
    return F.linear(x, self.weight, self.bias)


def _red_logits(self, h):
    w = self.tok_embeddings.weight if self.args.tie_embeddings else self.output.weight
    if h.dim() == 3 and h.shape[1] == 1 and h.shape[0] <= 4:
        return (h[..., None, :] * w).sum(-1)
    return F.linear(h, w)


_sdpa = F.scaled_dot_product_attention


def _math_sdpa(q, k, v, attn_mask=None, scale=None):
    if q.shape[-2] > 8:  # prefill: as before
        return _sdpa(q, k, v, attn_mask=attn_mask, scale=scale)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.float().masked_fill(~attn_mask, float("-inf"))
    return (s.softmax(-1).to(q.dtype)) @ v


_apply = layer_state.LayerState.apply


def _apply_split(self, name, x, y):
    if name in self.lora and x.shape[-2] == 1:
        a, b = (t.to(x.dtype) for t in self.lora[name])
        if a.dim() == 2:
            xa = torch.stack([(x * a[:, j]).sum(-1) for j in range(a.shape[1])], -1)
            y = y + (xa[..., None] * b).sum(-2)
            rest = layer_state.LayerState(scale=self.scale, bias=self.bias)
            return _apply(rest, name, x, y)
    return _apply(self, name, x, y)


def _apply_mm(self, name, x, y):
    if name in self.lora and x.shape[-2] == 1:
        a, b = (t.to(x.dtype) for t in self.lora[name])
        y = y + (x @ a) @ b
        rest = layer_state.LayerState(scale=self.scale, bias=self.bias)
        return _apply(rest, name, x, y)
    return _apply(self, name, x, y)


@contextlib.contextmanager
def patched(variant):
    ind = torch._inductor.config
    saved = (nn.Linear.forward, model_mod.Transformer.logits, F.scaled_dot_product_attention,
             layer_state.LayerState.apply, generation.Decoder.run_prefill, ind.coordinate_descent_tuning)
    try:
        if "cdt" in variant:
            ind.coordinate_descent_tuning = True
        if variant.startswith("redlin"):
            nn.Linear.forward, model_mod.Transformer.logits = _red_linear, _red_logits
        if variant == "attn_math":
            F.scaled_dot_product_attention = _math_sdpa
        if variant == "lora_split":
            layer_state.LayerState.apply = _apply_split
        if variant == "lora_mm":
            layer_state.LayerState.apply = _apply_mm
        if variant == "prefill_c":
            generation.Decoder.run_prefill = torch.compile(saved[4], dynamic=False)
        yield
    finally:
        (nn.Linear.forward, model_mod.Transformer.logits, F.scaled_dot_product_attention,
         layer_state.LayerState.apply, generation.Decoder.run_prefill, ind.coordinate_descent_tuning) = saved


def kernel_table(model, adapter, prompts, label, file):
    """Per-kernel GPU time over one generation (32 tokens), and the GPU time per decode step."""
    r = bm.Runner(model, adapter, prompts, 1, 32, compile_step=True)
    r.warm(3)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r.generate()
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    with open(file, "a") as f:
        f.write(f"## {label}: GPU time in kernels over one generation: {total / 1e3:.2f} ms\n")
        f.write(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40))
        f.write("\n")


def gemv(file):
    shapes = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
              "logits": (32000, 4096)}
    red = torch.compile(lambda x, w: (x[..., None, :] * w).sum(-1), dynamic=False)
    out = []
    for m in (1, 3):
        for name, (n, k) in shapes.items():
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]  # > L2
            x = torch.randn(m, 1, k, device="cuda", dtype=torch.bfloat16)
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("variants")
    p.add_argument("--profile", help="kernel tables of base and lora into this file")
    p.add_argument("--gemv", help="GEMV micro-benchmark JSON into this file")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test on CPU)")
    a = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(a.device)
    shape = "llama-2-7b"
    if a.tiny:
        bm.SHAPES["tiny"] = dict(bm.SHAPES[shape], n_layers=2, dim=256, n_heads=4, n_kv_heads=4, head_dim=64,
                                 ffn_dim=512, attn_scale=64 ** -0.5)
        shape = "tiny"
    model = bm.random_model(shape, torch.bfloat16, dev)
    prompts = [bm.prompt_ids(None, 1, 32000)]
    if a.gemv:
        gemv(a.gemv)
    for v in a.variants.split(","):
        t0 = time.time()
        with patched(v):
            m, ad = bm.make_adapter("lora" if v.startswith("lora") else "base", model)
            r = bm.run_row(m, ad, prompts, 1, 32, a.runs, 2, True)
            if a.profile and v in ("base", "lora", "lora_split"):
                kernel_table(m, ad, prompts, v, a.profile)
        r = {k: v2 for k, v2 in r.items() if isinstance(v2, (int, float))}
        print(json.dumps({"variant": v, "wall_s": round(time.time() - t0, 1), **r}), flush=True)
        bm.release(dev)


if __name__ == "__main__":
    main()
