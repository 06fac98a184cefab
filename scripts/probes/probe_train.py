"""Train PEDRO/PARA/IAPT on SST-2 on the CPU with the real Trainer (its _train_step: bi-level arch step on a
dev batch, then the weights step), instrumented. Adapter init seed and data-order seed are separate.
Per logged step: train loss; pre-clip global grad norm of the weights group (and its share from w_up, and the
layer whose w_up gradient is largest); pre-clip arch grad norm; per layer max |x| entering the activation,
max |g(x)|; max |l - 1| over the batch (l = generated vectors); spread across prompts (std over batch, mean
over elements) of l; drift of the rational parameters from GELU.
Run: OMP_NUM_THREADS=1 nice python scripts/probes/probe_train.py --method pedro \
       --init-seed 2 --data-seed 2 --steps 40 --batch 16 [--arch-lr 0] [--activation gelu] [--lr 1e-4]"""

import argparse
import json
import math
import time

import torch

import minipara
from minipara.train.trainer import TrainConfig, mean_loss

ap = argparse.ArgumentParser()
ap.add_argument("--method", default="pedro")
ap.add_argument("--init-seed", type=int, default=0)
ap.add_argument("--data-seed", type=int, default=0)
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--lr", type=float, default=1e-4)
ap.add_argument("--arch-lr", type=float, default=1e-6)
ap.add_argument("--activation", default=None)
ap.add_argument("--total", type=int, default=None, help="schedule length (default: steps)")
ap.add_argument("--dev-n", type=int, default=96)
ap.add_argument("--every", type=int, default=1)
ap.add_argument("--json", default=None)
ap.add_argument(
    "--rms-input",
    action="store_true",
    help="prototype fix: divide the pooled hidden state (IAPT: each hidden state) by its RMS before W_down",
)
a = ap.parse_args()

lm = minipara.load()
opts = {} if a.activation is None else {"activation": a.activation}
ad = lm.new_adapter(a.method, seed=a.init_seed, **opts)
cfg = TrainConfig(seed=a.data_seed, batch_size=a.batch, max_steps=a.total or a.steps, lr=a.lr, arch_lr=a.arch_lr)
tr = lm.trainer(ad, "sst2", cfg, progress=False)
arch_ids = {id(p) for p in tr.arch}
names = {id(p): n for n, p in ad.named_parameters()}
a0 = {n: p.detach().clone() for n, p in ad.named_parameters() if id(p) in arch_ids}

step_rec = {"act": {}, "vec": {}, "clip": {}}
orig_clip = torch.nn.utils.clip_grad_norm_


def clip(params, max_norm, *args, **kw):
    params = list(params)
    norms = {names[id(p)]: p.grad.norm().item() for p in params if p.grad is not None}
    total = math.sqrt(sum(v * v for v in norms.values()))
    group = "arch" if any(id(p) in arch_ids for p in params) else "weights"
    rec = {"norm": total}
    if group == "weights" and hasattr(ad, "gen"):
        g = ad.gen.w_up.grad
        per_layer = g.flatten(1).norm(dim=1)
        rec["w_up_share"] = (g.norm().item() / total) ** 2
        rec["w_up_top_layer"] = int(per_layer.argmax())
        rec["w_up_top_norm"] = per_layer.max().item()
        rec["w_down_norm"] = ad.gen.w_down.grad.norm().item()
        rec["b_up_norm"] = ad.gen.b_up.grad.norm().item()
    if group == "weights" and a.method == "iapt":
        rec.update({k: norms[k] for k in ("w_down", "w_up", "w_sa") if k in norms})
    step_rec["clip"][group] = rec
    return orig_clip(params, max_norm, *args, **kw)


torch.nn.utils.clip_grad_norm_ = clip

if a.rms_input and a.method == "iapt":  # the same prototype for IAPT: its generators see h / rms(h)
    orig_soft = ad.soft_tokens

    def soft_tokens(i, h, m, *rest):
        h = h.float()
        return orig_soft(i, h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6), m, *rest)

    ad.soft_tokens = soft_tokens
elif a.rms_input:
    from minipara.methods.poolers import pool as _pool

    def pooled(i, h, m, *rest):
        p = _pool(h.float(), m, ad.config.pooler)
        return (p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + 1e-6)) @ ad.gen.w_down[i]

    ad.pooled = pooled

