"""The checkpoint directory: file names, the temp dir a checkpoint is written into, its
manifest of checksums, the atomic rename, `latest`, pruning, and choosing the newest good
checkpoint at resume. Which files hold the weights is the layouts' business
(`grailcore.checkpoint.sharded`, `grailcore.checkpoint.gathered`).
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
from pathlib import Path
from typing import Callable

from grailcore import dist as gdist
from grailcore.atomic_files import fsync_path, replace_dir, sha256_file

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
SCHEDULER_FILE = "scheduler.pt"
TRAINER_STATE_FILE = "trainer_state.json"
EXTRA_FILE = "extra.pt"
RNG_FILE = "rng.pt"
"""RNG states of every rank, indexed by rank (see `capture_rng_state`)."""
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_DIR = "state"
"""The sharded layout's `torch.distributed.checkpoint` directory."""
WEIGHT_FILES = {"sharded": [f"{STATE_DIR}/.metadata"], "full": [MODEL_FILE, OPTIMIZER_FILE]}
"""By the manifest's `layout` (checkpoints written before the sharded layout are full)."""
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable checkpoint could be read."""


run_on_rank0 = functools.partial(gdist.run_on_rank0, error=CheckpointError)  # a failure raises on every rank


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupt, missing files) or pruned as stale."""


def write_latest(root: Path, final: Path) -> None:
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


def read_latest(root: Path) -> str | None:
    try:
        name = (root / LATEST_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return name if _STEP_DIR.match(name) else None


def step_dirs(root: Path) -> list[Path]:
    """Finished checkpoint dirs (temp dirs start with '.'), newest step first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def make_tmp(root: Path, final: Path) -> Path:
    """Rank 0: the temp dir a checkpoint is written into (stale ones of crashed saves removed)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))


def write_checkpoint_dir(root: Path, final: Path, files: dict[str, Callable[[Path], None]], meta: dict,
                          tmp: Path | None, written: dict[str, dict]) -> None:
    """Write `files` and a manifest of their checksums (and of the `written` ones already in
    `tmp`) into a temp dir, then rename it."""
    current = "the temp dir"
    try:
        if tmp is None:
            tmp = make_tmp(root, final)
        entries = dict(written)
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
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"could not write checkpoint {final} ({describe_error(e)} while writing {current}); the partial "
            f"write was removed and {intact(root)}. Free disk space or fix permissions of the run dir, "
            "then resume."
        ) from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def describe_error(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"{errno.errorcode.get(e.errno, '') if e.errno else ''} {e.strerror or e}".strip()
    return f"{type(e).__name__}: {e}"


def intact(root: Path) -> str:
    previous = read_latest(root)
    return (f"the previous checkpoint {root / previous} and `latest` are intact" if previous
            else "no earlier checkpoint existed; nothing was changed")


def prune(root: Path, keep: int, written: Path) -> None:
    """Keep `written` and the keep-1 newest complete older checkpoints; remove the rest."""
    kept = 1
    for path in step_dirs(root):
        if path == written:
            continue
        if step_of(path) > step_of(written):
            why = f"it is newer than {written.name}: left from before the run resumed"
        else:
            problem = verify(path, checksums=False)  # hashing every old checkpoint is slow
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


def verify(path: Path, checksums: bool = True) -> str | None:
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
    layout = manifest.get("layout", "full")
    if layout not in WEIGHT_FILES:
        return f"layout {layout!r}, this code reads {sorted(WEIGHT_FILES)}"
    required = [*WEIGHT_FILES[layout], TRAINER_STATE_FILE, EXTRA_FILE, RNG_FILE]
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


def choose(root: Path) -> Path | None:
    """The newest usable checkpoint: the one `latest` names, else older ones (warning each)."""
    name = read_latest(root)
    dirs = step_dirs(root)
    if name is not None:
        candidates = [root / name] + [d for d in dirs if step_of(d) < step_of(root / name)]
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
        problem = verify(path)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
        warnings.warn(f"checkpoint {path} is unusable ({problem}); falling back to the previous "
                      "checkpoint", CheckpointWarning, stacklevel=4)
    raise CheckpointError(
        f"no usable checkpoint in {root} ({'; '.join(problems) or 'no checkpoint dirs'}); restore "
        "a good copy, or move the checkpoints away to start the run over"
    )


def restore_tied(state: dict, tied: dict[str, str]) -> None:
    """Point each tied alias (e.g. lm_head.weight) at its canonical tensor, which is the one
    saved; a trainable-only checkpoint may hold neither."""
    for alias, canonical in tied.items():
        if canonical in state:
            state[alias] = state[canonical]


def check_saved_keys(path: Path, saved: set[str], trainable: set[str]) -> None:
    if saved != trainable:
        raise CheckpointError(
            f"{path} holds the parameters of another model: missing "
            f"{sorted(trainable - saved)[:5]} ({len(trainable - saved)}), unexpected {sorted(saved - trainable)[:5]} "
            f"({len(saved - trainable)}). Resume with the model.name_or_path and model.lora_* settings it was "
            "written with (the run dir's config.yaml)")
