"""Checkpoint faults seen by a whole run: a corrupt `latest` is skipped at --resume (with a
warning naming it) in favour of the previous good checkpoint; a full disk during a save
stops the run with a clear error and leaves the previous checkpoint as `latest`."""

from __future__ import annotations

import contextlib
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
    weights = run_dir / "checkpoints" / "step_00000002" / "state" / "__0_0.distcp"  # the one rank's shard
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, wrong bytes: only the checksum can tell
    weights.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning, match=r"step_00000002 is unusable .*sha256"):
        run_in_process(tiny_config(run_dir, max_steps=3, resume=True))
    assert logged_steps(run_dir) == [1, 2, 3], "resume did not continue from step 1"
    assert latest_step(run_dir) == 3


def test_disk_full_while_checkpointing_stops_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystem

    run_dir = tmp_path / "run"
    real_create = FileSystem.create_stream

    @contextlib.contextmanager
    def fill_disk_in_step_2(self, path, mode):
        with real_create(self, path, mode) as stream:
            if "step_00000002" in str(path) and "w" in mode:  # a shard of the second checkpoint
                stream.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
            yield stream

    monkeypatch.setattr(FileSystem, "create_stream", fill_disk_in_step_2)
    cfg = tiny_config(run_dir, max_steps=3, checkpoint=CheckpointConfig(every=1, keep=2, export_final=False))
    with pytest.raises(CheckpointError, match=r"ENOSPC.*step_00000001 and `latest` are intact.*Free disk space"):
        run_in_process(cfg)
    assert latest_step(run_dir) == 1
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), "the partial write was left behind"
    monkeypatch.undo()
    run_in_process(dataclasses.replace(cfg, resume=True))  # space freed: the run goes on
    assert logged_steps(run_dir) == [1, 2, 3]
