"""`--dry-run` on micro-llama: one rollout, reward pass and loss backward, no weight change,
a summary with token counts and a memory estimate."""

from __future__ import annotations

import json

import pytest
import torch

from grailcore.dry_run import _Withheld, activation_bytes
from grailcore.rewards import available_rewards, register
from grailcore.train import main

VARYING = "test_dry_run_spaces"
if VARYING not in available_rewards():
    # A reward a random model varies on, so advantages (and the gradient) are non-zero.
    register(VARYING)(lambda example, completion: completion.count(" ") / max(len(completion), 1))


def _args(run_dir) -> list[str]:
    return ["--run-dir", str(run_dir), "--model.name-or-path", "micro-llama",
            "--model.no-gradient-checkpointing", "--data.synthetic-n", "100", "--data.max-history", "2",
            "--rollout.max-prompt-tokens", "4096", "--rollout.max-completion-tokens", "8",
            "--grpo.prompts-per-step", "2", "--grpo.group-size", "2", "--optim.lr", "0.1",
            "--eval.max-samples", "4", "--rewards.names", VARYING, "--rewards.weights", "1.0", "--logging.no-tensorboard", "--dry-run"]


def test_dry_run_summarises_without_training(tmp_path, capsys):
    summary = main(_args(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "=== dry run summary ===" in out and "<|im_start|>" in out  # a rendered chat prompt is shown
    assert summary["weights_unchanged"] and summary["optimizer_steps_withheld"] == 1
    assert summary["model"] == "micro-llama"
    assert 100_000 < summary["parameters"] < 1_000_000
    assert 0 < summary["completion_tokens"]["max"] <= 8
    assert summary["prompt_tokens"]["max"] >= summary["prompt_tokens"]["mean"] > 50
    assert summary["tokens_per_step"]["measured"] <= summary["tokens_per_step"]["upper_bound"]
    assert summary["zero_variance_groups"] < 2 and summary["grad_norm"] > 0, "backward produced no gradient"
    mem = summary["memory_estimate_bytes"]
    assert mem["params"] == summary["parameters"] * 4  # float32
    assert mem["optimizer_states"] == 2 * mem["grads"]
    assert summary["peak_rss_bytes"] > mem["params"]
    on_disk = json.loads((tmp_path / "run" / "dry_run.json").read_text())
    assert on_disk["loss"] == pytest.approx(summary["loss"])
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_withheld_step_keeps_weights_and_passes_the_rest_through():
    layer = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(layer.parameters(), lr=1.0)
    wrapped = _Withheld(opt)
    before = layer.weight.detach().clone()
    layer(torch.ones(1, 3)).sum().backward()
    wrapped.step()
    wrapped.zero_grad(set_to_none=True)
    assert torch.equal(layer.weight, before) and layer.weight.grad is None
    assert wrapped.steps_withheld == 1 and wrapped.param_groups[0]["lr"] == 1.0


def test_activation_estimate_shrinks_with_checkpointing_and_fused_logprobs():
    kw = dict(tokens=4096, hidden=576, intermediate=1536, layers=30, vocab=49152, dtype_bytes=2, logprob_chunk=1024)
    full = activation_bytes(checkpointing=False, fused_logprobs=False, **kw)
    ckpt = activation_bytes(checkpointing=True, fused_logprobs=False, **kw)
    fused = activation_bytes(checkpointing=True, fused_logprobs=True, **kw)
    assert full > ckpt > fused
    assert full - ckpt > 4096 * 30 * 576 * 2  # checkpointing saves far more than one tensor per layer


def test_frozen_layers_keep_no_activations():
    kw = dict(tokens=1000, hidden=64, intermediate=128, vocab=512, dtype_bytes=4, checkpointing=False,
              fused_logprobs=True, logprob_chunk=1000)
    head_only = activation_bytes(layers=0, **kw)
    assert head_only == 3 * 1000 * 512 * 4  # only the log-prob head's logits
    assert activation_bytes(layers=2, **kw) - head_only == 2 * (activation_bytes(layers=1, **kw) - head_only)
