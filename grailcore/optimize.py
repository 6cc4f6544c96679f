"""One policy update from a step's micro-batches: old/reference log-probs, the GRPO
loss with gradient accumulation, clipping, a NaN guard and the optimizer step."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

from grailcore import dist as gdist
from grailcore.batch import Batch
from grailcore.config import Config
from grailcore.loss import LossOutput, PolicyTerms, fused_loss, grpo_loss, step_normalizers
from grailcore.policy import PolicyModel
from grailcore.slot_nll import slot_nll
from grailcore.token_logprobs import logprob_head
from kernels.objective import Objective, merge_stats, summarize


class BadStepsError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class UpdateStats:
    loss: float = 0.0
    kl: float = 0.0
    clip_fraction: float = 0.0
    entropy: float = 0.0
    grad_norm: float = 0.0
    logprob_diff: float = 0.0
    """Mean |engine - trainer| log-prob of sampled tokens (trainer: before the update)."""
    mismatch_kl: float = 0.0
    """k3 estimate of KL(engine || trainer) from the engine's samples, per token."""
    is_capped_fraction: float = 0.0
    """Tokens whose engine importance weight hit grpo.engine_is_cap (0 with the correction off)."""
    is_dropped_fraction: float = 0.0
    """Tokens of sequences dropped by grpo.engine_seq_band (0 with the correction off)."""
    slot_nll: float = 0.0
    """Mean NLL of the person's label at the trained slots (grpo.slot_nll_coef > 0)."""
    slots: int = 0
    """Slots in the step's slot term on this rank."""
    tokens: int = 0
    skipped: bool = False
    forward_backward_s: float = 0.0
    """Wall seconds of the policy's forward + backward passes (the model FLOPs)."""
    optimizer_s: float = 0.0
    """Wall seconds of grad clipping, the optimizer step and zero_grad."""

    def add_sums(self, sums: dict) -> None:
        """Fill the loss statistics from the step's merged `LossOutput.sums`."""
        means = summarize(sums)
        self.tokens = int(sums["tokens"])
        for name, key in (("kl", "kl"), ("clip_fraction", "clip_fraction"), ("entropy", "entropy"),
                          ("logprob_diff", "engine_abs_diff"), ("mismatch_kl", "mismatch_kl"),
                          ("is_capped_fraction", "is_capped_fraction"),
                          ("is_dropped_fraction", "is_dropped_fraction")):
            if key in means:
                setattr(self, name, float(means[key]))
        if "slots" in sums:
            self.slots = int(sums["slots"])
            self.slot_nll = float(sums["slot_nll"]) / max(1, self.slots)


def engine_correction_on(cfg: Config) -> bool:
    """grpo.engine_is_correction resolved: auto = on when engine and trainer can differ."""
    if cfg.grpo.engine_is_correction == "auto":
        return cfg.rollout.engine == "vllm" or cfg.rollout.sync_every > 1
    return cfg.grpo.engine_is_correction == "on"


def build_objective(cfg: Config) -> Objective:
    """The objective's hyper-parameters from the config (the one place that reads them)."""
    correction = engine_correction_on(cfg)
    return Objective(
        policy_loss=cfg.grpo.policy_loss, epsilon_low=cfg.grpo.epsilon_low, epsilon_high=cfg.grpo.epsilon_high,
        beta=cfg.grpo.beta, kl_estimator=cfg.grpo.kl_estimator,
        engine_is_cap=cfg.grpo.engine_is_cap if correction else None,
        engine_seq_band=cfg.grpo.engine_seq_band if correction else None,
    )


def _logprobs(model, batch: Batch, cfg: Config) -> torch.Tensor:
    """[b, T] log-probs of the batch's completion tokens under `model`."""
    return model(batch.input_ids, batch.attention_mask, batch.num_completion_tokens,
                 temperature=cfg.rollout.temperature, completion_mask=batch.completion_mask,
                 prefix_sharing=cfg.grpo.prefix_sharing).logprobs


@torch.no_grad()
def _frozen_logprobs(model, batches: list[Batch], cfg: Config) -> list[torch.Tensor]:
    return [_logprobs(model, b, cfg) for b in batches]


