"""The one trainer shell (grailcore/trainer.py) on tiny real models with the HF engine.

First end to end GRPO: the loop raises a trivial reward, resumes exactly and exports a
loadable model. Then every feature of the shell in every mode (GRPO, GRAIL, SFT), since a
mode gets them by construction only while each is tested there: evaluation cadence, best
export, checkpoints, final export and push, progress, SIGTERM, the non-finite guard,
exact resume and the dry run."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import signal
import zlib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import grailcore.trainer
from grailcore.advantages import decoupled_advantages
from grailcore.build import build_trainer
from grailcore.checkpoint import read_model_weights
from grailcore.config import (CheckpointConfig, Config, DataConfig, EvalConfig, GailConfig, GRPOConfig,
                              LoggingConfig, ModelConfig, OptimConfig, RewardsConfig, RolloutConfig, SFTConfig)
from grailcore.model import resolve_model_path
from grailcore.optimize import BadStepsError
from grailcore.rewards import available_rewards, register
from grailcore.rewards.discriminator import SAVE_FORMAT
from grailcore.sampler import PromptSampler
from grailcore.sft import main as sft_main
from grailcore.train import main as train_main

TRIVIAL = "test_space_tokens"


def _space_fraction(example, completion: str) -> float:
    """Share of whitespace-separated words: a signal a random model varies on at once."""
    if not completion:
        return 0.0
    return sum(ch == " " for ch in completion) / len(completion)


if TRIVIAL not in available_rewards():
    register(TRIVIAL)(_space_fraction)

DISTINCT = "test_text_hash"
"""A reward that differs between any two different completions, so every group has a
non-zero advantage (and step 1 surely changes the weights)."""
if DISTINCT not in available_rewards():
    register(DISTINCT)(lambda example, completion: zlib.crc32(completion.encode()) / 2**32)


def tiny_config(run_dir: Path, **overrides) -> Config:
    cfg = Config(
        run_dir=str(run_dir), seed=3,
        model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=False),
        data=DataConfig(train_path="synthetic:gun_control", synthetic_n=200, max_history=2),
        rollout=RolloutConfig(temperature=1.0, max_prompt_tokens=2048, max_completion_tokens=12),
        grpo=GRPOConfig(prompts_per_step=4, group_size=8, loss_type="grpo"),
        optim=OptimConfig(lr=3e-3, max_steps=14, micro_batch_size=16),
        rewards=RewardsConfig(names=(TRIVIAL,), weights=(1.0,)),
        eval=EvalConfig(every=0, max_samples=4),
        checkpoint=CheckpointConfig(every=0, export_final=True),
        logging=LoggingConfig(tensorboard=False, progress=False, log_samples=0),
    )
    return dataclasses.replace(cfg, **overrides)


def _run(cfg: Config, mode: str = "grpo") -> dict:
    trainer = build_trainer(cfg, mode)
    try:
        return trainer.run()
    finally:
        trainer.close()


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(run_dir: Path) -> list[dict]:
    return [r for r in _rows(run_dir) if "loss" in r]


def _rewards(run_dir: Path) -> list[float]:
    return [r["reward/total"] for r in _rows(run_dir) if "reward/total" in r]


def _checkpoint(run_dir: Path, step: int | None = None) -> Path:
    root = run_dir / "checkpoints"
    return root / (f"step_{step:08d}" if step is not None else (root / "latest").read_text().strip())


def test_grpo_raises_a_trivial_reward(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    _run(cfg)
    rewards = _rewards(tmp_path / "run")
    assert len(rewards) == cfg.optim.max_steps
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.05, f"reward did not rise: first steps {rewards[:4]}, last {rewards[-4:]}"
    for row in (r for r in _rows(tmp_path / "run") if "time/training" in r):  # training's sub-phases
        assert 0 < row["time/forward_backward"] and 0 < row["time/optimizer"]
        assert row["time/forward_backward"] + row["time/optimizer"] <= row["time/training"]
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert exported.config.num_hidden_layers == 2


def test_resume_continues_exactly(tmp_path):
    """Stop after 3 steps (checkpoint), resume to 5: same weights as 5 straight steps."""
    base = dict(optim=OptimConfig(lr=1e-3, max_steps=5, micro_batch_size=16),
                checkpoint=CheckpointConfig(every=1, keep=2, export_final=False), deterministic=True)
    straight = tiny_config(tmp_path / "straight", **base)
    _run(straight)
    split = tiny_config(tmp_path / "split", **{**base, "optim": OptimConfig(lr=1e-3, max_steps=3,
                                                                             micro_batch_size=16)})
    _run(split)
    # The schedule must see the same horizon: resume with the full max_steps.
    resumed = dataclasses.replace(split, optim=straight.optim, resume=True)
    _run(resumed)
    w_straight = read_model_weights(_checkpoint(tmp_path / "straight"))
    w_resumed = read_model_weights(_checkpoint(tmp_path / "split"))
    assert w_straight.keys() == w_resumed.keys()
    for name in w_straight:
        assert torch.equal(w_straight[name], w_resumed[name]), name
    assert _rewards(tmp_path / "straight") == pytest.approx(_rewards(tmp_path / "split"))


def test_grail_run_logs_discriminator_metrics_and_checkpoints_it(tmp_path):
    cfg = tiny_config(tmp_path / "grail", optim=OptimConfig(lr=1e-3, max_steps=2, micro_batch_size=16),
                      rewards=RewardsConfig(names=(TRIVIAL, "gail"), weights=(1.0, 0.5)),
                      gail=GailConfig(model="tiny-bert", max_tokens=256),
                      checkpoint=CheckpointConfig(every=1, export_final=False))
    _run(cfg)
    steps = _steps(tmp_path / "grail")
    assert len(steps) == 2 and all("gail/truncation_rate" in r and "reward/gail" in r for r in steps)
    extra = torch.load(_checkpoint(tmp_path / "grail") / "extra.pt", weights_only=True)
    assert extra["rewards"]["gail"]["format"] == SAVE_FORMAT == "grailcore-discriminator-v3"  # slate- and position-aware
    assert extra["rewards"]["gail"]["observed"] == 2  # D saw each step's rollouts once


def test_a_discriminator_warm_up_trains_d_alone_then_the_policy(tmp_path):
    """gail.warmup_steps: the first steps sample, score and update D; the policy's weights
    are the starting ones until the first policy step."""
    cfg = tiny_config(tmp_path / "grail", optim=OptimConfig(lr=1e-3, max_steps=3, micro_batch_size=16),
                      rewards=RewardsConfig(names=(DISTINCT, "gail"), weights=(1.0, 0.5)),
                      gail=GailConfig(model="tiny-bert", max_tokens=256, warmup_steps=2),
                      checkpoint=CheckpointConfig(every=1, keep=3, export_final=False))
    _run(cfg)
    rows = [r for r in _rows(tmp_path / "grail") if "reward/total" in r]
    assert [r.get("gail/warmup", 0.0) for r in rows] == [1.0, 1.0, 0.0]
    assert ["loss" in r for r in rows] == [False, False, True] and all("gail/d_loss" in r for r in rows)
    start = AutoModelForCausalLM.from_pretrained(resolve_model_path("micro-llama")).state_dict()
    warmed, trained = (read_model_weights(_checkpoint(tmp_path / "grail", step)) for step in (2, 3))
    assert all(torch.equal(warmed[name], start[name.removeprefix("lm.")]) for name in warmed)
    assert any(not torch.equal(trained[name], start[name.removeprefix("lm.")]) for name in trained)
    discriminators = [torch.load(_checkpoint(tmp_path / "grail", step) / "extra.pt", weights_only=True)
                      ["rewards"]["gail"] for step in (1, 2, 3)]
    assert [d["observed"] for d in discriminators] == [1, 2, 3]


def test_a_gdpo_grail_run_logs_each_completion_with_the_advantage_it_trained_on(tmp_path):
    """grpo.reward_aggregation=normalize_then_sum and logging.rollouts: every step's file
    holds every completion, and its advantages are GDPO's of its own rewards."""
    names, weights = (DISTINCT, "format", "gail"), (1.0, 0.5, 0.25)
    cfg = tiny_config(tmp_path / "run", optim=OptimConfig(lr=1e-3, max_steps=2, micro_batch_size=16),
                      grpo=GRPOConfig(prompts_per_step=2, group_size=4, loss_type="grpo",
                                      reward_aggregation="normalize_then_sum"),
                      rewards=RewardsConfig(names=names, weights=weights),
                      gail=GailConfig(model="tiny-bert", max_tokens=256, dodge="worst_option"),
                      logging=LoggingConfig(tensorboard=False, progress=False, log_samples=0, rollouts=True))
    _run(cfg)
    files = sorted((tmp_path / "run" / "rollouts").glob("*.jsonl"))
    assert [f.name for f in files] == ["step_000001.rank0.jsonl", "step_000002.rank0.jsonl"]
    for f in files:
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        assert len(rows) == 8 and [r["index"] for r in rows] == list(range(8))
        rewards = torch.tensor([[r["rewards"][n] for n in names] for r in rows])
        expected = decoupled_advantages(rewards, weights, 4).advantages
        assert [r["advantage"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
        assert all(r["answer"] is None or 1 <= r["answer"] <= r["n_options"] for r in rows)
    assert len(_steps(tmp_path / "run")) == 2


@pytest.mark.parametrize("names", [("choice_likelihood", "format"), ("choice_likelihood", "opinion_likelihood", "gail")])
def test_grpo_and_grail_train_on_the_policys_probability_of_the_persons_choice(tmp_path, names, caplog):
    """`--rewards.names choice_likelihood ...`: the trainer attaches its engine as the slot
    reader; every step logs the reward, a log-probability in [floor, 0], and the share of
    completions whose slot-reward credit was cut at the slot (grailcore/credit.py)."""
    cfg = tiny_config(tmp_path / "run", optim=OptimConfig(lr=1e-3, max_steps=2, micro_batch_size=16),
                      grpo=GRPOConfig(prompts_per_step=2, group_size=4, loss_type="grpo"),
                      rewards=RewardsConfig(names=names, weights=(1.0,) * len(names)),
                      gail=GailConfig(model="tiny-bert", max_tokens=256))
    with caplog.at_level(logging.WARNING, logger="grailcore.build"):
        _run(cfg)
    assert "--grpo.slot-nll-coef 0.01" in caplog.text  # without the slot term the run says what it misses
    steps = _steps(tmp_path / "run")
    assert len(steps) == 2
    floor = cfg.rewards.likelihood_floor
    for row in steps:
        assert floor <= row["reward/choice_likelihood"] < 0 and row["reward/choice_likelihood/errors"] == 0
        assert ("reward/gail" in row) == ("gail" in names)
        assert 0.0 <= row["grpo/slot_credit_cut"] <= 1.0


def test_a_worker_restarted_by_torchrun_resumes_from_the_latest_checkpoint(tmp_path, monkeypatch):
    """torchrun --max-restarts restarts workers with TORCHELASTIC_RESTART_COUNT > 0: they
    resume as --resume would (no checkpoint yet: they start over), and keep the metrics."""
    cfg = tiny_config(tmp_path / "run", optim=OptimConfig(lr=1e-3, max_steps=2, micro_batch_size=16),
                      checkpoint=CheckpointConfig(every=1, keep=2, export_final=False))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    fresh = build_trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "empty")))
    fresh.close()
    assert fresh.state.step == 0  # restarted before any checkpoint: from the start
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    _run(cfg)
    before = _steps(tmp_path / "run")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    summary = _run(dataclasses.replace(cfg, optim=OptimConfig(lr=1e-3, max_steps=3, micro_batch_size=16)))
    after = _steps(tmp_path / "run")
    assert [r["step"] for r in after] == [1, 2, 3] and after[:2] == before  # steps 1-2 kept, not run again
    assert summary["completion_tokens"] == int(after[2]["tokens/step"])  # this start trained one step


