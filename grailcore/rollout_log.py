"""`logging.rollouts`: every completion of a GRPO step with its rewards and advantage, one
JSON line each, in RUN_DIR/rollouts/step_NNNNNN.rankR.jsonl (the step numbered as in
metrics.jsonl). A resumed run that repeats a step rewrites its file, so nothing is counted
twice. `experiments/rollout_positions.py` reads them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from grailcore.rewards.viewer import committed_answer
from grailcore.rollout.collect import Rollouts


def rollout_rows(step: int, rank: int, rollouts: Rollouts, advantages: torch.Tensor) -> list[dict]:
    """One row per completion: where it stands in the step, what it answered (viewer: the
    committed option, None for a dodge), each unweighted reward, the total and its advantage."""
    rows = []
    for i, (ex, completion) in enumerate(zip(rollouts.examples, rollouts.completions, strict=True)):
        row = {"step": step, "rank": rank, "index": i, "example_id": ex.example_id, "task": ex.task,
               "text": completion.text, "finish_reason": completion.finish_reason}
        if ex.task == "viewer":
            row.update(n_options=ex.n_options, gold_index=ex.gold_index, answer=committed_answer(ex, completion.text))
        row["rewards"] = {name: float(values[i]) for name, values in rollouts.rewards.per_reward.items()}
        row["total"] = float(rollouts.rewards.total[i])
        row["advantage"] = float(advantages[i])
        rows.append(row)
    return rows


def write_rollouts(run_dir: str | Path, step: int, rank: int, rollouts: Rollouts, advantages: torch.Tensor) -> Path:
    """Write this rank's rows of `step` atomically (a file is whole or absent); returns its path."""
    folder = Path(run_dir) / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:06d}.rank{rank}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rollout_rows(step, rank, rollouts, advantages))
    os.replace(tmp, path)
    return path
