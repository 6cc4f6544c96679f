import io
import json
import re
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grailcore.metrics_log import METRICS_FILE, MetricsLogger, Progress, StepTimer, read_metrics


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_log_writes_flushed_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path, tensorboard=True, enabled=True)
    before = time.time()
    logger.log(1, {"loss": 0.5, "reward/mean": torch.tensor(2.0)})
    # Flushed on every call: readable while the logger is still open (a crash loses nothing).
    records = read_metrics(tmp_path)
    assert [(r["step"], r["loss"], r["reward/mean"]) for r in records] == [(1, 0.5, 2.0)]
    assert before <= records[0]["wall_time"] <= time.time()
    logger.log(2, {"loss": 0.25, "reward/mean": 3.0})
    logger.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert scalars(tmp_path, "loss") == [(1, 0.5), (2, 0.25)]
    assert scalars(tmp_path, "reward/mean") == [(1, 2.0), (2, 3.0)]


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path / "run", tensorboard=True, enabled=False)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "run").exists()


def test_bad_metrics_are_rejected(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, enabled=True) as logger:
        with pytest.raises(TypeError, match="metric 'text' at step 3"):
            logger.log(3, {"text": "hello"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(3, {"step": 1.0})
    assert read_metrics(tmp_path) == []


def test_resume_drops_records_after_the_resumed_step(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True, enabled=True) as logger:
        for step in range(1, 5):
            logger.log(step, {"loss": float(step)})
    with (tmp_path / METRICS_FILE).open("a") as f:
        f.write('{"step": 5, "lo')  # the crash tore the last line

    with pytest.warns(UserWarning, match="torn last line"):
        logger = MetricsLogger(tmp_path, tensorboard=True, enabled=True, resume_step=2)
    assert logger.dropped_records == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    logger.log(3, {"loss": 30.0})
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    # TensorBoard hides the abandoned steps 3 and 4 of the first run.
    assert scalars(tmp_path, "loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_fresh_start_replaces_an_earlier_runs_records(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, enabled=True) as logger:
        logger.log(1, {"loss": 1.0})
    with pytest.warns(UserWarning, match="replacing 1 records"):
        MetricsLogger(tmp_path, tensorboard=False, enabled=True).close()
    assert read_metrics(tmp_path) == []


def test_read_metrics_rejects_a_corrupt_middle_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(tmp_path)


def test_step_timer_sums_nested_phases(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 4.0, 4.5, 5.0, 7.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    timer = StepTimer()  # made at 0
    with timer("step"):  # 1 -> 7
        with timer("generation"):  # 2 -> 4
            pass
        with timer("generation"):  # 4.5 -> 5: a phase used twice adds up
            pass
    assert timer.as_metrics() == {"time/step": 6.0, "time/generation": 2.5}


def test_step_timer_step_defaults_to_time_since_creation(monkeypatch):
    clock = iter([10.0, 11.0, 11.25, 13.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    timer = StepTimer()  # made at 10
    with timer("backward"):  # 11 -> 11.25
        pass
    assert timer.as_metrics() == {"time/backward": 0.25, "time/step": 3.0}  # read at 13


def test_progress_shows_step_postfix_and_eta():
    stream = io.StringIO()
    progress = Progress(total_steps=10, start_step=4, enabled=True, stream=stream)
    progress.update(5, loss=0.5)
    progress.update(8, loss=0.25)  # steps are absolute, not increments
    progress.close()
    last = stream.getvalue().split("\r")[-1]
    assert "8/10" in last and "loss=0.25" in last
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", last)  # elapsed<remaining: a known ETA

    silent = io.StringIO()
    quiet = Progress(total_steps=10, start_step=0, enabled=False, stream=silent)
    quiet.update(3, loss=1.0)
    quiet.close()
    assert silent.getvalue() == ""


def test_jsonl_lines_are_plain_json(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False, enabled=True) as logger:
        logger.log(7, {"a": 1})
    line = (tmp_path / METRICS_FILE).read_text().splitlines()[0]
    assert json.loads(line)["a"] == 1.0 and set(json.loads(line)) == {"step", "wall_time", "a"}