# ---------------------------------------------------------------- every feature, every mode

MODES = ("grpo", "grail", "sft")


def mode_config(run_dir: Path, mode: str, max_steps: int, **overrides) -> Config:
    """Two prompts x two completions of 8 tokens (GRPO, GRAIL) or two targets (SFT) a step."""
    cfg = tiny_config(run_dir, seed=1, deterministic=True,
                      data=DataConfig(train_path="synthetic:gun_control", synthetic_n=100, max_history=1),
                      rollout=RolloutConfig(max_prompt_tokens=2048, max_completion_tokens=8),
                      grpo=GRPOConfig(prompts_per_step=2, group_size=2),
                      optim=OptimConfig(lr=1e-3, max_steps=max_steps, micro_batch_size=4),
                      eval=EvalConfig(every=0, max_samples=2),
                      checkpoint=CheckpointConfig(every=1, keep=5, export_final=False),
                      rewards=RewardsConfig(names=(DISTINCT,), weights=(1.0,)), sft=SFTConfig(batch_size=2))
    if mode == "grail":
        cfg = dataclasses.replace(cfg, rewards=RewardsConfig(names=(DISTINCT, "gail"), weights=(1.0, 0.5)),
                                  gail=GailConfig(model="tiny-bert", max_tokens=256))
    return dataclasses.replace(cfg, **overrides)


