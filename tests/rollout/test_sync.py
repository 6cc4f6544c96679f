"""grailcore/rollout/sync.py: which weights a sync sends (everything first, then only what
training can change), that the engine ends up with the trainer's weights, and that the
bucketed FSDP2 gather, and the gather in the engine's dtype, give the same tensors as one gather
per tensor (2 processes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from grailcore.build import _freeze_below, policy_model
from grailcore.config import Config, ModelConfig
from grailcore.dist import init_distributed
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.rollout.hf import HFEngine
from grailcore.rollout.sync import changed_names, iter_full_params, push_weights


class RecordingEngine(HFEngine):
    """A separate-copy HF engine (the engine of a sharded run) that keeps each push's names."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, shares_weights=False)
        self.pushes: list[list[str]] = []

    def update_weights(self, named_tensors):
        names: list[str] = []

        def recorded():
            for name, tensor in named_tensors:
                names.append(name)
                yield name, tensor

        super().update_weights(recorded())
        self.pushes.append(names)


def perturb(model, names=None, seed=0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if names is None or name in names:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)


def test_changed_names_are_the_trainable_layers_and_final_norm():
    lm = load_policy(resolve_model_path("tiny-llama"))
    _freeze_below(lm, 1)
    changed = changed_names(lm)
    assert changed == {n for n, p in lm.named_parameters() if p.requires_grad}
    assert changed and all(n.startswith("model.layers.1.") or n == "model.norm.weight" for n in changed)
    assert "model.embed_tokens.weight" not in changed  # frozen, and the tied lm-head with it


def test_changed_names_under_lora_are_the_merged_layers_under_base_names():
    cfg = Config(model=ModelConfig(name_or_path="micro-llama", gradient_checkpointing=False, lora_rank=4,
                                   lora_target_modules=("q_proj", "v_proj")))
    policy = policy_model(resolve_model_path("micro-llama"), cfg, init_distributed(), trainable=True)
    changed = changed_names(policy.lm)
    layers = len(policy.lm.model.layers)
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(layers) for m in ("q_proj", "v_proj")}


def test_later_syncs_send_only_changed_layers_and_the_engine_matches_the_trainer():
    path = resolve_model_path("tiny-llama")
    trainer = load_policy(path)
    _freeze_below(trainer, 1)
    engine = RecordingEngine(load_policy(path).eval(), load_tokenizer(path))
    all_names = [n for n, _ in trainer.named_parameters()]

    perturb(trainer)  # e.g. a resumed run whose frozen layers differ from the model dir
    assert push_weights(trainer, engine) == len(all_names)  # first sync: everything
    trainable = {n for n, p in trainer.named_parameters() if p.requires_grad}
    perturb(trainer, trainable, seed=1)  # an optimizer step moves only trainable weights
    sent = push_weights(trainer, engine, changed_only=True)

    assert engine.pushes[0] == all_names
    assert set(engine.pushes[1]) == trainable and sent == len(trainable) < len(all_names)
    engine_weights = dict(engine.model.named_parameters())
    for name, p in trainer.named_parameters():
        assert torch.equal(engine_weights[name], p), name


def test_shared_weights_engine_is_not_pushed():
    path = resolve_model_path("micro-llama")
    policy = load_policy(path)
    assert push_weights(policy, HFEngine(policy, load_tokenizer(path))) == 0


BUCKET_SCRIPT = """
import torch
from torch.distributed.fsdp import fully_shard
from grailcore import dist as gdist
from grailcore.rollout.sync import iter_full_params

info = gdist.init_distributed()
torch.manual_seed(0)  # the same module on both ranks
# Shard(0) gives rank 0 one row more than rank 1 (odd first dims), all of a 1-row tensor, or
# even halves: the layout of every case FSDP2 makes.
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 8), torch.nn.Linear(8, 1),
                            torch.nn.Embedding(11, 3))
full = {n: p.detach().clone() for n, p in model.named_parameters()}
for layer in model:
    fully_shard(layer)
fully_shard(model)
per_tensor = dict(iter_full_params(model))
for bucket_bytes in (1, 64, 1 << 20):  # one tensor each, a few per bucket, all in one
    bucketed = dict(iter_full_params(model, bucket_bytes=bucket_bytes))
    assert list(bucketed) == list(full), list(bucketed)
    for name in full:
        assert torch.equal(bucketed[name], full[name]), (bucket_bytes, name)
        assert torch.equal(per_tensor[name], full[name]), name
# gathered in a bf16 engine's dtype: cast shard by shard, the values of the full tensor's cast
for bucket_bytes in (0, 1 << 20):
    wire = dict(iter_full_params(model, bucket_bytes=bucket_bytes, dtype=torch.bfloat16))
    for name in full:
        assert wire[name].dtype == torch.bfloat16 and torch.equal(wire[name], full[name].bfloat16()), name
print("BUCKETS OK", info.rank, flush=True)
gdist.finish_worker()  # barrier, destroy, exit without finalization (no exit abort)
"""


def test_bucketed_and_engine_dtype_gathers_equal_the_full_tensors_under_fsdp2():
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python", sys.executable]
    result = subprocess.run([*launcher, "-c", BUCKET_SCRIPT], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("BUCKETS OK") == 2


def test_iter_full_params_without_names_filter_is_every_parameter():
    lm = load_policy(resolve_model_path("micro-llama"))
    assert [n for n, _ in iter_full_params(lm)] == [n for n, _ in lm.named_parameters()]
    assert [n for n, _ in iter_full_params(lm, names={"model.norm.weight"})] == ["model.norm.weight"]
