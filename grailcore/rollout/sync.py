"""Weight sync trainer -> rollout engine: full HF-named tensors, gathered from FSDP
shards one parameter at a time so no second full copy of the model is built."""

from __future__ import annotations

from typing import Iterator

import torch


def iter_full_params(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) per parameter; DTensor shards are all-gathered one by one.

    Every rank must consume the iterator (the gathers are collectives)."""
    for name, param in model.named_parameters():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor shard
            tensor = tensor.full_tensor()
        yield name.replace("_checkpoint_wrapped_module.", ""), tensor


def push_weights(model: torch.nn.Module, engine) -> None:
    if getattr(engine, "shares_weights", False):
        return
    engine.update_weights(iter_full_params(model))
