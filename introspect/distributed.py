"""Data parallelism for the training loops, on plain ``torch.distributed``.

Ray Train (or ``torchrun``) initialises the process group; these helpers read it and do nothing
in a single process, so the same loop runs in a notebook and on a cluster.

Gradients are averaged with one ``all_reduce`` per tensor after the backward pass, which is what
DDP does. DDP's wrapper is not used because a detection step calls into the model's submodules
(the prefix pass under steering hooks, then the suffix pass) rather than through one
``forward``; a wrapper only synchronises what goes through its own ``forward``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) when no process group is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the workers (no-op in one process)."""
    _, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(size)


def sum_scalars(values: Sequence[float]) -> list[float]:
    """Each value summed over the workers (the values themselves in one process)."""
    _, size = world()
    if size == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
