"""Multi-node launch: the SLURM script builds the right torchrun rendezvous from SLURM's own
variables, and torchrun's c10d rendezvous path runs a 2-rank dry run end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_train.sbatch"


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(0o755)


def test_sbatch_script_reads_only_slurm_variables():
    text = "\n".join(line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#"))
    names = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    environment = {n for n in names if n.isupper()}
    assert environment and all(n.startswith("SLURM_") for n in environment), environment
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_sbatch_script_builds_the_rendezvous(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"')
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp_path / "srun_args"}')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
           "SLURM_JOB_ID": "123456", "SLURM_NNODES": "2", "SLURM_SUBMIT_DIR": str(REPO)}
    proc = subprocess.run(["bash", str(SCRIPT), "configs/grail_gun.py", "--optim.lr", "1e-6"], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun_args").read_text().split("\n")[:-1]
    command = " ".join(args)
    assert "--nnodes 2 --nproc-per-node gpu --rdzv-id 123456 --rdzv-backend c10d" in command
    assert "--rdzv-endpoint gpu-node-07:32956" in command  # first node, port 29500 + job id % 10000
    assert args[-5:] == ["grailcore.train", "--cfg", "configs/grail_gun.py", "--optim.lr", "1e-6"]
    usage = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_torchrun_c10d_rendezvous_runs_a_two_rank_dry_run(tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
               "-m", "grailcore.train", "--run-dir", str(run_dir), "--model.name-or-path", "micro-llama",
               "--model.no-gradient-checkpointing", "--data.synthetic-n", "100", "--data.max-history", "1",
               "--data.max-train-samples", "8", "--rollout.max-prompt-tokens", "4096",
               "--rollout.max-completion-tokens", "8", "--grpo.prompts-per-step", "2", "--grpo.group-size", "2",
               "--eval.max-samples", "2", "--logging.no-tensorboard", "--dry-run"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    summary = json.loads((run_dir / "dry_run.json").read_text())
    assert summary["world_size"] == 2 and summary["weights_unchanged"]
    assert proc.stdout.count("=== dry run summary ===") == 1  # only rank 0 prints
