"""The trainer's Evaluator (grailcore/evaluation/evaluator.py) on micro-llama: per-row reward
means, option-order copies, kept completions for paired comparisons, and rule rewards only
(a learned reward never sees a held-out row)."""

from __future__ import annotations

import dataclasses
import math

import torch

from grailcore.build import build_trainer
from grailcore.config import Config, DataConfig, EvalConfig, GailConfig, ModelConfig, RewardsConfig, RolloutConfig
from grailcore.evaluation.compare import paired_differences
from grailcore.evaluation.completions_io import read_completions
from grailcore.evaluation.evaluator import row_means


def _cfg(**overrides) -> Config:
    return Config(seed=1, model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=False),
                  data=DataConfig(train_path="synthetic:gun_control", synthetic_n=200, max_history=2),
                  rollout=RolloutConfig(max_prompt_tokens=2048, max_completion_tokens=6), **overrides)


def test_eval_reward_is_the_mean_over_each_rows_samples():
    # row 0 has samples [1, 0, 0, 1], row 1 [0.5], row 2 [0, 0]
    values = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0])
    owner = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    assert row_means(values, owner, 3).tolist() == [0.5, 0.5, 0.0]


def test_evaluate_scores_the_shown_order_plus_eval_permutations():
    trainer = build_trainer(_cfg(eval=EvalConfig(max_samples=3, samples_per_row=2, permutations=2)))
    sampled = []
    engine = trainer.rollout.engine
    generate = engine.generate
    engine.generate = lambda prompts, params: sampled.append(len(prompts)) or generate(prompts, params)
    try:
        result = trainer.evaluator()
    finally:
        trainer.close()
    assert sum(sampled) == 3 * (2 + 1)  # every row, in the shown order and in 2 permuted ones
    assert result["eval/order/n_orders"] == 3
    assert "eval/order/accuracy_std" in result  # spread across orders exists only with permutations
    assert "eval/order/choice_tv_across_orders" in result  # from the answer-slot distributions
    assert result["eval/forced_slot_share"] == 1.0  # 6 tokens of a random model never reach <answer>


def test_evaluate_at_a_step_keeps_its_completions_for_paired_comparison(tmp_path):
    trainer = build_trainer(_cfg(run_dir=str(tmp_path / "run"), eval=EvalConfig(max_samples=3, samples_per_row=2)))
    try:
        trainer.evaluator()  # no step: nothing kept
        assert not (tmp_path / "run" / "eval").exists()
        trainer.evaluator(5)
        trainer.evaluator(12)
    finally:
        trainer.close()
    first, last = tmp_path / "run" / "eval" / "step_000005.jsonl", tmp_path / "run" / "eval" / "step_000012.jsonl"
    samples = read_completions(first)
    examples, completions = samples.examples, samples.texts
    eval_examples = trainer.data.eval_examples
    assert [ex.example_id for ex in examples] == [ex.example_id for ex in eval_examples]
    assert [len(row) for row in completions] == [2, 2, 2]
    assert examples[0].true_choice_probs == eval_examples[0].true_choice_probs
    # the step files carry every completion's answer-slot distribution: compare uses them
    assert [len(row.samples) for row in samples.slots] == [2, 2, 2]
    diffs = paired_differences(last, first, alpha=1.0, n_boot=50)
    assert set(diffs) == {"tv", "nll", "off_slate", "acc", "parsed", "format", "acc_parsed", "estimator"}
    assert diffs["estimator"] == "exact_answer_slot"
    same = paired_differences(first, first, alpha=1.0, n_boot=50)
    assert all(same[k].value == 0 for k in ("tv", "nll", "acc", "parsed", "format"))
    # accuracy among parsed answers is 0/0 when an untrained model parses none
    assert same["acc_parsed"].value == 0 or math.isnan(same["acc_parsed"].value)


def test_evaluation_never_runs_the_discriminator_and_scores_rule_rewards_only(tmp_path):
    """GRAIL: training scores gail, evaluation of held-out rows never calls it."""
    cfg = _cfg(run_dir=str(tmp_path / "run"), eval=EvalConfig(max_samples=3),
               rewards=RewardsConfig(names=("format", "gail"), weights=(1.0, 0.5)),
               gail=GailConfig(model="tiny-bert", max_tokens=256))
    trainer = build_trainer(cfg)
    discriminator = trainer.rewards.learned["gail"]
    seen = []
    score = discriminator.score
    discriminator.score = lambda examples, completions: seen.extend(examples) or score(examples, completions)
    try:
        trainer.rewards(trainer.data.train[:2], ["x", "y"])  # the training path does run it
        assert len(seen) == 2
        result = trainer.evaluator()
        flat = trainer.rewards(trainer.data.eval_examples, ["x"] * 3, learned=False)
    finally:
        trainer.close()
    assert len(seen) == 2, "evaluation ran the discriminator on held-out rows"
    assert set(flat.per_reward) == {"format"}
    assert "eval/reward/total" in result and not any("gail" in k for k in result)


def test_runs_of_different_seeds_evaluate_the_same_rows():
    """The held-out rows are drawn with data.seed: a second seed of an arm pairs row by row
    with the first (`evaluation.compare`); a different data seed draws other rows."""
    from transformers import AutoTokenizer

    from grailcore.build import load_rows, training_data
    from grailcore.model import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("micro-llama"))

    def eval_ids(cfg: Config) -> list[str]:
        train, evals = load_rows(cfg, rank0=False)
        assert len(evals.examples) > cfg.eval.max_samples  # a sample, not every row
        return [ex.example_id for ex in training_data(cfg, tokenizer, train, evals, None, rank0=False).eval_examples]

    base = _cfg(eval=EvalConfig(max_samples=8))
    first = eval_ids(base)
    assert eval_ids(dataclasses.replace(base, seed=7)) == first
    other_data = dataclasses.replace(base, data=dataclasses.replace(base.data, seed=1))
    assert eval_ids(other_data) != first
