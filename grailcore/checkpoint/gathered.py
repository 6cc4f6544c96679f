"""The gathered ("full") layout: model and optimizer state gathered to rank 0, which writes
model.safetensors and optimizer.pt; at load rank 0 reads them and `set_*_state_dict`
broadcasts and reshards. Simple, one file to inspect, but rank 0 holds the whole state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from grailcore import dist as gdist
from grailcore.checkpoint.files import MODEL_FILE, OPTIMIZER_FILE, check_saved_keys, restore_tied, run_on_rank0


def gather_writers(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tied: dict[str, str],
                   trainable_only: bool) -> dict[str, Callable[[Path], None]]:
    """Gather the full state (a collective; CPU offload); the writers of its files, for rank 0."""
    # ignore_frozen_params still gathers a frozen tied alias (lm_head.weight); _save_model drops it.
    gather = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    model_sd = get_model_state_dict(model, options=gather)
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=full)
    return {MODEL_FILE: lambda p: _save_model(model_sd, tied, p), OPTIMIZER_FILE: lambda p: torch.save(optim_sd, p)}


def _save_model(state_dict: dict[str, torch.Tensor], tied: dict[str, str], path: Path) -> None:
    # safetensors refuses shared tensors; the tied alias is restored from the manifest.
    tensors = {k: v.contiguous() for k, v in state_dict.items() if k not in tied}
    save_file(tensors, str(path), metadata={"format": "pt"})


def load_gathered(path: Path, tied: dict[str, str], model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer | None, trainable_only: bool) -> None:
    # Rank 0 alone holds the full state; set_*_state_dict broadcasts and reshards it, so a
    # checkpoint from any world size loads into plain and FSDP2 models alike.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=gdist.get_world_size() > 1,
                               strict=not trainable_only)
    model_sd: dict[str, torch.Tensor] = {}
    if gdist.is_main():
        model_sd = load_file(str(path / MODEL_FILE))
        restore_tied(model_sd, tied)
    if trainable_only:  # strict=False above: check the keys here instead
        # Local (sharded) state dict: the model's own keys, without any gather. It keeps a frozen
        # tied alias (lm_head.weight), which the saved file never holds.
        trainable = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))) - set(tied)
        run_on_rank0(f"load {path / MODEL_FILE}",
                     lambda: check_saved_keys(path / MODEL_FILE, set(model_sd), trainable))
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        optim_sd = torch.load(path / OPTIMIZER_FILE, weights_only=True) if gdist.is_main() else {}
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def read_model_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / MODEL_FILE))
