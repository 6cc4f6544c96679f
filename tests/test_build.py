"""Component building (grailcore/build.py): frozen layers, data checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from grailcore.build import load_rows, policy_model
from grailcore.config import Config, ConfigError, DataConfig, ModelConfig
from grailcore.dist import init_distributed
from grailcore.model import resolve_model_path


def test_trainable_layers_freeze_the_bottom_and_keep_grads_on_top():
    cfg = Config(model=ModelConfig(name_or_path="micro-llama", trainable_layers=1, gradient_checkpointing=False))
    model = policy_model(resolve_model_path("micro-llama"), cfg, init_distributed(), trainable=True)
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
        policy_model(resolve_model_path("micro-llama"), cfg, init_distributed(), trainable=True)


def test_single_file_training_data_needs_an_eval_path(tmp_path):
    src = tmp_path / "prompts.jsonl"
    src.write_text((Path(__file__).parent / "data" / "fixtures" /
                    "audit_seed_prompts_sample.jsonl").read_text())
    cfg = Config(data=DataConfig(train_path=str(src)))
    with pytest.raises(ConfigError, match="data.eval_path"):
        load_rows(cfg, rank0=True)


def test_max_train_samples_caps_training_rows_not_the_held_out_file(tmp_path):
    fixture = Path(__file__).parent / "data" / "fixtures" / "gun_flaw_200.jsonl"
    cfg = Config(data=DataConfig(train_path=str(fixture), eval_path=str(fixture), max_train_samples=7))
    train, evals = load_rows(cfg, rank0=True)
    assert len(train.examples) == 7
    assert len(evals.examples) == 200
