"""Non-finite loss or gradients: a bad step is skipped (no optimizer update) and counted in
`grpo/skipped_updates`; K bad steps in a row stop the run with BadStepsError while the
last good checkpoint stays on disk."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from reliability_helpers import latest_step, run_in_process, tiny_config

import grailcore.optimize
from grailcore.checkpoint import read_model_weights
from grailcore.config import CheckpointConfig, OptimConfig
from grailcore.optimize import BadStepsError


def _poison_loss(monkeypatch, bad_steps: dict[int, float]) -> None:
    """Make each step's micro-batch loss `bad_steps[step]` (nan/inf) times itself at those
    1-based steps: the backward pass then fills the gradients with non-finite values too."""
    real, calls = grailcore.optimize.micro_batch_loss, []

    def faulty(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(None)
        step = len(calls)  # one micro-batch per step in this config
        if step in bad_steps:
            return dataclasses.replace(out, loss=out.loss * bad_steps[step])
        return out

    monkeypatch.setattr(grailcore.optimize, "micro_batch_loss", faulty)


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def _weights(run_dir, step: int) -> dict:
    return read_model_weights(run_dir / "checkpoints" / f"step_{step:08d}")


@pytest.mark.slow
def test_bad_steps_are_skipped_counted_then_stop_the_run_keeping_a_good_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, max_steps=6, checkpoint=CheckpointConfig(every=1, keep=5, export_final=False))
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_consecutive_bad_steps=2))
    # Step 2 NaN (skipped; good step 3 resets the count), steps 4 (inf) and 5 (NaN): stop at 5.
    _poison_loss(monkeypatch, {2: float("nan"), 4: float("inf"), 5: float("nan")})
    with pytest.raises(BadStepsError, match=r"2 consecutive steps .* \(last at step 5\).*last good checkpoint"):
        run_in_process(cfg)
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["grpo/skipped_updates"] for r in rows] == [0.0, 1.0, 0.0, 1.0, 1.0]
    assert latest_step(run_dir) == 4, "the step that raised must not be checkpointed"
    for skipped, before in ((2, 1), (4, 3)):  # a skipped step leaves the weights untouched
        w_before, w_after = _weights(run_dir, before), _weights(run_dir, skipped)
        assert all(torch.equal(w_before[k], w_after[k]) for k in w_before), f"step {skipped} updated weights"
    w3, w1 = _weights(run_dir, 3), _weights(run_dir, 1)
    assert any(not torch.equal(w3[k], w1[k]) for k in w1), "good step 3 did not update: test proves nothing"
    assert all(torch.isfinite(v).all() for v in _weights(run_dir, 4).values())