def _trainer_mode(mode: str) -> str:
    return "sft" if mode == "sft" else "grpo"


@pytest.fixture(scope="module", params=MODES)
def finished_run(request, tmp_path_factory):
    """A 2-step run of each mode with every end-of-run feature on, its summary, stderr and pushes."""
    mode = request.param
    run_dir = tmp_path_factory.mktemp(mode) / "run"
    cfg = mode_config(run_dir, mode, max_steps=2,
                      eval=EvalConfig(every=1, on_start=True, max_samples=2, best_metric="eval/reward/total"),
                      checkpoint=CheckpointConfig(every=1, keep=5, export_final=True, push_to_hub="someone/tiny"),
                      logging=LoggingConfig(tensorboard=False, progress=True, log_samples=1))
    pushed, stderr = [], io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(stderr):
        # The upload itself needs the network (grailcore.tracking.push_export, test_tracking);
        # here: that the shell calls it with the final export.
        patch.setattr(grailcore.trainer, "push_export", lambda path, repo: pushed.append((Path(path), repo)) or "url")
        summary = _run(cfg, _trainer_mode(mode))
    return {"mode": mode, "run_dir": run_dir, "summary": summary, "stderr": stderr.getvalue(), "pushed": pushed}


def test_every_step_is_logged_with_the_shells_metrics(finished_run):
    steps = _steps(finished_run["run_dir"])
    assert [r["step"] for r in steps] == [1, 2]
    for row in steps:
        assert row["tokens/step"] > 0 and row["tokens/per_s"] > 0 and row["time/step"] > 0
        assert row["memory/peak_rss_mib"] > 0 and math.isfinite(row["loss"])
    assert finished_run["summary"]["completion_tokens"] == sum(int(r["tokens/step"]) for r in steps)


