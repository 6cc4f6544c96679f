"""Run metrics on rank 0: JSON lines (`run_dir/metrics.jsonl`) and TensorBoard scalars,
per-phase step timing (`StepTimer`) and a progress line with ETA (`Progress`)."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, TextIO

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("step", "wall_time")


def peak_memory_mib() -> dict[str, float]:
    """This process's peak resident memory (host; with vLLM on CPU it includes the engine's
    KV cache) and, on CUDA, the peak allocated by torch on this rank's device."""
    out = {"memory/peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["memory/peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _read_records(path: Path) -> tuple[list[dict], int]:
    """Records of a metrics.jsonl and how many unreadable lines were skipped.

    Only a torn last line (a crash mid-write) is skipped; a bad line elsewhere means the
    file is not ours or was edited, and raises naming the line.
    """
    if not path.exists():
        return [], 0
    lines = path.read_text().splitlines()
    records, skipped = [], 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number != len(lines):
                raise ValueError(f"{path}:{number}: not a JSON metrics record ({e})") from e
            skipped += 1
    return records, skipped


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every record of run_dir/metrics.jsonl in order ([] when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    records, skipped = _read_records(path)
    if skipped:
        warnings.warn(f"{path}: skipped a torn last line (crash while writing)", stacklevel=2)
    return records


class MetricsLogger:
    """Append-only metric log of one run; every method is a no-op unless `enabled` (rank 0).

    `resume_step`: the step a resumed run continues from; records (and TensorBoard events)
    after it belong to the abandoned timeline and are dropped so curves stay clean. None
    means a fresh run: a metrics.jsonl already in run_dir is replaced (with a warning).
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool, enabled: bool,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.dropped_records = 0
        """Records of run_dir/metrics.jsonl removed at start (after `resume_step`)."""
        self._file: TextIO | None = None
        self._writer = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_FILE
        self._truncate(path, resume_step)
        self._file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events at >= that step left by the run before the resume.
            purge_step = 0 if resume_step is None else resume_step + 1
            self._writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=purge_step)

    def _truncate(self, path: Path, resume_step: int | None) -> None:
        records, skipped = _read_records(path)
        keep = [] if resume_step is None else [r for r in records if r.get("step", 0) <= resume_step]
        self.dropped_records = len(records) - len(keep)
        if resume_step is None and records:
            warnings.warn(f"{path}: replacing {len(records)} records of an earlier run (fresh start)",
                          stacklevel=3)
        if skipped:
            warnings.warn(f"{path}: dropped a torn last line (crash while writing)", stacklevel=3)
        if self.dropped_records == 0 and not skipped:
            return
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, path)  # a crash mid-rewrite must not lose the kept records

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append {"step", "wall_time", **metrics} as one JSON line (flushed) and as scalars."""
        if not self.enabled:
            return
        if clash := [k for k in _RESERVED if k in metrics]:
            raise ValueError(f"metric names {clash} are reserved for the record itself; rename them")
        values = {}
        for name, value in metrics.items():
            try:
                values[name] = float(value)  # also 1-element tensors and numpy scalars
            except (TypeError, ValueError) as e:
                raise TypeError(f"metric {name!r} at step {step} is {value!r}, not a number") from e
        wall_time = time.time()
        self._file.write(json.dumps({"step": step, "wall_time": wall_time, **values}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, value, global_step=step, walltime=wall_time)
            self._writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StepTimer:
    """Wall seconds per phase of one step (make one per step): `with timer("generation"):`,
    then `as_metrics()`. Phases may nest (the loop wraps the whole step in `timer("step")`).

    CUDA work is asynchronous: a phase ends when its results are read on the host (`.item()`,
    `.tolist()`); time on its own, a GPU phase only covers the kernel launches.
    """

    def __init__(self) -> None:
        self._phases: dict[str, float] = {}
        self._created = time.perf_counter()
        self.failed_in: str | None = None
        """The innermost phase an exception left, if one did (to name it in the error)."""

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.failed_in = self.failed_in or phase
            raise
        finally:
            self._phases[phase] = self._phases.get(phase, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        """{"time/<phase>": seconds summed over its uses, ..., "time/step": seconds}; time/step
        is the "step" phase if it was timed, else the time since this timer was made."""
        out = {f"time/{phase}": seconds for phase, seconds in self._phases.items()}
        if "time/step" not in out:
            out["time/step"] = time.perf_counter() - self._created
        return out


class Progress:
    """One progress line with rate and ETA on rank 0 (`enabled`); silent elsewhere."""

    def __init__(self, total_steps: int, start_step: int = 0, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        # mininterval=0: steps take seconds, so every update is worth showing.
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, unit="step",
                         file=stream if stream is not None else sys.stderr, mininterval=0,
                         dynamic_ncols=True)

    def update(self, step: int, **postfix: float) -> None:
        """Move to `step` (absolute, not an increment) and show `postfix` (e.g. loss=0.31)."""
        if self._bar.disable:
            return
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
