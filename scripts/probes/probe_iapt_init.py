"""IAPT at init, adapter seeds 0-4: dev loss on 96 SST-2 dev examples (bare model: identity methods' value),
how prompt-dependent the soft tokens are (cosine between prompts of the normed soft tokens, per layer), and
how concentrated R(p) is (share of ||R(p)||^2 in its top 4 of m=256 coordinates).
Run: OMP_NUM_THREADS=1 nice python scripts/probes/probe_iapt_init.py"""

import torch

import minipara
from minipara.methods.iapt import Iapt, IaptConfig
from minipara.train.trainer import collate, mean_loss

torch.set_grad_enabled(False)
lm = minipara.load()
tr = lm.trainer(lm.new_adapter("para", seed=0), "sst2", progress=False)
dev = tr.dev[:96]
print(f"bare model dev loss {mean_loss(lm.model, None, dev, 16):.3f}")
tokens, valid, pool, _, _ = collate(dev[:16], lm.args.pad_id, "cpu")
for seed in range(5):
    torch.manual_seed(seed)
    ad = Iapt(IaptConfig(), lm.args)
    stats = {}
    orig = ad.soft_tokens

    def soft(i, h, m, orig=orig):
        s = orig(i, h, m)
        blk = lm.model.layers[i]
        n = blk.attention_norm(s).flatten(1)  # (B, l_sp*d) what K/V see
        n = n / n.norm(dim=-1, keepdim=True)
        cos = n @ n.T
        off = cos[~torch.eye(len(n), dtype=torch.bool)]
        g = i // ad.config.share_every
        u = h.float() @ ad.w_down[g]
        r = ad.activation(i, (u @ ad.w_sa[i]).masked_fill(~m[..., None], -3e38).softmax(1).transpose(1, 2) @ u)
        top = (r.pow(2).topk(4, dim=-1).values.sum(-1) / r.pow(2).sum(-1)).mean()
        stats[i] = (off.mean().item(), off.min().item(), top.item())
        return s

    ad.soft_tokens = soft
    lm.model(tokens, valid=valid, adapter=ad, pool_mask=pool, hidden_only=True)
    ad.soft_tokens = orig
    dl = mean_loss(lm.model, ad, dev, 16)
    print(
        f"IAPT seed {seed}: dev loss at init {dl:.3f}; per layer mean/min cosine between prompts of normed soft tokens, top-4 share of ||R(p)||^2:"
    )
    print("  " + " ".join(f"L{i}:{a:.3f}/{b:.3f}/{c:.2f}" for i, (a, b, c) in sorted(stats.items())))
