"""Checkpoints: atomic, checksummed save and resume that works across world sizes (plain or
FSDP2 models alike). The final policy's HF export is `grailcore.export`.

Layout: run_dir/checkpoints/{latest, step_00000010/{<weights>, scheduler.pt,
trainer_state.json, extra.pt, rng.pt, manifest.json}}, where <weights> is
- sharded (default): state/ written by `torch.distributed.checkpoint`, every rank its own
  shards of model and optimizer (`grailcore.checkpoint.sharded`); nothing is gathered;
- full (`sharded=False`): model.safetensors and optimizer.pt, gathered to rank 0
  (`grailcore.checkpoint.gathered`).
A LoRA run saves the adapters only (`trainable_only`); the export is merged. Loading reads
either layout, at any world size; `read_model_weights` reads a checkpoint's weights alone.
The directory itself (temp dir, manifest, rename, `latest`, pruning) is `checkpoint.files`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.api import CheckpointException

from grailcore import dist as gdist
from grailcore.checkpoint import gathered, sharded as shards
from grailcore.checkpoint.files import (
    CHECKPOINTS_DIR,
    EXTRA_FILE,
    MANIFEST_FILE,
    RNG_FILE,
    SCHEDULER_FILE,
    TRAINER_STATE_FILE,
    CheckpointError,
    CheckpointWarning,
    choose,
    describe_error,
    intact,
    make_tmp,
    prune,
    run_on_rank0,
    write_checkpoint_dir,
    write_latest,
)
from grailcore.export import tied_aliases
from grailcore.rng import capture_rng_state, restore_rng_state

__all__ = ["CheckpointError", "CheckpointWarning", "LoadedCheckpoint", "load_checkpoint", "read_model_weights",
           "save_checkpoint"]


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` restored besides the model/optimizer/scheduler/RNG it set."""

    path: Path
    step: int
    trainer_state: dict
    """As saved, through JSON (tuples come back as lists)."""
    extra: dict[str, object]


