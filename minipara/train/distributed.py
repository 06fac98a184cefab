"""Training on several processes started by `torchrun`: data-parallel, optionally with the
frozen base sharded over the ranks (FSDP2 `fully_shard`).

Every rank holds the whole global batch list (the data order is a fixed permutation per
seed and epoch), computes the loss of its contiguous share, and divides by the response
tokens of the GLOBAL batch; summing the adapter's gradients over the ranks then gives the
gradient one process computes, whatever the number of ranks. Only the adapter's trainable
tensors are summed: one flat all-reduce per optimizer step, the frozen base is never
synchronised. This is plain explicit all-reduce rather than DistributedDataParallel: DDP
wraps the module whose forward it hooks, while the adapter here is an argument of the
base's forward, half of it is frozen at each bi-level step (DDP would need
find_unused_parameters), micro-batches would need no_sync(), and DDP averages where the
global token count must divide.

With the base sharded (`shard_base`), each forward all-gathers the layer weights it runs,
so every rank must run the same forward passes: training pads a short share with
zero-weighted micro-batches, and evaluation is done in full on every rank instead of split.

`Ranks()` is one process alone: every method is then a no-op, so training without
torchrun is unchanged.
"""

import datetime
import os

import torch
import torch.distributed as dist

from minipara.errors import UserError


class Ranks:
    """This process's place among the training processes, and the collectives training needs."""

    def __init__(self, rank: int = 0, world: int = 1, lockstep: bool = False):
        self.rank, self.world = rank, world
        self.lockstep = lockstep  # the base is sharded: every rank runs the same forward passes

    @property
    def main(self) -> bool:
        """Rank 0, the one that writes files and prints."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's contiguous part of `items` (sizes differ by at most one)."""
        n = len(items)
        return items[self.rank * n // self.world : (self.rank + 1) * n // self.world]

    def micro_batches(self, items: list, size: int) -> list[tuple[list, bool]]:
        """This rank's share cut into micro-batches of at most `size`, each with whether it
        counts; in lockstep every rank gets as many, padded with uncounted copies of items[:1]."""
        mine = self.share(items)
        batches = [(mine[s : s + size], True) for s in range(0, len(mine), size)]
        if self.lockstep:
            per_rank = -(-len(items) // self.world)
            batches += [(items[:1], False)] * (-(-per_rank // size) - len(batches))
        return batches

    def sum_grads(self, params: list):
        """Sum the gradients of `params` over the ranks (one all-reduce per dtype). A tensor
        no rank produced a gradient for keeps none, so the optimizer skips it as one process would."""
        if self.world == 1 or not params:
            return
        had = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        dist.all_reduce(had)
        for dtype in {p.dtype for p in params}:
            group = [p for p in params if p.dtype == dtype]
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            dist.all_reduce(flat)
            for p, g in zip(group, flat.split([p.numel() for p in group])):
                p.grad = g.view_as(p).clone()
        for p, n in zip(params, had.tolist()):
            if n == 0:
                p.grad = None

    def sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop request that reached one rank)."""
        return self.sum(float(flag)) > 0 if self.world > 1 else flag

    def gather(self, items: list) -> list:
        """Every rank's `items` concatenated in rank order, on every rank."""
        if self.world == 1:
            return items
        out = [None] * self.world
        dist.all_gather_object(out, items)
        return [x for part in out for x in part]

    def agree(self, settings: dict):
        """Stop every rank at once, naming the first difference, unless all were started with the
        same settings (one small all-gather): otherwise ranks would train with different lr or
        seeds silently, and a different max_steps or method would hang or break a collective."""
        if self.world == 1:
            return
        every = [None] * self.world
        dist.all_gather_object(every, settings)
        for r, theirs in enumerate(every[1:], 1):
            diff = next((k for k in every[0] if every[0][k] != theirs.get(k)), None)
            if diff is not None:
                raise UserError(
                    f"the ranks were started with different settings: {diff} is {every[0][diff]!r} on rank 0 "
                    f"and {theirs.get(diff)!r} on rank {r}; start every rank with the same command",
                    (diff,),
                )

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: str, shard_base: bool = False, timeout_s: float = 1800) -> tuple[Ranks, str]:
    """Join the process group torchrun set up; (ranks, this rank's device). Without torchrun:
    one process, the device as given (shard_base then means nothing: one process holds the
    whole base, so a sharded run can be resumed without torchrun). On CUDA each rank takes
    the GPU of its LOCAL_RANK."""
    if not launched():
        return Ranks(), device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        if device != "cuda":
            raise UserError(
                f"under torchrun each rank takes the GPU of its LOCAL_RANK: give device cuda, not {device}",
                options=("device",),
            )
        if not torch.cuda.is_available():
            raise UserError(
                "device cuda was asked for, but no CUDA GPU is available; use device cpu", options=("device",)
            )
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPUs: start at most that many "
                "processes per node"
            )
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(
        backend,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=torch.device(device) if backend == "nccl" else None,
    )
    return Ranks(rank, world, lockstep=shard_base and world > 1), device


def finish():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_layers(model):
    """Shard the base's parameters over the ranks with FSDP2: each block on its own, so one
    block is gathered at a time, and the rest (embeddings, final norm, output) kept gathered
    after the forward, since the loss calls `model.logits` outside it. Call on the meta
    device, before the weights are read (loading.load_model's `shard` argument)."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block)
    fully_shard(model, reshard_after_forward=False)
    return model
