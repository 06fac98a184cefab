"""Prompt poolers: (B, T, d) hidden states + (B, T) prompt mask -> (B, d).

Every pooler sees prompt positions only (padding and, in training, the response
are masked out), so the generated parameters are the ones inference computes
from the prompt alone. Attention-based poolers live with their method
(PARADE's capsules, IAPT's soft-token attention).
"""

import torch

POOLERS = ("last", "mean", "max")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last True position of each row (left or right padding)."""
    T = mask.shape[1]
    ar = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, ar, -1).amax(dim=1)


def pool(h: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, d) in float32. Only the mean sums, so only it casts all of h first: the others pick
    values and cast those (a float32 copy of a 32-row prompt's h is 144 MB on a 7B)."""
    if kind == "last":
        return h[torch.arange(h.shape[0], device=h.device), last_index(mask)].float()
    m = mask[..., None]
    if kind == "mean":
        return (h.float() * m).sum(1) / m.sum(1).clamp(min=1)
    if kind == "max":
        return h.masked_fill(~m, float("-inf")).amax(1).float()
    raise ValueError(f"unknown pooler {kind!r}; use one of {', '.join(POOLERS)}")