def test_evaluation_runs_at_start_every_n_steps_and_at_the_end(finished_run):
    evals = [r["step"] for r in _rows(finished_run["run_dir"]) if "eval/reward/total" in r]
    assert evals == [0, 1, 2]
    kept = sorted(p.name for p in (finished_run["run_dir"] / "eval").iterdir())
    assert kept == ["step_000000.jsonl", "step_000001.jsonl", "step_000002.jsonl"]


def test_the_best_evaluation_is_exported(finished_run):
    run_dir, best = finished_run["run_dir"], finished_run["summary"]["best"]
    tracked = {r["step"]: r["eval/reward/total"] for r in _rows(run_dir) if "eval/reward/total" in r and r["step"]}
    assert best["metric"] == "eval/reward/total" and best["value"] == max(tracked.values())
    assert tracked[best["step"]] == best["value"]
    assert AutoModelForCausalLM.from_pretrained(run_dir / "best").config.num_hidden_layers == 2


def test_checkpoints_hold_every_stateful_part(finished_run):
    run_dir = finished_run["run_dir"]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000001", "step_00000002"]
    state = json.loads((_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sampler"]["position"] > 0 and state["best_metric"] is not None
    extra = torch.load(_checkpoint(run_dir) / "extra.pt", weights_only=True)
    assert set(extra["rewards"]) == ({"gail"} if finished_run["mode"] == "grail" else set())


def test_the_final_policy_is_exported_and_pushed(finished_run):
    run_dir = finished_run["run_dir"]
    assert AutoModelForCausalLM.from_pretrained(run_dir / "final").config.num_hidden_layers == 2
    assert finished_run["pushed"] == [(run_dir / "final", "someone/tiny")]


def test_progress_reaches_the_last_step(finished_run):
    assert "2/2" in finished_run["stderr"]
    assert "=== training summary ===" not in finished_run["stderr"]  # the summary goes to stdout


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_finishes_the_step_checkpoints_and_returns(tmp_path, mode):
    cfg = mode_config(tmp_path / "run", mode, max_steps=5, checkpoint=CheckpointConfig(every=0, export_final=True))
    trainer = build_trainer(cfg, _trainer_mode(mode))
    step_fn = trainer.step_fn

    def step_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered now, in the middle of this step
        return step_fn(*args, **kwargs)

    trainer.step_fn = step_then_sigterm
    before = signal.getsignal(signal.SIGTERM)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["steps"] == 1 and [r["step"] for r in _steps(tmp_path / "run")] == [1]
    assert _checkpoint(tmp_path / "run").name == "step_00000001"
    assert not (tmp_path / "run" / "final").exists(), "a stopped run is not finished: no final export"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("mode", MODES)
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, mode):
    """Steps 2 and 3 get NaN gradients: both skipped (weights kept), the second in a row stops."""
    run_dir = tmp_path / "run"
    cfg = mode_config(run_dir, mode, max_steps=5)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, max_consecutive_bad_steps=2))
    trainer = build_trainer(cfg, _trainer_mode(mode))
    param = next(p for p in trainer.policy.model.parameters() if p.requires_grad)
    param.register_hook(lambda grad: grad * float("nan") if trainer.state.step in (1, 2) else grad)
    try:
        with pytest.raises(BadStepsError, match=r"2 consecutive steps .*\(last at step 3\)"):
            trainer.run()
    finally:
        trainer.close()
    skipped = "sft/skipped_updates" if mode == "sft" else "grpo/skipped_updates"
    assert [r[skipped] for r in _steps(run_dir)] == [0.0, 1.0, 1.0]
    assert _checkpoint(run_dir).name == "step_00000002", "the step that raised must not be checkpointed"
    w1, w2 = (read_model_weights(_checkpoint(run_dir, s)) for s in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "a skipped step changed the weights"
    w0 = AutoModelForCausalLM.from_pretrained(resolve_model_path("micro-llama")).state_dict()
    assert w1.keys() == {f"lm.{k}" for k in w0} - {"lm.lm_head.weight"}  # tied to the embedding
    assert any(not torch.equal(w1[f"lm.{k}"], w0[k]) for k in w0 if f"lm.{k}" in w1), "step 1 did not train"


@pytest.mark.parametrize("mode", MODES)
def test_resume_reproduces_an_uninterrupted_run(tmp_path, mode):
    """2 steps, then --resume to 3: the same weights (and discriminator), step-3 metrics and
    sampled step-3 evaluation as 3 straight (whose engine drew the step-2 evaluation since)."""
    evals = EvalConfig(every=1, max_samples=2, samples_per_row=3, temperature=1.0)
    _run(mode_config(tmp_path / "straight", mode, max_steps=3, eval=evals), _trainer_mode(mode))
    _run(mode_config(tmp_path / "split", mode, max_steps=2, eval=evals), _trainer_mode(mode))
    _run(mode_config(tmp_path / "split", mode, max_steps=3, eval=evals, resume=True), _trainer_mode(mode))
    e3_straight, e3_split = ((tmp_path / run / "eval" / "step_000003.jsonl").read_text()
                             for run in ("straight", "split"))
    assert e3_straight == e3_split, "the resumed run's evaluation drew other samples"
    straight, split = _checkpoint(tmp_path / "straight"), _checkpoint(tmp_path / "split")
    assert straight.name == split.name == "step_00000003"
    w_straight, w_split = (read_model_weights(p) for p in (straight, split))
    assert all(torch.equal(w_straight[k], w_split[k]) for k in w_straight)
    e_straight, e_split = (torch.load(p / "extra.pt", weights_only=True)["rewards"] for p in (straight, split))
    for name in e_straight:  # the discriminator's full training state
        assert all(torch.equal(a, e_split[name]["weights"][k]) for k, a in e_straight[name]["weights"].items())
        assert e_straight[name]["replay"] == e_split[name]["replay"]
    last = [_steps(tmp_path / run)[-1] for run in ("straight", "split")]
    assert last[0]["step"] == last[1]["step"] == 3 and last[0]["loss"] == last[1]["loss"]
    assert [r["step"] for r in _steps(tmp_path / "split")] == [1, 2, 3]


@pytest.mark.parametrize("mode", MODES)
def test_dry_run_is_one_step_with_the_update_withheld(tmp_path, mode, capsys):
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), "--model.name-or-path", "micro-llama", "--model.no-gradient-checkpointing",
            "--data.synthetic-n", "100", "--data.max-history", "1", "--rollout.max-prompt-tokens", "2048",
            "--rollout.max-completion-tokens", "8", "--grpo.prompts-per-step", "2", "--grpo.group-size", "2",
            "--sft.batch-size", "2", "--optim.lr", "0.1", "--eval.max-samples", "2", "--logging.no-tensorboard",
            "--rewards.names", DISTINCT, *(["gail"] if mode == "grail" else []),
            "--rewards.weights", "1.0", *(["0.5"] if mode == "grail" else []),
            "--gail.model", "tiny-bert", "--gail.max-tokens", "256", "--dry-run"]
    summary = (sft_main if mode == "sft" else train_main)(args)
    out = capsys.readouterr().out
    assert "=== dry run summary ===" in out and summary["weights_unchanged"]
    assert summary["optimizer_steps_withheld"] == 1 and summary["grad_norm"] > 0
    assert ("reward" in summary) == (mode != "sft")
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    assert (run_dir / "dry_run.json").exists()


