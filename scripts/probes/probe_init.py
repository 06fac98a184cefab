"""At init (no training): per layer, the down-projection output x = pool(h) @ W_down that enters
PEDRO's rational (and PARA's GELU), R(x), GELU(x), for adapter seeds 0-4, on 16 SST-2 train prompts.
Also IAPT: |u|, |p| entering its rational, |R(p)|, |soft token| vs the text hidden states' size.
Run: OMP_NUM_THREADS=1 nice python scripts/probes/probe_init.py"""

import torch
import torch.nn.functional as F

import minipara
from minipara.methods.iapt import Iapt, IaptConfig
from minipara.methods.pedro import Pedro, PedroConfig
from minipara.train.trainer import collate

torch.set_grad_enabled(False)
lm = minipara.load()
args = lm.args
tr = lm.trainer(lm.new_adapter("para", seed=0), "sst2", progress=False)
pairs = tr.train[:16]
tokens, valid, pool, tmask, targets = collate(pairs, args.pad_id, "cpu")
print("n_layers", args.n_layers, "dim", args.dim)

rec = {}


def tap(ad):
    orig = ad.activation

    def act(i, z):
        out = orig(i, z)
        rec.setdefault(i, []).append((z.detach().clone(), out.detach().clone()))
        return out

    ad.activation = act


hs = {}
for seed in range(5):
    torch.manual_seed(seed)
    ad = Pedro(PedroConfig(), args)
    rec.clear()
    tap(ad)
    lm.model(tokens, valid=valid, adapter=ad, pool_mask=pool, hidden_only=True)
    print(f"PEDRO seed {seed}: per layer max|x| / median|x| / max|R(x)| / max|GELU(x)| / mean over batch of ||R(x)||_2")
    rows = []
    for i in sorted(rec):
        x, r = rec[i][0]
        rows.append(
            f"L{i}:{x.abs().max():.0f}/{x.abs().median():.1f}/{r.abs().max():.3g}/{F.gelu(x).abs().max():.0f}/{r.norm(dim=-1).mean():.3g}"
        )
    print("  " + "  ".join(rows))
    tot_r = sum(rec[i][0][1].norm(dim=-1).mean() for i in rec)
    tot_g = sum(F.gelu(rec[i][0][0]).norm(dim=-1).mean() for i in rec)
    print(f"  sum over layers of mean ||R(x)|| = {tot_r:.4g}; of ||GELU(x)|| = {tot_g:.4g}; ratio {tot_r / tot_g:.1f}")


# hidden-state scale entering each layer (pooled last prompt token) for reference
def grab(ad):
    orig = ad.pooled

    def pooled(i, h, m):
        from minipara.methods.poolers import pool as P

        hs[i] = P(h.float(), m, "last").norm(dim=-1).mean().item()
        hs[("tok", i)] = h.float()[m].norm(dim=-1).median().item()
        return orig(i, h, m)

    ad.pooled = pooled


torch.manual_seed(0)
ad = Pedro(PedroConfig(), args)
grab(ad)
lm.model(tokens, valid=valid, adapter=ad, pool_mask=pool, hidden_only=True)
print("||pooled h|| per layer:", " ".join(f"{hs[i]:.0f}" for i in range(args.n_layers)))
print("median ||h|| of prompt tokens per layer:", " ".join(f"{hs[('tok', i)]:.0f}" for i in range(args.n_layers)))

for seed in range(5):
    torch.manual_seed(seed)
    ad = Iapt(IaptConfig(), args)
    stats = []
    orig = ad.activation

    def act(i, p, orig=orig):
        out = orig(i, p)
        stats.append(
            (
                i,
                p.abs().max().item(),
                out.abs().max().item(),
                (out @ ad.w_up[i // ad.config.share_every]).norm(dim=-1).mean().item(),
            )
        )
        return out

    ad.activation = act
    lm.model(tokens, valid=valid, adapter=ad, pool_mask=pool, hidden_only=True)
    print(f"IAPT seed {seed}: L: max|p| / max|R(p)| / mean ||soft token||")
    print("  " + "  ".join(f"L{i}:{a:.0f}/{b:.3g}/{c:.3g}" for i, a, b, c in stats))
