"""Bad input seen from the entry point, `grailcore.train.main([...])`: each one stops
before the first step with a message naming what was wrong and what to do, or, where
the user asked for skipping, is counted and reported. The unit tests of each check live
beside its module (see docs/reliability.md); these prove the entry point surfaces them."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types

import pytest
from reliability_helpers import tiny_config, write_preset

from grailcore.config import ConfigError
from grailcore.data.schema import SchemaError, decision_to_dict
from grailcore.data.synth import generate_study
from grailcore.model import ModelNotFoundError, resolve_model_path
from grailcore.train import main


@pytest.fixture
def preset(tmp_path):
    return str(write_preset(tmp_path, tmp_path / "run", max_steps=1))


@pytest.fixture
def bad_rows_file(tmp_path):
    rows = [decision_to_dict(d) for d in generate_study("gun_control", 30, seed=2)][:8]
    rows[1]["gold_index"] = 0      # out of range
    rows[4]["slate"] = []          # empty slate
    del rows[6]["current"]         # missing field
    lines = [json.dumps(r) for r in rows[:3]] + ["{not json"] + [json.dumps(r) for r in rows[3:]]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_malformed_rows_stop_before_training_naming_file_and_line(preset, bad_rows_file, tmp_path):
    with pytest.raises(SchemaError, match=rf"{bad_rows_file}:2: field 'gold_index'.*skip_bad_rows"):
        main(["--cfg", preset, "--data.train-path", bad_rows_file, "--data.eval-path", bad_rows_file])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_skip_bad_rows_counts_and_reports_each_skipped_row(bad_rows_file, tmp_path, caplog):
    from grailcore.build import build_trainer

    cfg = tiny_config(tmp_path / "run", max_steps=1)
    cfg = cfg.__class__(**{**cfg.__dict__, "data": cfg.data.__class__(
        **{**cfg.data.__dict__, "train_path": bad_rows_file, "eval_path": bad_rows_file, "skip_bad_rows": True})})
    with caplog.at_level(logging.WARNING, logger="grailcore.build"):
        trainer = build_trainer(cfg)
    trainer.close()
    assert len(trainer.data.train) == 5
    reported = [r.getMessage() for r in caplog.records if "bad rows" in r.getMessage()]
    assert reported and "skipped 4 bad rows" in reported[0], reported
    assert f"{bad_rows_file}:2" in reported[0] and "not valid JSON" in reported[0]


def test_prompts_longer_than_the_limit_stop_or_are_skipped_when_asked(preset):
    with pytest.raises(ConfigError, match=r"exceed rollout.max_prompt_tokens=16.*data.skip_bad_rows"):
        main(["--cfg", preset, "--rollout.max-prompt-tokens", "16"])
    # Skipping every prompt leaves nothing to train on: still an error, not an empty run.
    with pytest.raises(ConfigError, match="no usable training examples"):
        main(["--cfg", preset, "--rollout.max-prompt-tokens", "16", "--data.skip-bad-rows"])


def test_unknown_reward_name_lists_the_available_ones(preset):
    with pytest.raises(ConfigError, match=r"unknown reward\(s\) \['no_such_reward'\]; available"):
        main(["--cfg", preset, "--rewards.names", "no_such_reward", "--rewards.weights", "1.0"])


def test_unknown_config_field_is_named(preset, capsys):
    with pytest.raises(SystemExit) as err:  # tyro's usage error: exit 2, the option named
        main(["--cfg", preset, "--optim.no-such-field", "1"])
    assert err.value.code == 2
    assert "--optim.no-such-field" in capsys.readouterr().err


def test_missing_model_dir_says_nothing_is_downloaded(preset, tmp_path):
    with pytest.raises(ModelNotFoundError, match="nothing is downloaded"):
        main(["--cfg", preset, "--model.name-or-path", str(tmp_path / "no_model")])


def test_tokenizer_without_chat_template_says_what_to_do(preset, tmp_path):
    model_dir = tmp_path / "no_template"
    shutil.copytree(resolve_model_path("micro-llama"), model_dir)
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="has no chat template"):
        main(["--cfg", preset, "--model.name-or-path", str(model_dir)])


def test_resume_without_a_checkpoint_says_how_to_start_fresh(preset):
    with pytest.raises(ConfigError, match="no checkpoint in .*drop --resume"):
        main(["--cfg", preset, "--resume"])


def test_vllm_engine_failing_to_start_stops_clearly_or_falls_back_to_hf(tmp_path, monkeypatch):
    import dataclasses

    from grailcore.build import build_trainer
    from grailcore.rollout.hf import HFEngine

    class BrokenVLLM:
        @staticmethod
        def create(*args, **kwargs):
            raise RuntimeError("CUDA out of memory while starting the engine")

    # Stands in for the real module whether or not vllm is installed here.
    monkeypatch.setitem(sys.modules, "grailcore.rollout.vllm_engine",
                        types.SimpleNamespace(VLLMEngine=BrokenVLLM))
    cfg = tiny_config(tmp_path / "run", max_steps=1)
    vllm = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, engine="vllm"))
    with pytest.raises(RuntimeError, match=r"vLLM engine failed to start \(CUDA out of memory.*fallback_to_hf"):
        build_trainer(vllm)
    fallback = dataclasses.replace(vllm, rollout=dataclasses.replace(vllm.rollout, fallback_to_hf=True))
    trainer = build_trainer(fallback)
    trainer.close()
    assert isinstance(trainer.rollout.engine, HFEngine)
