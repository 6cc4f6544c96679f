"""Checkpoints: atomic, checksummed save and resume that works across world sizes (plain or
FSDP2 models alike, through full state dicts). The final policy's HF export is
`grailcore.export`.

Layout: run_dir/checkpoints/{latest, step_00000010/{model.safetensors, optimizer.pt,
scheduler.pt, trainer_state.json, extra.pt, rng.pt, manifest.json}}. A LoRA run's
model.safetensors holds the adapters only (`trainable_only`); the export is merged.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
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
from grailcore.atomic_files import fsync_path, replace_dir, sha256_file
from grailcore.export import tied_aliases
from grailcore.rng import capture_rng_state, restore_rng_state

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
EXTRA_FILE = "extra.pt"
RNG_FILE = "rng.pt"
"""RNG states of every rank, indexed by rank (see `capture_rng_state`)."""
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable checkpoint could be read."""


_run_on_rank0 = functools.partial(gdist.run_on_rank0, error=CheckpointError)  # a failure raises on every rank


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, missing files) or pruned as stale."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """What `load_checkpoint` restored besides the model/optimizer/scheduler/RNG it set."""

    path: Path
    step: int
    trainer_state: dict
    """As saved, through JSON (tuples come back as lists)."""
    extra: dict[str, object]



def _write_latest(root: Path, final: Path) -> None:
    """Point `latest` at `final` atomically (temp file + os.replace)."""
    tmp = root / f".{LATEST_FILE}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / LATEST_FILE)
        fsync_path(root)
    except OSError as e:
        raise CheckpointError(
            f"checkpoint {final} is complete, but updating {root / LATEST_FILE} failed ({e}); "
            "`latest` still names the previous checkpoint, which is intact"
        ) from e
    finally:
        tmp.unlink(missing_ok=True)


def _read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name if _STEP_DIR.match(name) else None


def _step_dirs(root: Path) -> list[Path]:
    """Finished checkpoint dirs (temp dirs start with '.'), newest step first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))



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
                    keep: int = 2, trainable_only: bool = False) -> Path:
    """Save a full (unsharded) checkpoint of step `step`; returns its dir on every rank.

    Every rank must call it (weights are gathered); rank 0 writes into a temp dir, renames
    it into place, then points `latest` at it and prunes to the `keep` newest. On failure
    every rank raises CheckpointError and the previous checkpoint and `latest` are intact.
    trainable_only: save only parameters with requires_grad (a LoRA run's adapters); the
    frozen ones must come from the configured base model again at resume.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (got {keep}): the checkpoint just written is kept")
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"step_{step:08d}"
    # ignore_frozen_params still gathers a frozen tied alias (lm_head.weight); _save_model drops it.
    gather = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    model_sd = get_model_state_dict(model, options=gather)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_GATHER)
    rng_per_rank = gdist.all_gather_object(capture_rng_state())
    scheduler_sd = scheduler.state_dict() if scheduler is not None else None
    tied = tied_aliases(model)
    _run_on_rank0(f"save checkpoint {final}", lambda: _write_all(
        root, final, keep, tied=tied, model_sd=model_sd, optim_sd=optim_sd,
        scheduler_sd=scheduler_sd, trainer_state=trainer_state, extra=extra or {},
        rng_per_rank=rng_per_rank, trainable_only=trainable_only))
    return final


def _write_all(root: Path, final: Path, keep: int, *, tied: dict[str, str], model_sd: dict,
               optim_sd: dict, scheduler_sd: dict | None, trainer_state: dict, extra: dict,
               rng_per_rank: list, trainable_only: bool) -> None:
    """Rank 0: validate, write the checkpoint dir, point `latest` at it, prune."""
    _check_weights_only(extra, "extra")
    state_json = _trainer_state_json(trainer_state)  # before writing: fail without a temp dir
    files = {
        MODEL_FILE: lambda p: _save_model(model_sd, tied, p),
        OPTIMIZER_FILE: lambda p: torch.save(optim_sd, p),
        TRAINER_STATE_FILE: lambda p: p.write_text(state_json),
        EXTRA_FILE: lambda p: torch.save(dict(extra), p),
        RNG_FILE: lambda p: torch.save(rng_per_rank, p),
    }
    if scheduler_sd is not None:
        files[SCHEDULER_FILE] = lambda p: torch.save(scheduler_sd, p)
    meta = {"step": _step_of(final), "world_size": gdist.get_world_size(), "tied": tied,
            "trainable_only": trainable_only}
    _write_checkpoint_dir(root, final, files, meta)
    _write_latest(root, final)
    _prune(root, keep, final)


def _save_model(state_dict: dict[str, torch.Tensor], tied: dict[str, str], path: Path) -> None:
    # safetensors refuses shared tensors; the tied alias is restored from the manifest.
    tensors = {k: v.contiguous() for k, v in state_dict.items() if k not in tied}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_checkpoint_dir(root: Path, final: Path, files: dict[str, Callable[[Path], None]],
                          meta: dict) -> None:
    """Write `files` and a manifest of their checksums into a temp dir, then rename it."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    current = "the temp dir"
    try:
        entries = {}
        for name, write in files.items():
            current = name
            write(tmp / name)
            fsync_path(tmp / name)
            entries[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        current = MANIFEST_FILE
        manifest = {"format": FORMAT_VERSION, "created": time.time(), **meta, "files": entries}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        fsync_path(tmp / MANIFEST_FILE)
        fsync_path(tmp)
        current = f"the rename to {final.name}"
        replace_dir(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = errno.errorcode.get(e.errno, "") if e.errno else ""
        previous = _read_latest(root)
        intact = (f"the previous checkpoint {root / previous} and `latest` are intact"
                  if previous else "no earlier checkpoint existed; nothing was changed")
        raise CheckpointError(
            f"could not write checkpoint {final} ({reason} {e.strerror or e} while writing "
            f"{current}); the partial write was removed and {intact}. Free disk space or "
            "fix permissions of the run dir, then resume."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _prune(root: Path, keep: int, written: Path) -> None:
    """Keep `written` and the keep-1 newest complete older checkpoints; remove the rest."""
    kept = 1
    for path in _step_dirs(root):
        if path == written:
            continue
        if _step_of(path) > _step_of(written):
            why = f"it is newer than {written.name}: left from before the run resumed"
        else:
            problem = _verify(path, checksums=False)  # hashing every old checkpoint is slow
            if problem is None and kept < keep:
                kept += 1
                continue
            why = f"unusable ({problem})" if problem else None  # None: ordinary pruning
        if why:
            warnings.warn(f"removing checkpoint {path}: {why}", CheckpointWarning, stacklevel=3)
        try:
            shutil.rmtree(path)
        except OSError as e:
            warnings.warn(f"could not remove old checkpoint {path}: {e}", CheckpointWarning, stacklevel=3)



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
    found = _run_on_rank0("read a checkpoint", lambda: _read_small_files(_choose(root)))
    if found is None:
        return None
    path = Path(found["path"])
    if scheduler is not None and found["scheduler"] is None:
        raise CheckpointError(f"{path} has no {SCHEDULER_FILE} but a scheduler was given to restore")
    _load_weights(path, found["tied"], model, optimizer, found["trainable_only"])
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


def _verify(path: Path, checksums: bool = True) -> str | None:
    """None if `path` is a complete checkpoint whose files match the manifest (sizes, and
    sha256 when `checksums`), else why not."""
    if not path.is_dir():
        return "the directory does not exist"
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST_FILE} is missing or unreadable ({e})"
    if manifest.get("format") != FORMAT_VERSION:
        return f"format {manifest.get('format')!r}, this code reads format {FORMAT_VERSION}"
    required = [MODEL_FILE, OPTIMIZER_FILE, TRAINER_STATE_FILE, EXTRA_FILE, RNG_FILE]
    if missing := [name for name in required if name not in files]:
        return f"the manifest lists no {missing}"
    for name, entry in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if (size := (path / name).stat().st_size) != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']}"
        if checksums and sha256_file(path / name) != entry["sha256"]:
            return f"{name} does not match its sha256 in the manifest"
    return None


def _choose(root: Path) -> Path | None:
    """The newest usable checkpoint: the one `latest` names, else older ones (warning each)."""
    name = _read_latest(root)
    dirs = _step_dirs(root)
    if name is not None:
        candidates = [root / name] + [d for d in dirs if _step_of(d) < _step_of(root / name)]
    else:
        if (root / LATEST_FILE).exists():
            warnings.warn(f"{root / LATEST_FILE} does not name a step_NNNNNNNN dir; trying the "
                          "newest checkpoint dirs", CheckpointWarning, stacklevel=4)
        # No `latest` but finished dirs: a crash between the rename and `latest`'s update.
        candidates = dirs
    if not candidates and not (root / LATEST_FILE).exists():
        return None
    problems = []
    for path in candidates:
        problem = _verify(path)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
        warnings.warn(f"checkpoint {path} is unusable ({problem}); falling back to the previous "
                      "checkpoint", CheckpointWarning, stacklevel=4)
    raise CheckpointError(
        f"no usable checkpoint in {root} ({'; '.join(problems) or 'no checkpoint dirs'}); restore "
        "a good copy, or move the checkpoints away to start the run over"
    )


def _read_small_files(path: Path | None) -> dict | None:
    """Everything but the weights and optimizer state, which are loaded on rank 0 only."""
    if path is None:
        return None
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    has_scheduler = SCHEDULER_FILE in manifest["files"]
    return {
        "path": str(path), "step": manifest["step"], "tied": manifest["tied"],
        "trainable_only": manifest.get("trainable_only", False),
        "trainer_state": json.loads((path / TRAINER_STATE_FILE).read_text()),
        "extra": torch.load(path / EXTRA_FILE, weights_only=True),
        "rng": torch.load(path / RNG_FILE, weights_only=True),
        "scheduler": torch.load(path / SCHEDULER_FILE, weights_only=True) if has_scheduler else None,
    }


def _load_weights(path: Path, tied: dict[str, str], model: torch.nn.Module,
                  optimizer: torch.optim.Optimizer | None, trainable_only: bool) -> None:
    # Rank 0 alone holds the full state; set_*_state_dict broadcasts and reshards it, so a
    # checkpoint from any world size loads into plain and FSDP2 models alike.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=gdist.get_world_size() > 1,
                               strict=not trainable_only)
    model_sd: dict[str, torch.Tensor] = {}
    if gdist.is_main():
        model_sd = load_file(str(path / MODEL_FILE))
        for alias, canonical in tied.items():
            if canonical in model_sd:  # a trainable-only checkpoint has no frozen embedding
                model_sd[alias] = model_sd[canonical]
    if trainable_only:  # strict=False above: check the keys here instead
        # Local (sharded) state dict: the model's own keys, without any gather. It keeps a frozen
        # tied alias (lm_head.weight), which the saved file never holds.
        trainable = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))) - set(tied)
        _run_on_rank0(f"load {path / MODEL_FILE}", lambda: _check_trainable_keys(path, set(model_sd), trainable))
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is not None:
        optim_sd = torch.load(path / OPTIMIZER_FILE, weights_only=True) if gdist.is_main() else {}
        set_optimizer_state_dict(model, optimizer, optim_sd, options=options)


def _check_trainable_keys(path: Path, saved: set[str], trainable: set[str]) -> None:
    if saved != trainable:
        raise CheckpointError(
            f"{path / MODEL_FILE} holds the trainable parameters of another model: missing "
            f"{sorted(trainable - saved)[:5]} ({len(trainable - saved)}), unexpected {sorted(saved - trainable)[:5]} "
            f"({len(saved - trainable)}). Resume with the model.name_or_path and model.lora_* settings it was "
            "written with (the run dir's config.yaml)")
