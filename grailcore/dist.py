"""Process-group setup and the few collectives the trainer needs.

One process without torchrun is world 1 with no process group; every helper here works
in both cases, so callers never branch on "is this distributed".
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Literal, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank among world_size, and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    """'gloo' (CPU) or 'nccl' (CUDA); None when running without a process group."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError) as e:
        raise RuntimeError(
            f"torchrun environment variable {name}={os.environ.get(name)!r} is missing or not an "
            "integer; launch with `torchrun --nproc_per_node N -m grailcore.train ...` or plain "
            "`python -m grailcore.train ...` for one process"
        ) from e


_timeout_s: float | None = None
"""The group's collective timeout, as set by `init_distributed` (None: torch's default)."""


def init_distributed(timeout_s: float | None = None) -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU), or run as world 1.

    torchrun's RANK/WORLD_SIZE/LOCAL_RANK are the only environment variables read: torch
    demands them. timeout_s (`Config.collective_timeout_s`): a collective waiting longer
    raises on the waiting rank (see `named_failures`). Idempotent: a second call returns
    the same info (the first call's timeout stays).
    """
    global _timeout_s
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if cuda:
        device = torch.device("cuda", local_rank)
        # Before init: nccl binds each rank's communicator to its current device.
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        timeout = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend=backend, device_id=device if cuda else None,
                                **_restart_store(rank, world_size, timeout), **timeout)
        _timeout_s = timeout_s
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                    backend=dist.get_backend())


def _restart_store(rank: int, world_size: int, timeout: dict) -> dict:
    """For a worker torchrun restarted: its env:// store with this attempt's own key prefix.
    torchrun keeps one store across restarts and the process group's keys name no attempt, so
    a restarted rank could read the address a dead peer published in an earlier attempt (gloo:
    "connectFullMesh failed ... Connection refused"; tests/test_distributed.py). Nothing at
    the first start: init_process_group's own env:// rendezvous, unchanged."""
    attempt = restart_count()
    if not attempt:
        return {}
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, **timeout))
    return {"store": dist.PrefixStore(f"grailcore_attempt_{attempt}", store), "rank": rank, "world_size": world_size}


class CollectiveFailure(RuntimeError):
    """A collective failed on this rank (it timed out, or a peer's connection closed)."""


_PEER_FAILURE_SIGNS = ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer",
                       "Broken pipe", "NCCL communicator was aborted")


def _is_collective_failure(err: BaseException) -> bool:
    backend_error = getattr(dist, "DistBackendError", ())
    return isinstance(err, backend_error) or (
        isinstance(err, RuntimeError) and any(sign in str(err) for sign in _PEER_FAILURE_SIGNS))


