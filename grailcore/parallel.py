"""FSDP2 sharding of a PolicyModel: `fully_shard` per decoder layer, then the root
(embedding, final norm, tied lm-head). Gloo on CPU, NCCL on GPU; bf16 compute with
fp32 gradient reduction on GPU. Activation checkpointing is the HF model's own. LoRA adapters
(grailcore.lora) live inside the decoder layers and are sharded with them."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from grailcore.config import Config
from grailcore.dist import DistInfo
from grailcore.policy import PolicyModel


def decoder_layers(lm: torch.nn.Module) -> torch.nn.ModuleList:
    layers = getattr(lm.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(lm).__name__}: expected the decoder to hold a `layers` ModuleList to shard")
    return layers


def parallelize(model: PolicyModel, cfg: Config, dist: DistInfo) -> PolicyModel:
    """Shard `model` in place over all ranks and return it."""
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    kwargs = {"mesh": mesh}
    if dist.device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model.lm):
        fully_shard(layer, **kwargs)
    # The root group holds the embedding; with tied weights it is also the lm-head.
    fully_shard(model, **kwargs)
    return model