def micro_batch_loss(model: PolicyModel, batch: Batch, terms: PolicyTerms, objective: Objective,
                     cfg: Config, slot_scale: float = 0.0) -> LossOutput:
    """One micro-batch's loss, with its entropy summed: fused from the hidden states when
    model.impl == "fused" (no [tokens, vocab] tensor), else the reference: full log-probs,
    then the plain-torch loss. slot_scale > 0 adds slot_scale times the summed slot NLL of
    `batch.slots` (grailcore/slot_nll.py; sums "slot_nll" and "slots")."""
    args = (batch.input_ids, batch.attention_mask, batch.num_completion_tokens)
    kwargs = dict(temperature=cfg.rollout.temperature, completion_mask=batch.completion_mask,
                  prefix_sharing=cfg.grpo.prefix_sharing)
    if model.impl == "fused":
        head = functools.partial(fused_loss, terms=terms, objective=objective, compute_entropy=True)
    else:
        def head(tokens, *, temperature, chunk_size):
            out = logprob_head(tokens, temperature=temperature, impl=model.impl, chunk_size=chunk_size,
                               return_entropy=True)
            result = grpo_loss(out.logprobs, terms, objective)
            entropy = torch.where(terms.mask, out.entropy.detach(), 0.0).sum()
            return LossOutput(result.loss, result.sums | {"entropy": entropy})
    if slot_scale and batch.slots is not None:
        policy_head = head

        def head(tokens, *, temperature, chunk_size):
            out = policy_head(tokens, temperature=temperature, chunk_size=chunk_size)
            nll = slot_nll(tokens, batch.slots, temperature)
            return LossOutput(out.loss + slot_scale * nll.sum(), out.sums | {
                "slot_nll": nll.detach().sum(), "slots": torch.tensor(float(nll.shape[0]))})
    return model(*args, loss=head, **kwargs)


def _global_items(local_items: float, world_size: int) -> float:
    """dapo normalises by the token count of the whole step across ranks; gradients are
    averaged over ranks, so each rank divides by global / world_size."""
    if world_size == 1:
        return local_items
    return float(gdist.all_reduce(torch.tensor([local_items], dtype=torch.float64))) / world_size


def policy_update(model: PolicyModel, ref_model: PolicyModel | None, optimizer, scheduler, batches: list[Batch], cfg: Config,
                  world_size: int = 1) -> list[UpdateStats]:
    """`num_iterations` optimizer steps on the same rollouts; one UpdateStats each."""
    objective = build_objective(cfg)
    if objective.engine_is_cap is not None and any(b.engine_logprobs is None for b in batches):
        raise ValueError("grpo.engine_is_correction is on but the engine returned no log-probs; "
                         "use an engine that reports them or set grpo.engine_is_correction=off")
    norm = step_normalizers([b.completion_mask for b in batches])
    # bnpo normalises by this rank's tokens; dapo by the whole step's (see grailcore.loss).
    num_items = _global_items(norm.num_items, world_size) if cfg.grpo.loss_type == "dapo" else norm.num_items
    # The slot term is a mean over the step's slots (across ranks: gradients are averaged).
    slots = sum(len(b.slots) for b in batches if b.slots is not None)
    slot_norm = _global_items(float(slots), world_size) if cfg.grpo.slot_nll_coef else 0.0
    slot_scale = cfg.grpo.slot_nll_coef / slot_norm if slot_norm > 0 else 0.0
    old = _frozen_logprobs(model, batches, cfg) if cfg.grpo.num_iterations > 1 else [None] * len(batches)
    ref = _frozen_logprobs(ref_model, batches, cfg) if objective.beta > 0 else [None] * len(batches)
    terms = [PolicyTerms.build(b.completion_mask, b.advantages, loss_type=cfg.grpo.loss_type, old_logprobs=old_lp,
                               ref_logprobs=ref_lp, engine_logprobs=b.engine_logprobs,
                               max_completion_length=cfg.rollout.max_completion_tokens, num_items=num_items,
                               num_sequences=norm.num_sequences)
             for b, old_lp, ref_lp in zip(batches, old, ref)]
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for _ in range(cfg.grpo.num_iterations):
        stats, sums, loss = UpdateStats(), {}, 0.0
        started = time.perf_counter()
        for b, t in zip(batches, terms):
            out = micro_batch_loss(model, b, t, objective, cfg, slot_scale)
            out.loss.backward()
            sums, loss = merge_stats(sums, out.sums), loss + float(out.loss.detach())
        stats.add_sums(sums)
        stats.loss = loss  # what was backpropagated, for the non-finite guard
        stats.forward_backward_s = time.perf_counter() - started
        started = time.perf_counter()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        stats.grad_norm = float(grad_norm)
        stats.skipped = not (torch.isfinite(grad_norm) and torch.isfinite(torch.tensor(stats.loss)))
        if not stats.skipped:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        stats.optimizer_s = time.perf_counter() - started
        results.append(stats)
    return results


def build_optimizer(model, cfg: Config, total_updates: int):
    """AdamW + linear warmup then constant or cosine decay, stepped once per update."""
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates every tensor in one pass (about 5x faster than foreach for
    # SmolLM2 on CPU, bench/RESULTS.md); it covers CPU and CUDA float tensors and DTensors.
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                for p in params)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas,
                                  weight_decay=cfg.optim.weight_decay, fused=fused)
    warmup, schedule = cfg.optim.warmup_steps, cfg.optim.schedule

    def factor(update: int) -> float:
        if warmup and update < warmup:
            return (update + 1) / warmup
        if schedule == "cosine":
            progress = (update - warmup) / max(1, total_updates - warmup)
            return 0.5 * (1.0 + torch.cos(torch.tensor(torch.pi * min(1.0, progress))).item())
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler
