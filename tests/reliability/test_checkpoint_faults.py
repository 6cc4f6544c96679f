"""Checkpoint faults seen by a whole run: a corrupt `latest` is skipped at --resume (with a
warning naming it) in favour of the previous good checkpoint; a full disk during a save
stops the run with a clear error and leaves the previous checkpoint as `latest`."""

from __future__ import annotations

import dataclasses
import errno

import pytest
from reliability_helpers import latest_step, logged_steps, run_in_process, tiny_config

import grailcore.checkpoint
from grailcore.checkpoint import CheckpointError, CheckpointWarning
from grailcore.config import CheckpointConfig


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(tmp_path):
    run_dir = tmp_path / "run"
    run_in_process(tiny_config(run_dir, max_steps=2))
    weights = run_dir / "checkpoints" / "step_00000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, wrong bytes: only the checksum can tell
    weights.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=r"step_00000002 is unusable .*sha256"):
        run_in_process(tiny_config(run_dir, max_steps=3, resume=True))
    assert logged_steps(run_dir) == [1, 2, 3], "resume did not continue from step 1"
    assert latest_step(run_dir) == 3


def test_disk_full_while_checkpointing_stops_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save, saves = grailcore.checkpoint._save_model, []

    def fill_disk_on_second_save(*args, **kwargs):
        saves.append(None)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(grailcore.checkpoint, "_save_model", fill_disk_on_second_save)
    cfg = tiny_config(run_dir, max_steps=3, checkpoint=CheckpointConfig(every=1, keep=2, export_final=False))
    with pytest.raises(CheckpointError, match=r"ENOSPC.*step_00000001 and `latest` are intact.*Free disk space"):
        run_in_process(cfg)
    assert latest_step(run_dir) == 1
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the partial write was left behind"
    monkeypatch.setattr(grailcore.checkpoint, "_save_model", real_save)
    run_in_process(dataclasses.replace(cfg, resume=True))  # space freed: the run goes on
    assert logged_steps(run_dir) == [1, 2, 3]
