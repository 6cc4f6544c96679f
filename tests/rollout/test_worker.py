"""grailcore/rollout/worker.py: the worker's first sync sends every weight, later ones only
the layers training changes, and a sync happens only when the policy is stale."""

from __future__ import annotations

import torch

from grailcore.build import _freeze_below
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.rollout.hf import HFEngine
from grailcore.rollout.worker import RolloutWorker


class NamesEngine(HFEngine):
    """A separate-copy HF engine (a sharded run's engine) that keeps each push's names."""

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, shares_weights=False)
        self.pushes: list[list[str]] = []

    def update_weights(self, named_tensors):
        named = list(named_tensors)
        self.pushes.append([name for name, _ in named])
        super().update_weights(named)


def test_worker_sends_everything_once_then_the_trainable_layers_when_stale():
    path = resolve_model_path("tiny-llama")
    policy = load_policy(path)
    _freeze_below(policy, 1)
    engine = NamesEngine(load_policy(path).eval(), load_tokenizer(path))
    worker = RolloutWorker(engine, policy, bucket_bytes=1 << 20)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}

    worker.sync()  # e.g. after a resume: the engine started from the model dir
    worker.sync_if_stale()  # nothing changed since: no push
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name in trainable:
                p.add_(0.01)
    worker.mark_stale()
    worker.sync_if_stale()

    assert len(engine.pushes) == 2
    assert engine.pushes[0] == [n for n, _ in policy.named_parameters()]
    assert set(engine.pushes[1]) == trainable and len(trainable) < len(engine.pushes[0])
    engine_weights = dict(engine.model.named_parameters())
    assert all(torch.equal(engine_weights[n], p) for n, p in policy.named_parameters())
    assert not worker.stale
