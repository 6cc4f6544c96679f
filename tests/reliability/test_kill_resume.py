"""Process-level faults: `kill -9` at a random step then `--resume` must reproduce an
uninterrupted run bit for bit; SIGTERM must checkpoint and exit cleanly, also when it
arrives in the middle of generation."""

from __future__ import annotations

import os
import random
import signal
import threading

import pytest
import torch
from reliability_helpers import (final_weights, latest_step, logged_steps, run_train, start_train,
                                 tiny_config, wait_for_step, write_preset)

MAX_STEPS = 4
SIGTERM_GRACE_S = 120
"""A step takes a few seconds on an idle CPU; the run must finish it, checkpoint and exit."""


@pytest.mark.slow
def test_kill_9_at_a_random_step_then_resume_is_bit_identical(tmp_path):
    kill_after = random.Random().randint(2, MAX_STEPS - 1)  # step 1 may have no checkpoint yet
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"
    straight_preset = write_preset(tmp_path, straight_dir, MAX_STEPS)
    killed_preset = write_preset(tmp_path, killed_dir, MAX_STEPS)
    # Both runs at once: they share nothing, and CPU results do not depend on timing.
    straight = start_train(straight_preset, log_path=tmp_path / "straight.log")
    killed = start_train(killed_preset, log_path=tmp_path / "killed.log")
    try:
        wait_for_step(killed, killed_dir, kill_after, tmp_path / "killed.log")
        os.kill(killed.pid, signal.SIGKILL)
        assert killed.wait(timeout=30) == -signal.SIGKILL
        assert straight.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-4000:]
    finally:
        for proc in (straight, killed):
            if proc.poll() is None:
                proc.kill()
    # The kill may land before or after step `kill_after`'s checkpoint: resume from either.
    assert latest_step(killed_dir) in (kill_after - 1, kill_after)
    out = run_train(killed_preset, "--resume", log_path=tmp_path / "resumed.log")
    assert "resumed from" in out
    assert logged_steps(killed_dir) == list(range(1, MAX_STEPS + 1)), f"killed after step {kill_after}"
    w_straight, w_resumed = final_weights(straight_dir), final_weights(killed_dir)
    assert w_straight.keys() == w_resumed.keys()
    for name in w_straight:
        assert torch.equal(w_straight[name], w_resumed[name]), f"{name} differs (killed after step {kill_after})"


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    preset = write_preset(tmp_path, run_dir, max_steps=50)
    proc = start_train(preset, log_path=tmp_path / "run.log")
    try:
        wait_for_step(proc, run_dir, 1, tmp_path / "run.log")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=SIGTERM_GRACE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = (tmp_path / "run.log").read_text()
    assert rc == 0, out[-4000:]
    assert "stopped by signal" in out
    steps = logged_steps(run_dir)
    assert steps and steps[-1] < 50
    assert latest_step(run_dir) == steps[-1], "the step finished after SIGTERM was not checkpointed"


def test_sigterm_during_generation_finishes_the_step_and_checkpoints(tmp_path):
    """In-process: the engine signals its own process mid-generation, like a scheduler would."""
    from grailcore.build import build_trainer

    cfg = tiny_config(tmp_path / "run", max_steps=5)
    trainer = build_trainer(cfg)
    generate = trainer.rollout.engine.generate

    def generate_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered now, in the middle of this step
        return generate(*args, **kwargs)

    trainer.rollout.engine.generate = generate_then_sigterm
    before = signal.getsignal(signal.SIGTERM)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["steps"] == 1
    assert latest_step(tmp_path / "run") == 1
    assert signal.getsignal(signal.SIGTERM) is before, "run() left its signal handler installed"


def _flag_only(signum, frame) -> None:
    """A handler like an engine's: it notes a shutdown and returns (it raises nothing)."""


@pytest.mark.parametrize("prior", [signal.default_int_handler, _flag_only], ids=["default", "engine_like"])
def test_a_second_sigint_stops_at_once_without_a_checkpoint(tmp_path, prior):
    from grailcore.build import build_trainer

    outer = signal.signal(signal.SIGINT, prior)  # what run() finds installed, and must give back
    try:
        cfg = tiny_config(tmp_path / "run", max_steps=5)
        trainer = build_trainer(cfg)
        generate = trainer.rollout.engine.generate

        def generate_then_two_sigints(*args, **kwargs):
            # To this thread: a thread signalling itself gets the signal before pthread_kill
            # returns, so the first is handled before the second is sent.
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # "finish the step"
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # "no, now"
            return generate(*args, **kwargs)

        trainer.rollout.engine.generate = generate_then_two_sigints
        before = signal.getsignal(signal.SIGINT)
        try:
            with pytest.raises(KeyboardInterrupt):
                trainer.run()
        finally:
            trainer.close()
        assert not (tmp_path / "run" / "checkpoints").exists()
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, outer)
