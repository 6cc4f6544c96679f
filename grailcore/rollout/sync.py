"""Weight sync trainer -> rollout engine: HF-named full tensors, streamed one at a time.

What is sent: the first push after the engine starts sends every weight; later pushes
(`changed_only`) send only what training can change (`changed_names`): the trainable
parameters, and under LoRA the base weights its adapters fold into (merged W + scale * B @ A,
under the base model's names), completed to the engine's load units (vLLM loads q/k/v and
gate/up as one fused tensor). Frozen layers are then neither gathered nor sent again.

How: FSDP2 (DTensor) shards are all-gathered per parameter, or `bucket_bytes` at a time in one
collective over a flattened buffer. Shards are cast to the engine's dtype before they are
gathered: the cast is elementwise, so the engine gets the same values, and a bf16 engine
fed by an fp32 policy moves half the bytes. Every rank must run the same push (the gathers
are collectives; `changed_names` is the same on every rank).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from grailcore import dist as gdist
from grailcore.lora import BASE_LAYER, is_adapter_param, merged_weight

_Entry = tuple[str, str, torch.Tensor]
"""(HF name, the model's own parameter name, parameter)."""


def _full(param: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole tensor of a parameter; an FSDP2 (DTensor) shard is cast to `dtype` first,
    then gathered. A local tensor keeps its dtype (the engine's loader casts as it copies)."""
    tensor = param.detach()
    if hasattr(tensor, "full_tensor"):  # FSDP2 DTensor shard
        tensor = (tensor if dtype is None else tensor.to(dtype)).full_tensor()
    return tensor


def _hf_name(name: str) -> str:
    return name.replace(BASE_LAYER, ".").replace("_checkpoint_wrapped_module.", "")


def _entries(model: torch.nn.Module, names: set[str] | None) -> list[_Entry]:
    """The base model's parameters (adapters are folded in later), restricted to `names`."""
    out = []
    for name, param in model.named_parameters():
        if is_adapter_param(name):
            continue
        hf = _hf_name(name)
        if names is None or hf in names:
            out.append((hf, name, param))
    return out


def changed_names(model: torch.nn.Module) -> set[str]:
    """HF names of the weights an optimizer step can change: trainable parameters, and the
    base weight of every LoRA layer (the merged weight moves with its adapters)."""
    changed = set()
    for name, param in model.named_parameters():
        if is_adapter_param(name):
            continue
        if param.requires_grad or (BASE_LAYER in name and name.endswith(".weight")):
            changed.add(_hf_name(name))
    return changed


def _shard0_mesh(tensors: list[torch.Tensor]):
    """The 1-D mesh every tensor is Shard(0)-sharded on (FSDP2's layout), else None."""
    from torch.distributed.tensor import DTensor, Shard

    if not tensors or not all(isinstance(t, DTensor) for t in tensors):
        return None
    mesh = tensors[0].device_mesh
    if mesh.ndim != 1 or any(t.device_mesh != mesh or tuple(t.placements) != (Shard(0),) for t in tensors):
        return None
    return mesh


def _gather_bucket(params: list[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Full tensors of FSDP2 shards through ONE all-gather of a flat buffer (in `dtype`, or
    the first parameter's).

    Shard(0) splits dim 0 like torch.chunk: every rank holds ceil(d0 / world) rows but the
    last ones (possibly none). Each local shard is padded to that size in the buffer, so
    rank r's rows of a parameter sit at the same offset in every rank's part."""
    params = [p.detach() for p in params]
    mesh = _shard0_mesh(params)
    if mesh is None or len(params) == 1:
        return [_full(p, dtype) for p in params]
    world = mesh.size()
    rows = [-(-p.shape[0] // world) for p in params]
    sizes = [r * math.prod(p.shape[1:]) for r, p in zip(rows, params)]
    local = torch.zeros(sum(sizes), dtype=dtype or params[0].dtype, device=params[0].to_local().device)
    offset = 0
    for p, size in zip(params, sizes):
        shard = p.to_local().reshape(-1)
        local[offset:offset + shard.numel()].copy_(shard)
        offset += size
    gathered = gdist.all_gather_flat(local, group=mesh.get_group()).view(world, -1)  # [world, sum(sizes)]
    out, offset = [], 0
    for p, r, size in zip(params, rows, sizes):
        # [world, size] -> [world * rows, ...] (a copy: contiguous), minus the padding rows
        out.append(gathered[:, offset:offset + size].reshape(world * r, *p.shape[1:])[:p.shape[0]])
        offset += size
    return out


def _buckets(entries: list[_Entry], bucket_bytes: int, alone) -> Iterator[list[_Entry]]:
    """Consecutive entries of at most `bucket_bytes` of parameters (a larger tensor alone; one
    where `alone(entry)` too); 0: one each."""
    bucket: list[_Entry] = []
    size = 0
    for entry in entries:
        nbytes = entry[2].numel() * entry[2].element_size()
        if bucket and (size + nbytes > bucket_bytes or alone(entry) or alone(bucket[0])):
            yield bucket
            bucket, size = [], 0
        bucket.append(entry)
        size += nbytes
    if bucket:
        yield bucket


def iter_full_params(model: torch.nn.Module, names: set[str] | None = None, bucket_bytes: int = 0,
                     dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) per parameter of the base model (or of `names` only); LoRA
    adapters are folded into their layer's weight (a new tensor: the model is not
    modified) and never sent themselves. `dtype`: FSDP2 shards are gathered in it (the
    receiver's dtype; a LoRA layer's base weight in its own, to merge exactly). Every rank
    must consume the iterator."""
    for bucket in _buckets(_entries(model, names), bucket_bytes, alone=_merged):
        lora = _merged(bucket[0])
        for (hf, name, _), tensor in zip(bucket, _gather_bucket([p for _, _, p in bucket], None if lora else dtype)):
            if lora:
                tensor = merged_weight(model.get_submodule(name.split(BASE_LAYER)[0]), tensor, _full)
            yield hf, tensor


def _merged(entry: _Entry) -> bool:
    """A LoRA layer's base weight, sent merged with its adapters."""
    return BASE_LAYER in entry[1] and entry[1].endswith(".weight")


def push_weights(model: torch.nn.Module, engine, changed_only: bool = False, bucket_bytes: int = 0) -> int:
    """Send the policy's weights to `engine` (every weight, or with `changed_only` what
    `changed_names` lists, completed to the engine's load units); returns the tensors sent."""
    if getattr(engine, "shares_weights", False):
        return 0
    names = engine.load_units(changed_names(model)) if changed_only else None
    sent = 0

    def counted():
        nonlocal sent  # shards are gathered in the engine's dtype
        for item in iter_full_params(model, names, bucket_bytes, getattr(engine, "dtype", None)):
            sent += 1
            yield item

    engine.update_weights(counted())
    return sent
