"""Sharded model and optimizer state through `torch.distributed.checkpoint` (DCP).

Every rank writes its own shards (`state/__<rank>_<i>.distcp`; rank 0 also the `.metadata`
index), so no rank ever holds the full model or optimizer state. DCP reshards at load: a
checkpoint written at one world size loads at another, into FSDP2 or plain models alike.
`grailcore.checkpoint.files` owns the directory around it (temp dir, manifest, rename, `latest`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from grailcore import dist as gdist
from grailcore.atomic_files import sha256_file
from grailcore.checkpoint.files import STATE_DIR, check_saved_keys, restore_tied, run_on_rank0

_MODEL, _OPTIM = "model", "optim"


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes one process; that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _model_state(model: torch.nn.Module, tied: dict[str, str], trainable_only: bool) -> dict:
    """This rank's local (sharded) model state, without tied aliases: the canonical tensor is
    stored once and the alias is the same parameter in the model."""
    state = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=trainable_only))
    for alias in tied:
        state.pop(alias, None)
    return state


def save_shards(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                tied: dict[str, str], trainable_only: bool) -> dict[str, dict]:
    """Every rank writes its shards of model and optimizer into directory/state (a collective).
    Returns, on every rank, the manifest entries {relative path: {sha256, bytes}} of all files
    written: each rank hashes its own files, so the hashing is spread like the writing."""
    state = {_MODEL: _model_state(model, tied, trainable_only), _OPTIM: get_optimizer_state_dict(model, optimizer)}
    out = directory / STATE_DIR
    with _single_process_quiet():
        dcp.save(state, storage_writer=FileSystemWriter(out, single_file_per_rank=True, sync_files=True),
                 no_dist=gdist.get_world_size() == 1)
    rank = gdist.get_rank()
    mine = sorted(out.glob(f"__{rank}_*.distcp")) + ([out / ".metadata"] if rank == 0 else [])
    entries = {f"{STATE_DIR}/{p.name}": {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in mine}
    merged: dict[str, dict] = {}
    for part in gdist.all_gather_object(entries):
        merged.update(part)
    return merged


def first_failure(error: BaseException) -> BaseException:
    """The first rank's original exception inside DCP's CheckpointException (else `error`)."""
    if isinstance(error, CheckpointException) and error.failures:
        exc, _trace = error.failures[min(error.failures)]
        return exc
    return error


def _saved_model_entries(directory: Path) -> dict[str, TensorStorageMetadata]:
    """The DCP metadata of the model tensors a sharded checkpoint holds, by parameter name."""
    metadata = FileSystemReader(directory / STATE_DIR).read_metadata()
    prefix = f"{_MODEL}."
    return {key[len(prefix):]: meta for key, meta in metadata.state_dict_metadata.items()
            if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}


def saved_model_keys(directory: Path) -> set[str]:
    """The model parameter names a sharded checkpoint holds."""
    return set(_saved_model_entries(directory))


def load_shards(directory: Path, tied: dict[str, str], model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None, trainable_only: bool) -> None:
    """Every rank reads the slices of directory/state its own shards need (a collective): no
    rank holds more than its share."""
    state: dict[str, dict] = {_MODEL: _model_state(model, tied, trainable_only)}
    run_on_rank0(f"load {directory / STATE_DIR}",
                 lambda: check_saved_keys(directory / STATE_DIR, saved_model_keys(directory), set(state[_MODEL])))
    if optimizer is not None:
        state[_OPTIM] = get_optimizer_state_dict(model, optimizer)  # creates empty Adam moments to fill
    with _single_process_quiet():
        dcp.load(state, storage_reader=FileSystemReader(directory / STATE_DIR), no_dist=gdist.get_world_size() == 1)
    model_state = state[_MODEL]
    restore_tied(model_state, tied)
    set_model_state_dict(model, model_state, options=StateDictOptions(strict=not trainable_only))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state[_OPTIM])


def read_model_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint as plain CPU tensors, in one process and
    without a model (to inspect or compare checkpoints); tied aliases are not included."""
    weights = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
               for name, meta in _saved_model_entries(directory).items()}
    with _single_process_quiet():  # nested like the saved state: {"model": {name: tensor}}
        dcp.load({_MODEL: weights}, storage_reader=FileSystemReader(directory / STATE_DIR), no_dist=True)
    return weights
