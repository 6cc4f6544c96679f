"""Tests of grailcore/data/training_audit.py: the leak audit a run makes of its data before
it loads a model (raw and as trained), the stop on a LEAK, `--data.allow-leaks`, and that
synthetic data passes."""

from __future__ import annotations

import json

import pytest
import yaml
from gun_flaw_fixture import FIXTURE, fixture_text

from grailcore.config import DataConfig
from grailcore.data import load_examples
from grailcore.data.training_audit import (
    AS_TRAINED, AUDIT_FILE, RAW, DataLeakError, audit_for_training, check_training_data,
)
from grailcore.train import main

FLAW = str(FIXTURE)


def _dry_run_args(run_dir, model: str = "micro-llama") -> list[str]:
    return ["--run-dir", str(run_dir), "--model.name-or-path", model, "--rollout.engine", "hf",
            "--model.no-gradient-checkpointing", "--data.train-path", FLAW, "--data.eval-path", FLAW,
            "--rollout.max-prompt-tokens", "4096",
            "--rollout.max-completion-tokens", "4", "--grpo.prompts-per-step", "2", "--grpo.group-size", "2",
            "--eval.max-samples", "2", "--logging.no-tensorboard", "--dry-run"]


def test_the_committed_fixture_is_what_its_generator_writes():
    assert FIXTURE.read_text(encoding="utf-8") == fixture_text()


def _loaded(path: str, cfg: DataConfig) -> dict:
    return {"train": load_examples(path, cfg, "train"), "eval": load_examples(path, cfg, "train")}


def test_the_flaw_is_a_leak_in_the_raw_file_and_gone_as_trained():
    audit = audit_for_training(_loaded(FLAW, DataConfig()), DataConfig())
    assert audit.verdicts() == {"train": {RAW: "LEAK", AS_TRAINED: "OK"}, "eval": {RAW: "LEAK", AS_TRAINED: "OK"}}
    raw = audit.find("train", RAW)
    assert {rule for _, rule in raw.report.flagged} == {"always_last", "modal_position", "odd_rendering"}
    assert audit.dropped_fields["train"] == {"channel": 200, "comments": 200, "duration": 200}
    assert audit.stops and [a.stage for a in audit.leaks] == [RAW, RAW]
    message = audit.leak_message()
    assert "always_last accuracy 1.000 vs random 0.252" in message and "n=200" in message
    assert "train, raw (as the file gave them)" in message and "--data.allow-leaks" in message
    assert "re-rendering and shuffling removed it" in message
    # Without shuffling the gold stays last: a leak in the rows the model would see too.
    unshuffled = DataConfig(shuffle_options=False)
    still = audit_for_training(_loaded(FLAW, unshuffled), unshuffled)
    assert still.verdicts()["train"] == {RAW: "LEAK", AS_TRAINED: "LEAK"}
    assert "still a LEAK after re-rendering (options NOT shuffled" in still.leak_message()


def test_check_stops_on_a_leak_writes_the_verdicts_and_allow_leaks_lets_it_pass(tmp_path, caplog):
    with pytest.raises(DataLeakError, match="LEAK in the run's data"):
        check_training_data(_loaded(FLAW, DataConfig()), DataConfig(), tmp_path, rank0=True)
    written = json.loads((tmp_path / AUDIT_FILE).read_text())
    assert written["verdicts"]["train"] == {RAW: "LEAK", AS_TRAINED: "OK"} and not written["leak_overridden"]
    allowed = DataConfig(allow_leaks=True)
    with caplog.at_level("WARNING"):
        audit = check_training_data(_loaded(FLAW, allowed), allowed, tmp_path, rank0=True)
    assert audit.summary()["leak_overridden"] and "data.allow_leaks=True" in caplog.text
    assert json.loads((tmp_path / AUDIT_FILE).read_text())["leak_overridden"]


