"""Weight sync trainer -> rollout engine: full HF-named tensors, gathered from FSDP
shards one parameter at a time so no second full copy of the model is built. A LoRA
policy is sent merged (W + scale * B @ A) under the base model's names."""

from __future__ import annotations

from typing import Iterator

import torch

from grailcore.lora import BASE_LAYER, is_adapter_param, merged_weight


def _full(param: torch.Tensor) -> torch.Tensor:
    tensor = param.detach()
    if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor shard
        tensor = tensor.full_tensor()
    return tensor


def iter_full_params(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) per parameter of the base model; DTensor shards are all-gathered
    one by one. LoRA adapters are folded into their layer's weight (a new tensor: the model
    is not modified) and never sent themselves.

    Every rank must consume the iterator (the gathers are collectives)."""
    for name, param in model.named_parameters():
        if is_adapter_param(name):
            continue  # folded into its base weight below
        tensor = _full(param)
        if BASE_LAYER in name:
            layer_name, leaf = name.split(BASE_LAYER)
            if leaf == "weight":
                tensor = merged_weight(model.get_submodule(layer_name), tensor, _full)
            name = f"{layer_name}.{leaf}"
        yield name.replace("_checkpoint_wrapped_module.", ""), tensor


def push_weights(model: torch.nn.Module, engine) -> None:
    if getattr(engine, "shares_weights", False):
        return
    engine.update_weights(iter_full_params(model))
