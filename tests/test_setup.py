"""Part building: frozen layers, data checks, engine choice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from grailcore.config import Config, ConfigError, DataConfig, ModelConfig
from grailcore.dist import init_distributed
from grailcore.model import resolve_model_path
from grailcore.setup import _policy_model, _row_means


def test_trainable_layers_freeze_the_bottom_and_keep_grads_on_top():
    cfg = Config(model=ModelConfig(name_or_path="micro-llama", trainable_layers=1, gradient_checkpointing=False))
    model = _policy_model(resolve_model_path("micro-llama"), cfg, init_distributed(), trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("lm.model.layers.1.", "lm.model.norm.")) for n in trainable)
    ids = torch.randint(3, 500, (2, 12))
    out = model(ids, torch.ones_like(ids), 4, temperature=1.0)
    out.logprobs.sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_too_many_trainable_layers_is_a_config_error():
    cfg = Config(model=ModelConfig(name_or_path="micro-llama", trainable_layers=5))
    with pytest.raises(ConfigError, match="trainable_layers=5"):
        _policy_model(resolve_model_path("micro-llama"), cfg, init_distributed(), trainable=True)


def test_single_file_training_data_needs_an_eval_path(tmp_path):
    from grailcore.model import load_tokenizer
    from grailcore.setup import _load_data

    src = tmp_path / "prompts.jsonl"
    src.write_text((Path(__file__).parent / "data" / "fixtures" /
                    "audit_seed_prompts_sample.jsonl").read_text())
    cfg = Config(data=DataConfig(train_path=str(src)))
    with pytest.raises(ConfigError, match="data.eval_path"):
        _load_data(cfg, load_tokenizer(resolve_model_path("micro-llama")), rank0=True)


def test_eval_reward_is_the_mean_over_each_rows_samples():
    # row 0 has samples [1, 0, 0, 1], row 1 [0.5], row 2 [0, 0]
    values = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0])
    owner = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    assert _row_means(values, owner, 3).tolist() == [0.5, 0.5, 0.0]


def test_evaluate_scores_the_shown_order_plus_eval_permutations():
    from grailcore.config import EvalConfig, RolloutConfig
    from grailcore.setup import build

    cfg = Config(seed=1, model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=False),
                 data=DataConfig(train_path="synthetic:gun_control", synthetic_n=200, max_history=2),
                 rollout=RolloutConfig(max_prompt_tokens=2048, max_completion_tokens=6),
                 eval=EvalConfig(max_samples=3, samples_per_row=2, permutations=2))
    parts = build(cfg)
    sampled = []
    generate = parts.engine.generate
    parts.engine.generate = lambda prompts, params: sampled.append(len(prompts)) or generate(prompts, params)
    try:
        result = parts.evaluate()
    finally:
        parts.engine.close()
    assert sum(sampled) == 3 * (2 + 1)  # every row, in the shown order and in 2 permuted ones
    assert result["eval/order/n_orders"] == 3
    assert "eval/order/accuracy_std" in result  # spread across orders exists only with permutations
    assert "eval/order/choice_tv_across_orders" in result  # from the answer-slot distributions
    assert result["eval/forced_slot_share"] == 1.0  # 6 tokens of a random model never reach <answer>


def test_evaluate_at_a_step_keeps_its_completions_for_paired_comparison(tmp_path):
    from grailcore.config import EvalConfig, RolloutConfig
    from grailcore.evaluation.compare import paired_differences
    from grailcore.evaluation.completions_io import read_completions
    from grailcore.setup import build

    cfg = Config(run_dir=str(tmp_path / "run"), seed=1,
                 model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=False),
                 data=DataConfig(train_path="synthetic:gun_control", synthetic_n=200, max_history=2),
                 rollout=RolloutConfig(max_prompt_tokens=2048, max_completion_tokens=6),
                 eval=EvalConfig(max_samples=3, samples_per_row=2))
    parts = build(cfg)
    try:
        parts.evaluate()  # no step: nothing kept
        assert not (tmp_path / "run" / "eval").exists()
        parts.evaluate(5)
        parts.evaluate(12)
    finally:
        parts.engine.close()
    first, last = tmp_path / "run" / "eval" / "step_000005.jsonl", tmp_path / "run" / "eval" / "step_000012.jsonl"
    samples = read_completions(first)
    examples, completions = samples.examples, samples.texts
    assert [ex.example_id for ex in examples] == [ex.example_id for ex in parts.eval_examples]
    assert [len(row) for row in completions] == [2, 2, 2]
    assert examples[0].true_choice_probs == parts.eval_examples[0].true_choice_probs
    # the step files carry every completion's answer-slot distribution: compare uses them
    assert [len(row.samples) for row in samples.slots] == [2, 2, 2]
    diffs = paired_differences(last, first, alpha=1.0, n_boot=50)
    assert set(diffs) == {"tv", "nll", "off_slate", "acc", "parsed", "format", "acc_parsed", "estimator"}
    assert diffs["estimator"] == "exact_answer_slot"
    same = paired_differences(first, first, alpha=1.0, n_boot=50)
    assert all(same[k].value == 0 for k in ("tv", "nll", "acc", "parsed", "format"))
    # accuracy among parsed answers is 0/0 when an untrained model parses none
    assert same["acc_parsed"].value == 0 or math.isnan(same["acc_parsed"].value)