@contextmanager
def named_failures(where: Callable[[], str]) -> Iterator[None]:
    """Re-raise a collective's failure inside the block as a `CollectiveFailure` that names
    `where()` (e.g. "the update phase of step 3"): what a rank waited in when its peer died
    or hung, instead of a bare backend error, or a hang without a timeout."""
    try:
        yield
    except Exception as err:
        if isinstance(err, CollectiveFailure) or not _active() or not _is_collective_failure(err):
            raise
        limit = f"{_timeout_s:g} s (collective_timeout_s)" if _timeout_s is not None else "torch's default timeout"
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise CollectiveFailure(
            f"rank {get_rank()}: a collective failed in {where()}: a peer rank died or did not reach it "
            f"within {limit} ({first}). The other ranks' logs say where they were; the last checkpoint "
            "is intact, resume with --resume.") from err


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (`--max-restarts`; 0 at the
    first start and without torchrun): launcher state, like RANK, not a setting."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank; still right after vLLM's shutdown has destroyed the group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def get_world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main() -> bool:
    """True on rank 0 (the one that logs and writes files)."""
    return get_rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def collective_device() -> torch.device:
    """The device the default group moves tensors on: nccl only CUDA ones, gloo only CPU ones."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
_MAX_DIMS = 8


def all_reduce(tensor: torch.Tensor, op: Literal["sum", "max"] = "sum") -> torch.Tensor:
    """`tensor` reduced over ranks (a new tensor on `tensor`'s device; `tensor` is unchanged).
    Every tensor collective of the trainer goes through this module, which moves it to the
    group's device first: a CPU tensor on an nccl group fails, a CUDA one on gloo too."""
    if not _active():
        return tensor.clone()
    moved = tensor.to(collective_device(), copy=True)
    dist.all_reduce(moved, op=_REDUCE_OPS[op])
    return moved.to(tensor.device)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order, on `tensor`'s device.
    Every rank must pass the same shape (checked first: a mismatch would garble the result)."""
    if not _active():
        return tensor.clone()
    device = collective_device()
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"all_gather: at most {_MAX_DIMS} dims, got shape {tuple(tensor.shape)}")
    shape = torch.full((_MAX_DIMS + 1,), -1, dtype=torch.int64, device=device)  # [ndim, *shape, -1...]
    shape[0] = tensor.dim()
    shape[1:tensor.dim() + 1] = torch.tensor(tensor.shape, dtype=torch.int64)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size())]
    dist.all_gather(shapes, shape)
    if any(not torch.equal(s, shape) for s in shapes):
        raise ValueError(f"all_gather: rank {dist.get_rank()} has shape {tuple(tensor.shape)}, but the ranks' "
                         f"[ndim, *shape] are {[s[s >= 0].tolist() for s in shapes]}; every rank must gather "
                         "the same shape")
    moved = tensor.to(device)
    parts = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, moved)
    return torch.cat(parts).to(tensor.device)


def all_gather_flat(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """[world * n]: every rank's 1-D `tensor` [n] in rank order, through ONE
    all_gather_into_tensor on `group` (default: the world), on the group's device and back.
    Every rank must pass the same n (the caller's layout guarantees it; nothing checks)."""
    if not _active():
        return tensor.clone()
    moved = tensor.to(collective_device())
    out = torch.empty(dist.get_world_size(group) * moved.numel(), dtype=moved.dtype, device=moved.device)
    dist.all_gather_into_tensor(out, moved, group=group)
    return out.to(tensor.device)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite `tensor` in place with rank `src`'s (moved to the group's device and back)."""
    if not _active():
        return
    moved = tensor.to(collective_device(), copy=True)
    dist.broadcast(moved, src=src)
    tensor.copy_(moved)


def all_reduce_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Mean of each metric over ranks. Every rank must pass the same keys (checked)."""
    keys = sorted(metrics)
    if not _active():
        return {k: float(metrics[k]) for k in keys}
    # Summing mismatched key lists would silently mix metrics, so compare a fingerprint first.
    fingerprint = torch.tensor([len(keys), zlib.crc32("\0".join(keys).encode())], dtype=torch.int64)
    gathered = all_gather(fingerprint).view(-1, 2)
    if any(not torch.equal(g, fingerprint) for g in gathered):
        raise ValueError(
            f"all_reduce_mean: rank {dist.get_rank()} has metric keys {keys}, but other ranks "
            "have different keys; every rank must log the same metric names each step"
        )
    values = all_reduce(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist()))


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` from rank `src` on every rank (pickled; for small objects, not tensors)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj`, indexed by rank (pickled; for small objects)."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_rank0(what: str, fn: Callable[[], T], error: type[Exception] = RuntimeError) -> T:
    """`fn()` on rank 0, its result broadcast; if it fails every rank raises (none waits
    forever): rank 0 the original exception, the others `error("rank 0 failed to <what>: ...")`."""
    result, failure = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other ranks
            failure = e
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    result, message = broadcast_object((result, message))
    if failure is not None:
        raise failure
    if message is not None:
        raise error(f"rank 0 failed to {what}: {message}")
    return result


def shutdown() -> None:
    """Destroy the default group if it still exists (vLLM's engine shutdown may have done it)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_worker() -> None:
    """The clean end of a torchrun worker script that finished its collectives: wait for
    every rank (no rank tears the group down while a peer's gloo work is in flight), destroy
    the group, then leave as `exit_finished_worker` does. A no-op exit in one process."""
    barrier()
    shutdown()
    exit_finished_worker()


def exit_finished_worker() -> None:
    """End a torchrun worker whose run finished cleanly without Python's interpreter
    finalization; a no-op in a single process. Call it last in a `__main__` block, after
    `shutdown()`.

    Twice in CI a 2-rank run that had finished and written everything aborted at exit with
    "terminate called without an active exception" (not reproduced in 40 direct runs). The
    likely cause: objects owning gloo resources (the process group behind FSDP's device
    mesh, pending work) outlive `destroy_process_group` through reference cycles and are
    freed during interpreter finalization, when a C++ destructor can no longer run safely.
    So every cycle is collected while the interpreter is alive, output is flushed, and the
    process leaves with `os._exit(0)`; checkpoints, metrics and TensorBoard files were
    closed by the run itself."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    gc.collect()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