def _check_weights_only(obj: object, where: str) -> None:
    """Reject what `torch.load(weights_only=True)` could not read back at resume time."""
    if isinstance(obj, (dict, OrderedDict)):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} must be a str or int")
            _check_weights_only(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_weights_only(value, f"{where}[{i}]")
    elif not isinstance(obj, (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.Size)):
        raise TypeError(
            f"{where} is a {type(obj).__name__}; checkpoint extras hold only tensors, numbers, "
            "strings and dict/list/tuple of them (convert it, e.g. ndarray -> torch.tensor)"
        )


def _trainer_state_json(trainer_state: dict) -> str:
    try:
        return json.dumps(trainer_state, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(
            f"trainer_state is not JSON-serializable ({e}); keep numbers/strings/lists/dicts "
            "there and put tensors or other objects in `extra`"
        ) from e


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    trainer_state: dict, extra: dict[str, object] | None = None,
                    keep: int = 2, trainable_only: bool = False, sharded: bool = True) -> Path:
    """Save the checkpoint of step `step`; returns its dir on every rank.

    Every rank must call it. Sharded, every rank writes its shards into a temp dir; full,
    weights are gathered to rank 0, which writes them. Rank 0 then writes the small files
    and the manifest, renames the temp dir into place, points `latest` at it and prunes to
    the `keep` newest. On failure every rank raises CheckpointError and the previous
    checkpoint and `latest` are intact. trainable_only: save only parameters with
    requires_grad (a LoRA run's adapters); the frozen ones must come from the configured
    base model again at resume.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep}): the checkpoint just written is kept")
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step_{step:08d}"
    tied = tied_aliases(model)
    rng_per_rank = gdist.all_gather_object(capture_rng_state())
    scheduler_sd = scheduler.state_dict() if scheduler is not None else None
    small = dict(scheduler_sd=scheduler_sd, trainer_state=trainer_state, extra=extra or {}, rng_per_rank=rng_per_rank)
    meta = {"step": step, "world_size": gdist.get_world_size(), "tied": tied,
            "trainable_only": trainable_only, "layout": "sharded" if sharded else "full"}
    if not sharded:
        weights = gathered.gather_writers(model, optimizer, tied, trainable_only)
        run_on_rank0(f"save checkpoint {final}", lambda: _write_all(root, final, keep, meta, weights, **small))
        return final

    def prepare() -> str:
        _check_small(small["extra"], small["trainer_state"])  # fail before any shard is written
        try:
            return str(make_tmp(root, final))
        except OSError as e:
            raise CheckpointError(f"could not create the temp dir of checkpoint {final} ({describe_error(e)}); "
                                  f"{intact(root)}. Free disk space or fix permissions of the run dir.") from e

    tmp = Path(run_on_rank0(f"prepare checkpoint {final}", prepare))
    try:
        entries = shards.save_shards(tmp, model, optimizer, tied, trainable_only)
    except (Exception, CheckpointException) as e:  # DCP raises the latter (a BaseException) on every rank
        run_on_rank0("remove a partial checkpoint", lambda: shutil.rmtree(tmp, ignore_errors=True))
        cause = shards.first_failure(e)
        raise CheckpointError(
            f"could not write the shards of checkpoint {final} ({describe_error(cause)}); the partial "
            f"write was removed and {intact(root)}. Free disk space or fix permissions of the run dir, "
            "then resume."
        ) from e
    run_on_rank0(f"save checkpoint {final}", lambda: _write_all(root, final, keep, meta, {}, tmp=tmp,
                                                                 written=entries, **small))
    return final


def _check_small(extra: dict, trainer_state: dict) -> str:
    """Reject extras and trainer state a resume could not read; the trainer state as JSON."""
    _check_weights_only(extra, "extra")
    return _trainer_state_json(trainer_state)


def _write_all(root: Path, final: Path, keep: int, meta: dict, weights: dict[str, Callable[[Path], None]], *,
               scheduler_sd: dict | None, trainer_state: dict, extra: dict, rng_per_rank: list,
               tmp: Path | None = None, written: dict[str, dict] | None = None) -> None:
    """Rank 0: validate, write the checkpoint dir, point `latest` at it, prune."""
    state_json = _check_small(extra, trainer_state)  # before writing: fail without a temp dir
    files = {
        **weights,
        TRAINER_STATE_FILE: lambda p: p.write_text(state_json),
        EXTRA_FILE: lambda p: torch.save(dict(extra), p),
        RNG_FILE: lambda p: torch.save(rng_per_rank, p),
    }
    if scheduler_sd is not None:
        files[SCHEDULER_FILE] = lambda p: torch.save(scheduler_sd, p)
    write_checkpoint_dir(root, final, files, meta, tmp, written or {})
    write_latest(root, final)
    prune(root, keep, final)


def load_checkpoint(run_dir: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    ) -> LoadedCheckpoint | None:
    """Restore the newest good checkpoint into model/optimizer/scheduler and this rank's RNG.

    Every rank must call it. Rank 0 verifies checksums and reads the files; a corrupt or
    incomplete checkpoint is skipped with a CheckpointWarning naming it. None when the run
    has no checkpoint; CheckpointError when checkpoints exist but none is usable.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    found = run_on_rank0("read a checkpoint", lambda: _read_small_files(choose(root)))
    if found is None:
        return None
    path = Path(found["path"])
    if scheduler is not None and found["scheduler"] is None:
        raise CheckpointError(f"{path} has no {SCHEDULER_FILE} but a scheduler was given to restore")
    load = shards.load_shards if found["layout"] == "sharded" else gathered.load_gathered
    load(path, found["tied"], model, optimizer, found["trainable_only"])
    if scheduler is not None:
        scheduler.load_state_dict(found["scheduler"])
    rank, rng_per_rank = gdist.get_rank(), found["rng"]
    if rank < len(rng_per_rank):
        restore_rng_state(rng_per_rank[rank])
    else:
        warnings.warn(f"{path} holds RNG states of {len(rng_per_rank)} ranks; rank {rank} keeps "
                      "its current RNG state", CheckpointWarning, stacklevel=2)
    return LoadedCheckpoint(path=path, step=found["step"], trainer_state=found["trainer_state"],
                            extra=found["extra"])


def _read_small_files(path: Path | None) -> dict | None:
    """Everything but the weights and optimizer state, which their layout loads."""
    if path is None:
        return None
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    has_scheduler = SCHEDULER_FILE in manifest["files"]
    return {
        "path": str(path), "step": manifest["step"], "tied": manifest["tied"],
        "layout": manifest.get("layout", "full"),  # checkpoints from before sharding are full
        "trainable_only": manifest.get("trainable_only", False),
        "trainer_state": json.loads((path / TRAINER_STATE_FILE).read_text()),
        "extra": torch.load(path / EXTRA_FILE, weights_only=True),
        "rng": torch.load(path / RNG_FILE, weights_only=True),
        "scheduler": torch.load(path / SCHEDULER_FILE, weights_only=True) if has_scheduler else None,
    }


def read_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights saved in checkpoint dir `path` (either layout), in one process, as
    CPU tensors by parameter name; tied aliases are not included."""
    path = Path(path)
    sharded = json.loads((path / MANIFEST_FILE).read_text()).get("layout") == "sharded"
    return (shards if sharded else gathered).read_model_weights(path)