if hasattr(ad, "gen"):  # PARA/PEDRO: the activation's input/output and the vectors
    orig_act = ad.activation

    def act(i, z, *rest):
        out = orig_act(i, z, *rest)
        if torch.is_grad_enabled():
            step_rec["act"][i] = (z.detach().abs().max().item(), out.detach().abs().max().item())
        return out

    ad.activation = act
    orig_vectors = ad.vectors

    def vectors(i, z, *rest):
        v = orig_vectors(i, z, *rest)
        if torch.is_grad_enabled():
            d = v.detach()
            step_rec["vec"][i] = (
                (d - 1).abs().max().item(),
                d.std(dim=0).mean().item(),
                d.min().item(),
                d.max().item(),
            )
        return v

    ad.vectors = vectors
else:  # IAPT: soft tokens
    orig_act = ad.activation

    def act(i, p, *rest):
        out = orig_act(i, p, *rest)
        if torch.is_grad_enabled():
            s = out.detach() @ ad.w_up[i // ad.config.share_every].detach()
            step_rec["act"][i] = (
                p.detach().abs().max().item(),
                out.detach().abs().max().item(),
                s.norm(dim=-1).mean().item(),
            )
        return out

    ad.activation = act

dev = tr.dev[: a.dev_n]
log = []


def dev_eval():
    ad.eval()
    with torch.no_grad():
        return mean_loss(lm.model, ad, dev, 16)


print(f"# {a}", flush=True)
print(f"step 0 dev_loss {dev_eval():.4f}", flush=True)
t0 = time.time()
for step in range(1, a.steps + 1):
    for k in step_rec:
        step_rec[k] = {}
    loss = tr._train_step()
    e = {"step": step, "loss": loss, "clip": step_rec["clip"]}
    if hasattr(ad, "gen"):
        e["max_x"] = [round(step_rec["act"][i][0], 1) for i in sorted(step_rec["act"])]
        e["max_gx"] = [float(f"{step_rec['act'][i][1]:.3g}") for i in sorted(step_rec["act"])]
        e["max_dev1"] = [float(f"{step_rec['vec'][i][0]:.3g}") for i in sorted(step_rec["vec"])]
        e["spread"] = [float(f"{step_rec['vec'][i][1]:.3g}") for i in sorted(step_rec["vec"])]
        e["vmin"] = min(v[2] for v in step_rec["vec"].values())
        e["vmax"] = max(v[3] for v in step_rec["vec"].values())
    else:
        e["max_p"] = [float(f"{step_rec['act'][i][0]:.3g}") for i in sorted(step_rec["act"])]
        e["soft_norm"] = [float(f"{step_rec['act'][i][2]:.3g}") for i in sorted(step_rec["act"])]
    if a0:
        e["arch_drift"] = max((p.detach() - a0[n]).abs().max().item() for n, p in ad.named_parameters() if n in a0)
    if step % 10 == 0 or step == a.steps:
        e["dev_loss"] = dev_eval()
    log.append(e)
    if step % a.every == 0 or "dev_loss" in e:
        c = e["clip"]["weights"]
        line = f"step {step} loss {loss:.4f} gnorm {c['norm']:.3g}"
        if "w_up_share" in c:
            line += f" w_up_share {c['w_up_share']:.3f} top L{c['w_up_top_layer']} w_down {c['w_down_norm']:.3g} b_up {c['b_up_norm']:.3g}"
            line += f" | v in [{e['vmin']:.3g}, {e['vmax']:.3g}] max|l-1| L0..17 {e['max_dev1']} spread {e['spread']}"
        else:
            line += f" w_down {c.get('w_down', 0):.3g} w_up {c.get('w_up', 0):.3g} w_sa {c.get('w_sa', 0):.3g} soft_norm {e['soft_norm']}"
        if "arch" in e["clip"]:
            line += f" | arch gnorm {e['clip']['arch']['norm']:.3g} drift {e['arch_drift']:.2e}"
        if "dev_loss" in e:
            line += f" | dev_loss {e['dev_loss']:.4f}"
        line += f" ({time.time() - t0:.0f}s)"
        print(line, flush=True)
if a.json:
    json.dump(log, open(a.json, "w"))
