"""policy_update: the fused GRPO loss in the step equals the naive reference for every
loss (and never holds or recomputes [tokens, vocab] logits), the engine importance-sampling
correction; build_optimizer: fused AdamW and the warmup + cosine / constant schedule."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from grailcore.batch import micro_batches
from grailcore.config import Config, GRPOConfig, ModelConfig, OptimConfig, RolloutConfig
from grailcore.loss import LOSS_TYPES
from grailcore.model import load_policy, resolve_model_path
from grailcore.optimize import build_objective, build_optimizer, engine_correction_on, policy_update
from grailcore.policy import PolicyModel
from grailcore.types import Completion


def _cfg(**optim) -> Config:
    return Config(optim=OptimConfig(**{"lr": 1e-2, "weight_decay": 0.1, **optim}))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def test_cpu_float_parameters_get_the_fused_optimizer_with_the_same_updates():
    fused_model, reference = _model(), _model()
    optimizer, _ = build_optimizer(fused_model, _cfg(), total_updates=10)
    assert optimizer.defaults["fused"] is True
    foreach = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    for _ in range(5):
        for model, opt in ((fused_model, optimizer), (reference, foreach)):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(fused_model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(fused_model[0].weight, _model()[0].weight)  # it did train


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_then_schedule(schedule):
    optimizer, scheduler = build_optimizer(_model(), _cfg(warmup_steps=2, schedule=schedule), total_updates=6)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    decay = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)] if schedule == "cosine" else [1.0] * 4
    assert lrs == pytest.approx([1e-2 * f for f in [0.5, 1.0] + decay])


# ---- policy_update: the fused loss in the step equals the naive reference -------------------

GROUP_SIZE, MICRO_BATCH_SIZE, MAX_COMPLETION_TOKENS, CHUNK_SIZE = 3, 4, 7, 5
PROMPT_LENGTHS = [9, 4, 13]
COMPLETION_LENGTHS = [[6, 2, 7], [0, 5, 1], [7, 3, 4]]  # one empty completion; 9 rows -> 4 + 4 + 1


def _lm():
    lm = load_policy(resolve_model_path("micro-llama"), "float32", "sdpa")
    lm.config.use_cache = False
    return lm.train()


def _batches(vocab: int, engine_shift: float = 0.0, slots: bool = False):
    """Fixed rollouts as the loop's micro-batches; engine log-probs random in [-1, 0];
    slots: an answer slot (3 labels of random tokens) at each non-empty completion's middle."""
    gen = torch.Generator().manual_seed(0)
    prompt_ids, completions = [], []
    for p_len, lengths in zip(PROMPT_LENGTHS, COMPLETION_LENGTHS):
        prompt = torch.randint(1, vocab, (p_len,), generator=gen).tolist()
        for n in lengths:
            prompt_ids.append(prompt)
            completions.append(Completion(text="", token_ids=tuple(torch.randint(1, vocab, (n,), generator=gen).tolist()),
                                          logprobs=tuple((-torch.rand(n, generator=gen)).tolist()), finish_reason="stop"))
    advantages = torch.randn(len(completions), generator=gen)
    labels = tuple((int(t),) for t in torch.randperm(vocab, generator=gen)[:3])
    positions = [[(len(c.token_ids) // 2, labels, i % 3)] if c.token_ids else [] for i, c in enumerate(completions)]
    return micro_batches(prompt_ids, completions, advantages, pad_id=0, micro_batch_size=MICRO_BATCH_SIZE,
                         slots=positions if slots else None)


class _GradRecorder:
    """Stands in for the optimizer: keeps each update's gradients, changes no weight."""

    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


class _NoSchedule:
    def step(self):
        pass


def _grpo_cfg(**grpo) -> Config:
    grpo = {"group_size": GROUP_SIZE, **grpo}
    return Config(model=ModelConfig(gradient_checkpointing=False),
                  rollout=RolloutConfig(temperature=0.7, max_completion_tokens=MAX_COMPLETION_TOKENS),
                  grpo=GRPOConfig(**grpo), optim=OptimConfig(grad_clip=1e9))  # raw gradients, not clipped ones


def _update(lm, impl: str, cfg: Config, batches, ref_lm=None):
    model = PolicyModel(lm, impl, chunk_size=CHUNK_SIZE)
    ref = None if ref_lm is None else PolicyModel(ref_lm, impl)
    recorder = _GradRecorder(model)
    stats = policy_update(model, ref, recorder, _NoSchedule(), batches, cfg)
    return stats, recorder.grads


def _assert_same_update(expected, actual):
    (stats_e, grads_e), (stats_a, grads_a) = expected, actual
    assert len(stats_e) == len(stats_a) == len(grads_e) == len(grads_a)
    for a, b in zip(stats_e, stats_a):
        assert a.tokens == b.tokens > 0
        for name in ("loss", "entropy", "clip_fraction", "kl", "grad_norm", "logprob_diff", "mismatch_kl",
                     "is_capped_fraction", "is_dropped_fraction"):
            assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-5, abs=1e-6), name
    for g_e, g_a in zip(grads_e, grads_a):
        assert g_e.keys() == g_a.keys() and len(g_e) > 0
        for name in g_e:
            scale = max(float(g_e[name].abs().max()), 1.0)
            err = float((g_e[name] - g_a[name]).abs().max())
            assert err <= 1e-5 * scale, f"{name}: max |diff| {err:.2e}"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_fused_step_equals_the_naive_step(loss_type):
    lm = _lm()
    cfg = _grpo_cfg(loss_type=loss_type)
    batches = _batches(lm.config.vocab_size)
    _assert_same_update(_update(lm, "naive", cfg, batches), _update(lm, "fused", cfg, batches))


@pytest.mark.parametrize("grpo", [
    dict(loss_type="dapo", beta=0.05, kl_estimator="k3", num_iterations=2),
    dict(loss_type="grpo", beta=0.05, kl_estimator="k1", num_iterations=2, prefix_sharing=False),
    dict(loss_type="grpo", policy_loss="gspo", epsilon_low=0.002, epsilon_high=0.003, num_iterations=2,
         engine_is_correction="on", engine_is_cap=1.5, engine_seq_band=(0.6, 1.6)),
    dict(loss_type="dapo", policy_loss="cispo", beta=0.05, kl_estimator="k2", engine_is_correction="on",
         engine_is_cap=1.5),
], ids=["kl-k3-iterations", "kl-k1-padded", "gspo-correction", "cispo-kl-k2-correction"])
def test_fused_step_equals_the_naive_step_with_kl_iterations_and_policy_losses(grpo):
    """KL on (a perturbed reference), num_iterations > 1 (old log-probs), GSPO (its 7-token
    sequences exceed the 5-row chunks: the kernel's two passes), CISPO, the engine correction."""
    lm = _lm()
    ref_lm = copy.deepcopy(lm).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref_lm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = _grpo_cfg(**grpo)
    batches = _engine_near(lm, _batches(lm.config.vocab_size), cfg, noise=0.3)
    naive = _update(lm, "naive", cfg, batches, ref_lm)
    _assert_same_update(naive, _update(lm, "fused", cfg, batches, ref_lm))
    if grpo.get("beta"):
        assert naive[0][0].kl != 0
    if grpo.get("engine_is_correction") == "on":
        assert naive[0][0].is_capped_fraction > 0


class _LogitRecorder(TorchDispatchMode):
    """Records the row count of every matmul whose output is logits, [rows, vocab] or
    transposed [vocab, rows], and the most rows of any such tensor an op makes (the
    [vocab, hidden] head, its views and its gradient excluded)."""

    def __init__(self, vocab, hidden):
        super().__init__()
        self.vocab, self.hidden, self.logit_matmuls, self.largest_rows = vocab, hidden, [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and isinstance(out, torch.Tensor) and out.dim() == 2 and self.vocab in out.shape:
            rows = out.shape[1] if out.shape[0] == self.vocab else out.shape[0]
            if rows != self.hidden:
                self.largest_rows = max(self.largest_rows, rows)
                if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
                    self.logit_matmuls.append(rows)
        return out


@pytest.mark.parametrize("prefix_sharing,slot_term", [(True, False), (False, False), (True, True)])
def test_the_training_step_never_holds_token_by_vocab_logits_nor_recomputes_them(prefix_sharing, slot_term):
    """Fused: each chunk's logits are computed once (no recompute in backward) and no tensor
    is wider than a chunk, with the slot term too (it reads only its labels' logits); the
    naive reference does hold [tokens, vocab]."""
    lm = _lm()
    vocab, hidden = lm.config.vocab_size, lm.config.hidden_size
    batches = _batches(vocab, slots=slot_term)
    cfg = _grpo_cfg(prefix_sharing=prefix_sharing, slot_nll_coef=0.5 if slot_term else 0.0)
    assert sum(len(b.slots) for b in batches if b.slots is not None) == (8 if slot_term else 0)
    chunks = sum(math.ceil(int(b.completion_mask.sum()) / CHUNK_SIZE) for b in batches)
    with _LogitRecorder(vocab, hidden) as fused:
        _update(lm, "fused", cfg, batches)
    assert len(fused.logit_matmuls) == chunks, fused.logit_matmuls
    assert fused.largest_rows <= CHUNK_SIZE
    with _LogitRecorder(vocab, hidden) as naive:
        _update(lm, "naive", cfg, batches)
    assert naive.largest_rows >= max(int(b.completion_mask.sum()) for b in batches)


def _engine_near(lm, batches, cfg, noise):
    """The batches with engine log-probs = the trainer's + noise * N(0, 1) per token."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model = PolicyModel(lm, "naive")
        own = [model(b.input_ids, b.attention_mask, b.num_completion_tokens, temperature=cfg.rollout.temperature,
                     completion_mask=b.completion_mask).logprobs for b in batches]
    return [dataclasses.replace(b, engine_logprobs=e + noise * torch.randn(e.shape, generator=gen))
            for b, e in zip(batches, own)]


def _stale_engine_batches(lm, batches, cfg):
    """The batches with engine log-probs from different weights (a stale engine)."""
    stale = copy.deepcopy(lm).eval()
    with torch.no_grad():
        for p in stale.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model = PolicyModel(stale, "naive")
        engine = [model(b.input_ids, b.attention_mask, b.num_completion_tokens, temperature=cfg.rollout.temperature,
                        completion_mask=b.completion_mask).logprobs for b in batches]
    return [dataclasses.replace(b, engine_logprobs=e) for b, e in zip(batches, engine)]


def test_stale_engine_correction_changes_the_gradient_as_its_formula_says():
    """grad of sum_t w_t * agg_t * (-A exp(logp - sg(logp))) with w_t = min(exp(logp_t - engine_t), C),
    0 for sequences whose mean log-ratio leaves log(band), written here by hand."""
    torch.manual_seed(0)
    lm = _lm()
    cap, band = 1.1, (0.85, 1.15)
    cfg = _grpo_cfg(loss_type="dapo", engine_is_correction="on", engine_is_cap=cap, engine_seq_band=band)
    batches = _stale_engine_batches(lm, _batches(lm.config.vocab_size), cfg)
    stats, (grads,) = _update(lm, "fused", cfg, batches)
    assert 0 < stats[0].is_capped_fraction < 1 and 0 < stats[0].is_dropped_fraction < 1
    off = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, engine_is_correction="off"))
    (without,) = _update(lm, "fused", off, batches)[1]
    lm.zero_grad(set_to_none=True)
    total_tokens = sum(float(b.completion_mask.sum()) for b in batches)
    model = PolicyModel(lm, "naive")
    for b in batches:
        logprobs = model(b.input_ids, b.attention_mask, b.num_completion_tokens, temperature=0.7,
                         completion_mask=b.completion_mask, prefix_sharing=True).logprobs
        mask = b.completion_mask.bool()
        log_w = (logprobs.detach() - b.engine_logprobs).masked_fill(~mask, 0.0)
        seq_ratio = torch.exp(log_w.sum(1) / mask.sum(1).clamp(min=1))
        keep = ((seq_ratio >= band[0]) & (seq_ratio <= band[1]))[:, None]
        weight = torch.exp(log_w).clamp(max=cap) * keep
        ratio = torch.exp(logprobs - logprobs.detach())
        ((weight * -b.advantages[:, None] * ratio)[mask].sum() / total_tokens).backward()
    changed = False
    for name, p in lm.named_parameters():
        name = f"lm.{name}"  # PolicyModel's names
        scale = max(float(p.grad.abs().max()), 1e-3)
        assert float((grads[name] - p.grad).abs().max()) <= 1e-5 * scale, name
        changed |= not torch.allclose(without[name], grads[name], rtol=1e-3, atol=1e-7)
    assert changed


def test_engine_correction_with_the_trainers_own_logprobs_is_a_no_op():
    lm = _lm()
    cfg = _grpo_cfg(loss_type="grpo", engine_is_correction="on")
    batches = _batches(lm.config.vocab_size)
    with torch.no_grad():
        model = PolicyModel(lm, "fused")
        own = [model(b.input_ids, b.attention_mask, b.num_completion_tokens, temperature=0.7,
                     completion_mask=b.completion_mask, prefix_sharing=True).logprobs for b in batches]
    batches = [dataclasses.replace(b, engine_logprobs=e) for b, e in zip(batches, own)]
    on = _update(lm, "fused", cfg, batches)
    off = _update(lm, "fused", dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, engine_is_correction="off")),
                  batches)
    assert on[0][0].is_capped_fraction == on[0][0].is_dropped_fraction == 0
    assert on[0][0].logprob_diff < 1e-5 and abs(on[0][0].mismatch_kl) < 1e-9
    _assert_same_update(off, on)


@pytest.mark.parametrize("engine, sync_every, setting, on", [
    ("hf", 1, "auto", False), ("vllm", 1, "auto", True), ("hf", 2, "auto", True), ("vllm", 1, "off", False),
    ("hf", 1, "on", True),
])
def test_engine_correction_defaults_on_where_engine_and_trainer_can_differ(engine, sync_every, setting, on):
    cfg = Config(rollout=RolloutConfig(engine=engine, sync_every=sync_every),
                 grpo=GRPOConfig(engine_is_correction=setting))
    objective = build_objective(cfg)
    assert engine_correction_on(cfg) is on
    assert (objective.engine_is_cap is not None) is on and (objective.engine_seq_band is not None) is on


def test_correction_without_engine_logprobs_is_refused():
    lm = _lm()
    cfg = _grpo_cfg(engine_is_correction="on")
    batches = [dataclasses.replace(b, engine_logprobs=None) for b in _batches(lm.config.vocab_size)]
    with pytest.raises(ValueError, match="grpo.engine_is_correction"):
        _update(lm, "fused", cfg, batches)
