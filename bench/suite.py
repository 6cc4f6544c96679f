"""The per-commit performance record: the step, loss and sync benchmarks at small sizes (a few
minutes on 2 cores), then ONE JSON line appended to bench/results/history.jsonl with the
commit, the machine (CPU model, cores, SIMD flags, versions; no host name) and the ratios
each benchmark measured side by side. A regression shows as a changed ratio on the same kind
of machine; absolute seconds are kept but move with the machine's load.

    python -m bench.suite                      # all three, appends one line
    python -m bench.suite --only sync loss     # a subset

Each benchmark runs in its own process (vLLM engines and process groups do not outlive their
process cleanly) with this checkout's code, writing its CSV/summary to a temporary directory.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import machine

ROOT = Path(__file__).resolve().parents[1]
HISTORY = ROOT / "bench" / "results" / "history.jsonl"
BENCHES = ("step", "loss", "sync")


def _run(module: str, args: list[str], tmp: Path) -> list[str]:
    """Run `python -m module args` on this checkout's code; returns the command line, with the
    temporary directory written as $TMP (no path of this machine in the record)."""
    command = [sys.executable, "-m", module, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return ["python", "-m", module, *(arg.replace(str(tmp), "$TMP") for arg in args)]


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def step_bench(tmp: Path, args) -> dict:
    """grailcore (vLLM rollouts, prefix-shared training) beside TRL without gradient checkpointing
    (its fastest configuration that runs here), 1 warm-up + `--steps` steps, short completions."""
    summary = tmp / "step.json"
    command = _run("bench.train_step", ["--steps", str(args.steps), "--warmup", "1", "--max-new", str(args.max_new),
                                        "--engine", "vllm", "--variants", "shared", "--trl-configs", "no_gc",
                                        "--csv", str(tmp / "step.csv"), "--summary-json", str(summary)], tmp)
    result = json.loads(summary.read_text())
    rows = {r["system"]: r for r in result["rows"]}
    ours, trl = rows["shared"], rows["trl_no_gc"]
    return {"command": " ".join(command), "engine_dtype": ours["engine_dtype"],
            "step_vs_trl": ours["step_vs_trl"], "training_vs_trl": ours["training_vs_trl"],
            "sync_share": ours["sync_share"], "step_s": ours["step_s"], "trl_step_s": trl["step_s"]}


def _help(module: str) -> str:
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    return result.stdout


def loss_bench(tmp: Path, args) -> dict:
    """bench/bench_grpo_loss.py at one small shape: each method's *_vs_naive ratios. With the
    process-per-method bench (`--rounds`): naive, grailcore, Liger (not compiled: torch.compile
    alone takes minutes on CPU) and torch's linear_cross_entropy; otherwise every method it has."""
    out = tmp / "loss.csv"
    shape = ["--batch", "4", "--seq", "256", "--hidden", "576", "--vocab", "49152", "--csv", str(out)]
    if "--rounds" in _help("bench.bench_grpo_loss"):
        repeat = ["--rounds", "1", "--methods", "naive", "grailcore", "liger", "torch_lce"]
    else:
        repeat = ["--warmup", "1", "--repeats", "2"]
    command = _run("bench.bench_grpo_loss", shape + repeat, tmp)
    methods = {}
    for row in _rows(out):
        methods[row["method"]] = {k: _number(v) for k, v in row.items() if k.endswith("_vs_naive") and v != ""}
    return {"command": " ".join(command), "shape": "4 x 256 tokens, H=576, V=49152, fp32", "methods": methods}


def sync_bench(tmp: Path, args) -> dict:
    """Weight sync methods on one process: seconds and ratios to the per-tensor full push."""
    out = tmp / "sync.csv"
    command = _run("bench.bench_sync", ["--models", args.sync_model, "--repeats", "3", "--bucket-mib", "8",
                                        "--csv", str(out)], tmp)
    row = {k: _number(v) for k, v in _rows(out)[0].items()}
    keep = [k for k in row if k.endswith(("_s", "_vs_per_tensor", "_tensors")) and not k.endswith("cpu_s")]
    return {"command": " ".join(command), "model": args.sync_model, **{k: row[k] for k in keep}}


def commit() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    changed = [line for line in git("status", "--porcelain").splitlines() if not line.endswith(HISTORY.name)]
    return {"commit": git("rev-parse", "--short=12", "HEAD"), "dirty": bool(changed)}


def record(results: dict, began: float, code: dict) -> dict:
    """The history line: when, which code (`code`: commit() at the start), which machine, what
    was measured."""
    return {"date": time.strftime("%Y-%m-%d %H:%M", time.localtime(began)), **code,
            "machine": machine.describe(), "load_avg_1m_start": results.pop("_load"),
            "wall_s": round(time.time() - began), **results}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=BENCHES, default=list(BENCHES))
    parser.add_argument("--steps", type=int, default=1, help="timed steps of the step benchmark")
    parser.add_argument("--max-new", type=int, default=16, help="completion tokens in the step benchmark")
    parser.add_argument("--sync-model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default=str(HISTORY))
    args = parser.parse_args(argv)
    began, code = time.time(), commit()  # the code that runs, even if HEAD moves meanwhile
    results = {"_load": os.getloadavg()[0]}
    runners = {"step": step_bench, "loss": loss_bench, "sync": sync_bench}
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        for name in args.only:
            results[name] = runners[name](Path(tmp), args)
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    line = record(results, began, code)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(line) + "\n")
    print(f"appended to {out}: commit {line['commit']}{' (dirty)' if line['dirty'] else ''}, {line['wall_s']} s")
    return line


if __name__ == "__main__":
    main()
