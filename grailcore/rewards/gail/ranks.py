"""What keeps the discriminator identical on every rank (rank 0's initial weights, summed
gradients and counts) and its saved state detached from the live one."""

from __future__ import annotations

import torch

from grailcore import dist as gdist


def world_size() -> int:
    return gdist.get_world_size()


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    if world_size() > 1:
        for tensor in tensors:
            gdist.broadcast_(tensor.data, src=0)


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum the ranks' gradients: each rank's loss is its part of the step's loss (the
    weights hold the global 1/N), so every rank takes the same step and D stays identical."""
    if world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = gdist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def sum_over_ranks(values: list[int]) -> list[int]:
    if world_size() == 1:
        return values
    return gdist.all_reduce(torch.tensor(values, dtype=torch.int64)).tolist()


def cpu_copy(obj):
    """Deep copy with tensors detached on CPU: later training must not mutate a saved state."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj
