"""Benchmark harness: wall time and peak extra memory of callables, run round-robin,
with results written to CSV. CPU memory is the kernel's peak-RSS mark; GPU memory is
torch.cuda.max_memory_allocated."""

import csv
import ctypes
import dataclasses
import gc
import pathlib
import re
import statistics
import time

import torch


@dataclasses.dataclass
class Measurement:
    """Every timed call's wall and process-CPU seconds, and the largest extra memory any
    call needed. CPU seconds (all threads) barely move when other processes compete for
    the cores, where wall seconds do; on an idle machine wall ~ CPU / threads."""

    seconds: list = dataclasses.field(default_factory=list)
    cpu_seconds: list = dataclasses.field(default_factory=list)
    peak_mib: float = 0.0

    @property
    def median_s(self):
        return statistics.median(self.seconds)

    @property
    def median_cpu_s(self):
        return statistics.median(self.cpu_seconds)


def _proc_status_mib(field):
    status = pathlib.Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


class _CpuPeak:
    """Peak RSS above the RSS at `start()`, from the kernel's high-water mark (VmHWM),
    which catches every page where a sampling thread could miss short peaks."""

    def __init__(self):
        self.libc = ctypes.CDLL("libc.so.6")

    def start(self):
        gc.collect()
        self.libc.malloc_trim(0)  # hand freed heap back so earlier runs don't hide this one's peak
        try:
            pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        except OSError as error:
            raise RuntimeError("CPU peak memory needs a writable /proc/self/clear_refs (Linux >= 4.0)") from error
        self.base_mib = _proc_status_mib("VmRSS")

    def stop(self):
        return _proc_status_mib("VmHWM") - self.base_mib


class _CudaPeak:
    def start(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base_bytes = torch.cuda.memory_allocated()

    def stop(self):
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.base_bytes) / 2**20


def measure_round_robin(calls, *, device, warmup=1, repeats=3, after_each=None):
    """Time each callable in `calls` ({name: fn}) `repeats` times after `warmup` untimed
    calls, alternating between them so that load from other processes on a shared
    machine hits all of them alike. `after_each(name)` runs untimed after every call
    (e.g. to drop .grad). Returns {name: Measurement}."""
    peak = _CudaPeak() if torch.device(device).type == "cuda" else _CpuPeak()
    results = {name: Measurement() for name in calls}
    for step in range(warmup + repeats):
        for name, fn in calls.items():
            peak.start()
            began, began_cpu = time.perf_counter(), time.process_time()
            fn()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            elapsed, elapsed_cpu = time.perf_counter() - began, time.process_time() - began_cpu
            peak_mib = peak.stop()
            if after_each is not None:
                after_each(name)
            if step >= warmup:
                results[name].seconds.append(elapsed)
                results[name].cpu_seconds.append(elapsed_cpu)
                results[name].peak_mib = max(results[name].peak_mib, peak_mib)
    return results


def write_csv(path, rows):
    """Append `rows` (dicts with the same keys) to `path`, writing a header if it is new. When
    the file's columns differ (a benchmark gained a column), it is rewritten with the union
    of both, older rows left blank in the new columns."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0])
    old: list[dict] | None = []  # None: same columns, append; a list: rewrite with these rows first
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames == fields:
                old = None
            else:
                old = list(reader)
                fields = list(reader.fieldnames) + [f for f in fields if f not in reader.fieldnames]
    with path.open("a" if old is None else "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        if old is not None:
            writer.writeheader()
            writer.writerows(old)
        writer.writerows(rows)


def markdown_rows(rows, columns, header):
    """`rows` as markdown table lines over `columns`, led by the header lines if `header`."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] if header else []
    return "\n".join(lines + ["| " + " | ".join(str(row[column]) for column in columns) + " |" for row in rows])
