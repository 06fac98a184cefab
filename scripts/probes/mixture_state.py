"""A mixture's state building over all layers of one prefill, eagerly (what a recorded prefill
replays): wall time and the number of ops that launch work, for n tenants of one method.

  python scripts/probes/mixture_state.py [--method para] [--tenants 16] [--batch 32]
      [--tokens 274] [--shape gemma-3-270m] [--device cpu] [--calls 5]
  --tenants 0: one adapter alone (its own layer_state), not a mixture
"""

import argparse
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, ".")
from minipara.bench import speed as bm  # noqa: E402
from minipara.methods import build_adapter  # noqa: E402
from minipara.methods.mixture import Mixture  # noqa: E402


class CountOps(TorchDispatchMode):
    n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += not func.is_view
        return func(*args, **(kwargs or {}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--method", default="para")
    p.add_argument("--tenants", type=int, default=16)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=274)
    p.add_argument("--shape", default="gemma-3-270m", choices=sorted(bm.SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--calls", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(a.device)
    model = bm.random_model(a.shape, torch.bfloat16, dev)  # IAPT's generators run the layers' K/V projections
    args = model.args
    ads = [build_adapter(a.method, args).to(dev) for _ in range(a.tenants)]
    # --tenants 0: one adapter alone, not a mixture
    mix = Mixture(ads, [k % a.tenants for k in range(a.batch)]) if a.tenants else build_adapter(a.method, args).to(dev)
    h = torch.randn(a.batch, a.tokens, args.dim, dtype=torch.bfloat16, device=dev)
    pm = torch.ones(a.batch, a.tokens, dtype=torch.bool, device=dev)

    def prefill():
        for i in range(args.n_layers):
            mix.layer_state(i, h, pm, model)

    with torch.no_grad():
        for _ in range(3):
            prefill()
        with CountOps() as c:
            prefill()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(a.calls):
            prefill()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    ms = (time.perf_counter() - t) / a.calls * 1e3
    L = args.n_layers
    print(
        f"{a.tenants or 'one'} {a.method} {'tenants' if a.tenants else 'adapter'}, batch {a.batch}, {a.tokens} tokens, {a.shape} ({L} layers, width "
        f"{args.dim}), bf16, {a.device}: {c.n} ops ({c.n / L:.1f} a layer), {ms:.1f} ms ({ms / L:.2f} a layer)"
    )


if __name__ == "__main__":
    main()
