"""Shared helpers for the fault-injection suite: a tiny CPU preset and a way to launch
`python -m grailcore.train` as a real subprocess and watch its progress."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PRESET = '''
from grailcore.config import *
config = Config(
    run_dir={run_dir!r}, seed=1, deterministic=True,
    model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=False),
    data=DataConfig(train_path="synthetic:gun_control", synthetic_n=100, max_history=1),
    rollout=RolloutConfig(engine="hf", max_prompt_tokens=2048, max_completion_tokens=8),
    grpo=GRPOConfig(prompts_per_step=2, group_size=2),
    optim=OptimConfig(lr=1e-3, max_steps={max_steps}, micro_batch_size=4),
    rewards=RewardsConfig(names=("length",), weights=(1.0,), length_target=4),
    eval=EvalConfig(every=0, max_samples=2),
    checkpoint=CheckpointConfig(every=1, keep=2, export_final=False),
    logging=LoggingConfig(tensorboard=False, progress=False, log_samples=0),
)
'''


def write_preset(directory: Path, run_dir: Path, max_steps: int) -> Path:
    preset = directory / f"preset_{run_dir.name}.py"
    preset.write_text(PRESET.format(run_dir=str(run_dir), max_steps=max_steps))
    return preset


def start_train(preset: Path, *extra: str, log_path: Path) -> subprocess.Popen:
    """`python -m grailcore.train --cfg preset ...` in the background, output to log_path."""
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "grailcore.train", "--cfg", str(preset), *extra],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)


def run_train(preset: Path, *extra: str, log_path: Path, timeout: float = 300) -> str:
    proc = start_train(preset, *extra, log_path=log_path)
    rc = proc.wait(timeout=timeout)
    out = log_path.read_text()
    assert rc == 0, f"exit {rc}\n{out[-4000:]}"
    return out


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line being written right now
            continue
        if "loss" in row:
            steps.append(row["step"])
    return steps


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, log_path: Path,
                  timeout: float = 240) -> None:
    """Poll metrics.jsonl until `step` is logged; fail with the run's output if it exits."""
    deadline = time.monotonic() + timeout
    while step not in logged_steps(run_dir):
        if proc.poll() is not None:
            pytest.fail(f"run exited ({proc.returncode}) before step {step}\n{log_path.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"step {step} not logged within {timeout} s\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)  # polling a file another process writes; there is no event to wait on


def final_weights(run_dir: Path) -> dict:
    from grailcore.checkpoint import read_model_weights

    root = run_dir / "checkpoints"
    latest = (root / "latest").read_text().strip()
    return read_model_weights(root / latest)


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().strip().removeprefix("step_"))


def tiny_config(run_dir: Path, max_steps: int, **overrides):
    """The PRESET as an in-process Config, with top-level fields replaced."""
    import dataclasses

    namespace: dict = {}
    exec(PRESET.format(run_dir=str(run_dir), max_steps=max_steps), namespace)
    return dataclasses.replace(namespace["config"], **overrides)


def run_in_process(cfg, mode: str = "grpo") -> dict:
    """Build the trainer of `mode` ("grpo" or "sft"), run it, close its engine."""
    from grailcore.build import build_trainer

    trainer = build_trainer(cfg, mode)
    try:
        return trainer.run()
    finally:
        trainer.close()