@pytest.mark.parametrize("issue", ["gun_control", "minimum_wage"])
def test_synthetic_data_passes_without_noise(issue, tmp_path, caplog):
    # The default size: every verdict OK, nothing logged above INFO.
    cfg = DataConfig(train_path=f"synthetic:{issue}")
    data = {"train": load_examples(cfg.train_path, cfg, "train"),
            "eval": load_examples(cfg.train_path, cfg, "validation")}
    with caplog.at_level("WARNING"):
        audit = check_training_data(data, cfg, tmp_path, rank0=True)
    assert {v for stages in audit.verdicts().values() for v in stages.values()} == {"OK"}, audit.lines()
    assert not caplog.records
    # Small sets, where chance has most room (train ~80 rows, eval ~10): never a LEAK, and a
    # SUSPECT (a warning, never a stop) rarely. Measured over 100 seeds x 2 issues x 4 audits:
    # 0 LEAK, 22 SUSPECT of 800 (2.8%).
    verdicts = []
    for seed in range(20):
        small = DataConfig(train_path=f"synthetic:{issue}", synthetic_n=100, seed=seed)
        data = {"train": load_examples(small.train_path, small, "train"),
                "eval": load_examples(small.train_path, small, "validation")}
        verdicts += [a.report.verdict for a in audit_for_training(data, small).audits]
    assert "LEAK" not in verdicts and verdicts.count("SUSPECT") <= 0.1 * len(verdicts), verdicts


def test_math_data_is_not_audited():
    cfg = DataConfig(task="math", train_path="synthetic:math", synthetic_n=50)
    audit = audit_for_training({"train": load_examples(cfg.train_path, cfg, "train")}, cfg)
    assert audit.audits == () and "no viewer rows" in audit.not_audited["train"] and not audit.stops


def test_dry_run_on_the_flaw_stops_before_any_model_is_loaded(tmp_path):
    # A model name that does not exist: reaching the model loader would raise ModelNotFoundError.
    with pytest.raises(DataLeakError) as err:
        main(_dry_run_args(tmp_path / "run", model="no-such-model-anywhere"))
    message = str(err.value)
    assert "train, raw (as the file gave them): all: always_last accuracy 1.000 vs random 0.252" in message
    assert "eval, raw (as the file gave them): all: always_last accuracy 1.000 vs random 0.252" in message
    assert "n=200" in message and "--data.allow-leaks" in message
    assert (tmp_path / "run" / AUDIT_FILE).is_file()
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "dry_run.json").exists()


def test_dry_run_with_allow_leaks_runs_and_says_so(tmp_path, capsys):
    summary = main(_dry_run_args(tmp_path / "run") + ["--data.allow-leaks"])
    out = capsys.readouterr().out
    assert summary["weights_unchanged"] and summary["data_audit"]["leak_overridden"]
    assert summary["data_audit"]["verdicts"]["train"][RAW].startswith("LEAK (all/always_last")
    assert summary["data_audit"]["verdicts"]["train"][AS_TRAINED] == "OK"
    assert "LEAK allowed by --data.allow-leaks" in out and "data audit         train: raw LEAK" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["allow_leaks"] is True
    assert json.loads((tmp_path / "run" / "dry_run.json").read_text())["data_audit"]["allow_leaks"] is True


def test_unshuffled_options_are_allowed_and_logged(tmp_path, caplog):
    cfg = DataConfig(train_path="synthetic:gun_control", synthetic_n=200, shuffle_options=False)
    data = {"train": load_examples(cfg.train_path, cfg, "train")}
    with caplog.at_level("WARNING"):
        audit = check_training_data(data, cfg, tmp_path, rank0=True)
    assert "data.shuffle_options=False" in caplog.text and "reaches training" in caplog.text
    assert not audit.shuffle_options and json.loads((tmp_path / AUDIT_FILE).read_text())["shuffle_options"] is False


def test_a_mixture_keeps_each_sources_raw_rows_for_the_audit():
    from grailcore.config import MixtureSource
    from grailcore.mixture import load_mixture

    cfg = DataConfig(mixture=(MixtureSource(path="synthetic:gun_control"), MixtureSource(path=FLAW, eval_path=FLAW)),
                     synthetic_n=200)
    train, evals = load_mixture(cfg)
    assert len(train.raw_examples) == len(train.examples)
    assert {ex.source for ex in train.raw_examples} == {"gun_control", "gun_flaw_200"}
    audit = audit_for_training({"train": train, "eval": evals}, cfg)
    raw = audit.find("train", RAW).report
    assert raw.leak and raw.best_group == "gun_control/study1"  # the flawed source's rows
    assert audit.find("train", AS_TRAINED).report.verdict != "LEAK"
