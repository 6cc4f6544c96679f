"""Optional tracking: setting checks, and W&B logging through a FAKE `wandb` module injected
via sys.modules (wandb is not installed here and tests must not touch the network).
`push_export` (Hub upload) is only checked through its argument validation."""

from __future__ import annotations

import dataclasses
import json
import sys
import types

import pytest

from grailcore.config import CheckpointConfig, Config, ConfigError, LoggingConfig
from grailcore.tracking import WANDB_ID_FILE, Loggers, build_logger, check_tracking


class FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, data))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.__spec__ = types.SimpleNamespace(name="wandb")  # find_spec reads sys.modules' spec
    module.runs = []

    def init(**kwargs):
        module.runs.append(FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def _cfg(tmp_path, **logging) -> Config:
    return Config(run_dir=str(tmp_path / "run"), logging=LoggingConfig(tensorboard=False, **logging))


def test_settings_that_cannot_work_fail_at_start(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match="needs the `wandb` package"):
        check_tracking(_cfg(tmp_path, wandb_project="grail"))
    with pytest.raises(ConfigError, match="wandb_entity is set without"):
        check_tracking(_cfg(tmp_path, wandb_entity="lab"))
    with pytest.raises(ConfigError, match="not a Hub repo id"):
        check_tracking(Config(checkpoint=CheckpointConfig(push_to_hub="just-a-name")))
    with pytest.raises(ConfigError, match="export_final=True"):
        check_tracking(Config(checkpoint=CheckpointConfig(push_to_hub="lab/grail-gun", export_final=False)))
    check_tracking(Config(checkpoint=CheckpointConfig(push_to_hub="lab/grail-gun.v2")))
    assert not isinstance(build_logger(_cfg(tmp_path), enabled=True), Loggers)  # local only by default


def test_wandb_gets_what_metrics_jsonl_gets(tmp_path, fake_wandb):
    cfg = _cfg(tmp_path, wandb_project="grail", wandb_entity="lab")
    with build_logger(cfg, enabled=True) as logger:
        logger.log(1, {"reward/total": 0.5})
        logger.log(2, {"reward/total": 0.75, "eval/accuracy": 0.3})
    run = fake_wandb.runs[0]
    assert run.logged == [(1, {"reward/total": 0.5}), (2, {"reward/total": 0.75, "eval/accuracy": 0.3})]
    assert run.finished and run.init_kwargs["project"] == "grail" and run.init_kwargs["entity"] == "lab"
    assert run.init_kwargs["config"]["logging"]["wandb_project"] == "grail"
    local = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in local] == [1, 2]
    # A resume continues the same W&B run; a fresh start gets a new one.
    first_id = run.init_kwargs["id"]
    build_logger(cfg, enabled=True, resume_step=2).close()
    assert fake_wandb.runs[1].init_kwargs["id"] == first_id
    with pytest.warns(UserWarning, match="replacing 2 records of an earlier run"):
        build_logger(cfg, enabled=True).close()
    assert fake_wandb.runs[2].init_kwargs["id"] != first_id
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text() == fake_wandb.runs[2].init_kwargs["id"]


def test_other_ranks_start_no_wandb_run(tmp_path, fake_wandb):
    build_logger(_cfg(tmp_path, wandb_project="grail"), enabled=False).log(1, {"loss": 1.0})
    assert fake_wandb.runs == []


def test_training_loop_logs_to_wandb(tmp_path, fake_wandb):
    from test_trainer import _run, tiny_config
    from grailcore.config import GRPOConfig, OptimConfig

    cfg = tiny_config(tmp_path / "run")
    cfg = dataclasses.replace(cfg, grpo=GRPOConfig(prompts_per_step=2, group_size=2),
                              optim=OptimConfig(lr=1e-3, max_steps=1, micro_batch_size=4),
                              rollout=dataclasses.replace(cfg.rollout, max_completion_tokens=4),
                              eval=dataclasses.replace(cfg.eval, max_samples=2),
                              checkpoint=CheckpointConfig(export_final=False),
                              logging=dataclasses.replace(cfg.logging, wandb_project="grail"))
    _run(cfg)
    run = fake_wandb.runs[0]
    assert run.finished and [step for step, _ in run.logged] == [1, 1]  # the step, then the final eval
    assert "reward/total" in run.logged[0][1] and "eval/accuracy" in run.logged[1][1]