def test_an_evaluation_repeats_whatever_the_engine_drew_before(tmp_path):
    """Evaluation rows are seeded by (run seed, step, order, row): the same step samples the
    same completions after the engine drew others (as a resumed run's fresh vLLM engine has
    drawn nothing), and another step samples new ones."""
    from grailcore.evaluation.generate import generate_completions

    evals = EvalConfig(every=0, max_samples=3, samples_per_row=3, temperature=1.0)
    trainer = build_trainer(mode_config(tmp_path / "run", "grpo", max_steps=1, eval=evals))
    drawn = lambda step: (tmp_path / "run" / "eval" / f"step_{step:06d}.jsonl").read_text()  # noqa: E731
    try:
        trainer.evaluator(5)
        first = drawn(5)
        examples = trainer.evaluator.examples
        generate_completions(trainer.rollout.engine, trainer.policy.tokenizer, examples, 4, 1.0, 8, exact=False)
        trainer.evaluator(5)
        assert drawn(5) == first
        trainer.evaluator(6)
        assert drawn(6) != first
    finally:
        trainer.close()


def test_a_stage_started_from_an_sft_export_draws_the_rows_it_did_not_train_on_first(tmp_path):
    """SFT -> GRPO on the same rows: GRPO continues SFT's prompt order where SFT stopped, not
    from its start (the warm start was fitted to those rows); other rows, or continue_order
    off, start the order afresh."""
    sft_cfg = mode_config(tmp_path / "sft", "sft", max_steps=3,
                          checkpoint=CheckpointConfig(every=0, export_final=True))
    sft = build_trainer(sft_cfg, "sft")
    try:
        sft.run()
        sft_next = sft.next_prompts(4)  # what SFT would have drawn next
    finally:
        sft.close()
    start = ModelConfig(name_or_path=str(tmp_path / "sft" / "final"), gradient_checkpointing=False)

    def first_prompts(name: str, **data) -> tuple[list[int], list[int]]:
        """(the stage's first 4 prompts, the first 4 of a fresh order over its rows)."""
        cfg = mode_config(tmp_path / name, "grpo", max_steps=1, model=start)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data))
        trainer = build_trainer(cfg)
        try:
            return trainer.next_prompts(4), PromptSampler(trainer.state.sampler.num_examples, cfg.data.seed).next(4)
        finally:
            trainer.close()

    continued, from_the_start = first_prompts("continued")
    assert continued == sft_next and sft_next != from_the_start
    afresh, from_the_start = first_prompts("afresh", continue_order=False)
    assert afresh == from_the_start
    other, from_the_start = first_prompts("other_rows", synthetic_n=120)  # other rows: the order starts afresh
    assert other == from_the_start and other != sft_next
