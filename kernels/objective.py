"""The GRPO objective, written once: small pure functions over the tokens in the loss
(ratio, clip, KL estimator, engine importance weights, aggregation) and registries keyed
by name. `grailcore.loss` (plain torch, from log-probs) and `kernels.grpo_loss` (fused,
from hidden states, chunk by chunk) both call `objective_loss`.

Every per-token tensor is flat, [n]: only the tokens that enter the loss, in any order,
each tagged with the index of its sequence (`Tokens.sequence`). Sequence-level terms
(GSPO's ratio, the engine sequence mask) need every token of a sequence in one call."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

import torch

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
"""How per-token losses are reduced (see `aggregation_weights`)."""
PolicyLoss = Literal["grpo", "gspo", "cispo"]
"""The policy-gradient term per token (see `POLICY_LOSSES`)."""
KLEstimator = Literal["k1", "k2", "k3"]
"""Estimator of KL(policy || reference) from the policy's samples (see `KL_ESTIMATORS`)."""
LOSS_TYPES: tuple[str, ...] = get_args(LossType)


@dataclasses.dataclass(frozen=True)
class Objective:
    """The hyper-parameters of the objective; `grailcore.optimize` builds it from the config."""

    policy_loss: PolicyLoss = "grpo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    """Clip range [1 - epsilon_low, 1 + epsilon_high] of the ratio (grpo: per token, gspo: per
    sequence); cispo caps its weight at 1 + epsilon_high and has no lower bound."""
    beta: float = 0.0
    """KL weight; > 0 needs reference log-probs."""
    kl_estimator: KLEstimator = "k3"
    engine_is_cap: float | None = None
    """Truncated importance sampling against the engine: each token's policy loss is scaled
    by min(exp(old - engine), cap). None: no correction (the diagnostics are still summed)."""
    engine_seq_band: tuple[float, float] | None = None
    """With the correction on: drop (weight 0) a sequence whose geometric-mean ratio
    exp(mean(old - engine)) lies outside [low, high]. None: keep every sequence."""

    def __post_init__(self):
        problems = []
        if self.policy_loss not in POLICY_LOSSES:
            problems.append(f"policy_loss must be one of {tuple(POLICY_LOSSES)}, got {self.policy_loss!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            problems.append(f"kl_estimator must be one of {tuple(KL_ESTIMATORS)}, got {self.kl_estimator!r}")
        if self.epsilon_low < 0 or self.epsilon_high < 0 or self.beta < 0:
            problems.append("epsilon_low, epsilon_high and beta must be >= 0")
        if self.engine_is_cap is not None and not self.engine_is_cap >= 1:
            problems.append(f"engine_is_cap must be >= 1 (a cap below 1 down-weights every token), got {self.engine_is_cap}")
        if self.engine_seq_band is not None and not 0 <= self.engine_seq_band[0] <= 1 <= self.engine_seq_band[1]:
            problems.append(f"engine_seq_band must be (low, high) with 0 <= low <= 1 <= high, got {self.engine_seq_band}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def sequence_level(self) -> bool:
        """Whether a token's gradient depends on the other tokens of its sequence."""
        return self.policy_loss == "gspo" or (self.engine_is_cap is not None and self.engine_seq_band is not None)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """Everything the per-token loss needs besides the current log-probs; each tensor [n]."""

    sequence: torch.Tensor
    """long: index of the token's sequence, in [0, num_sequences)."""
    advantages: torch.Tensor
    """The token's advantage (its sequence's, unless the caller gave one per token)."""
    weights: torch.Tensor
    """Aggregation weights: the loss is sum(weights * token_loss)."""
    old_logprobs: torch.Tensor | None = None
    """Trainer log-probs before this update; None: on-policy, the current ones detached."""
    ref_logprobs: torch.Tensor | None = None
    """Reference-model log-probs; None: no KL term."""
    engine_logprobs: torch.Tensor | None = None
    """The rollout engine's log-probs of the sampled tokens; None: no engine terms."""
    num_sequences: int = 1

    def take(self, rows: torch.Tensor) -> Tokens:
        """The tokens at positions `rows` [m]."""
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return dataclasses.replace(self, **{f.name: pick(getattr(self, f.name))
                                            for f in dataclasses.fields(self) if f.name != "num_sequences"})

    def float(self) -> Tokens:
        """The float fields in fp32 (kernels compute in fp32 whatever the caller's dtype)."""
        cast = lambda x: None if x is None else x.float()  # noqa: E731
        return dataclasses.replace(self, advantages=cast(self.advantages), weights=cast(self.weights),
                                   old_logprobs=cast(self.old_logprobs), ref_logprobs=cast(self.ref_logprobs),
                                   engine_logprobs=cast(self.engine_logprobs))

    @staticmethod
    def gather(index, seq_len, advantages, weights, old=None, ref=None, engine=None) -> Tokens:
        """Tokens at flat positions `index` [n] (b * seq_len + t) of [B, T] tensors;
        advantages [B] (one per sequence) or [B, T] (per token). Values at other positions
        (padding: maybe inf/nan) are never read."""
        flat = lambda x: None if x is None else _float(x.reshape(-1)[index])  # noqa: E731
        sequence = torch.div(index, seq_len, rounding_mode="floor")
        per_token = flat(advantages) if advantages.dim() == 2 else _float(advantages)[sequence]
        return Tokens(sequence=sequence, advantages=per_token, weights=flat(weights),
                      old_logprobs=flat(old), ref_logprobs=flat(ref), engine_logprobs=flat(engine),
                      num_sequences=advantages.shape[0])


def _float(x):
    # fp64 stays fp64 so tests can build an fp64 ground truth.
    return x.to(torch.promote_types(x.dtype, torch.float32))


def padded_tokens(mask, advantages, *, loss_type, targets=None, old_logprobs=None, ref_logprobs=None,
                  engine_logprobs=None, max_completion_length=None, num_items=None, num_sequences=None):
    """The masked positions [K] (flat, b * T + t) of a [B, T] batch and their `Tokens`, with
    `aggregation_weights`; targets/old/ref/engine [B, T] or None, advantages [B] or [B, T].
    Checks shapes."""
    batch_seq = tuple(mask.shape)
    if targets is not None and tuple(targets.shape) != batch_seq:
        raise ValueError(f"mask must be [B, T]={tuple(targets.shape)} like targets, got {batch_seq}")
    named = (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs), ("engine_logprobs", engine_logprobs))
    for name, value in named:
        if value is not None and tuple(value.shape) != batch_seq:
            raise ValueError(f"{name} must be [B, T]={batch_seq} like the mask, got {tuple(value.shape)}")
    if mask.dim() != 2 or tuple(advantages.shape) not in (batch_seq[:1], batch_seq):
        raise ValueError(f"advantages must be [B] or [B, T] and the mask [B, T]; got {tuple(advantages.shape)} "
                         f"and {batch_seq}")
    weights = aggregation_weights(mask, loss_type, max_completion_length=max_completion_length,
                                  num_items=num_items, num_sequences=num_sequences)
    index = mask.bool().reshape(-1).nonzero().squeeze(1)  # [K]
    tokens = Tokens.gather(index, batch_seq[1], advantages, weights, old_logprobs, ref_logprobs, engine_logprobs)
    return index, tokens


def aggregation_weights(mask, loss_type, *, max_completion_length=None, num_items=None, num_sequences=None):
    """[B, T] fp32 weights w such that sum(w * token_loss) is the `loss_type` reduction of a
    [B, T] per-token loss over the 0/1 mask:

      grpo     sum_i (mean over sequence i's tokens) / num_sequences
      bnpo     token sum / num_items
      dapo     token sum / num_items (callers pass the step's global count / world size)
      dr_grpo  token sum / (num_sequences * max_completion_length)

    num_sequences and num_items default to this batch's B and token count; pass the step's
    values when gradients accumulate over micro-batches. A sequence without tokens still
    counts in num_sequences."""
    mask = mask.bool()
    weights = mask.float()
    num_sequences = mask.shape[0] if num_sequences is None else num_sequences
    if loss_type == "grpo":
        return weights / (mask.sum(-1, keepdim=True).clamp(min=1) * num_sequences)
    if loss_type in ("bnpo", "dapo"):
        return weights / (mask.sum().clamp(min=1) if num_items is None else num_items)
    if loss_type == "dr_grpo":
        if max_completion_length is None or max_completion_length < mask.shape[1]:
            raise ValueError(f"loss_type='dr_grpo' needs max_completion_length >= T={mask.shape[1]}, "
                             f"got {max_completion_length}")
        return weights / (num_sequences * max_completion_length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def sequence_mean(values, sequence, num_sequences):
    """Mean of `values` [n] over each sequence's tokens: [num_sequences] (0 if it has none)."""
    sums = values.new_zeros(num_sequences).index_add(0, sequence, values)
    counts = values.new_zeros(num_sequences).index_add_(0, sequence, torch.ones_like(values))
    return sums / counts.clamp(min=1)


def clipped_surrogate(ratio, advantages, epsilon_low, epsilon_high):
    """PPO's per-token -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) and where the
    clip removed the gradient: (loss, clipped_low, clipped_high)."""
    clipped_ratio = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    return loss, (ratio < 1 - epsilon_low) & (advantages < 0), (ratio > 1 + epsilon_high) & (advantages > 0)


def _grpo_policy(logprobs, old, tokens, objective):
    """Token-level ratio r_t = exp(logp_t - old_t), clipped (DeepSeekMath eq. 3)."""
    ratio = torch.exp(logprobs - old)
    return (*clipped_surrogate(ratio, tokens.advantages, objective.epsilon_low, objective.epsilon_high), ratio)


def _gspo_policy(logprobs, old, tokens, objective):
    """GSPO (Zheng et al. 2025, eq. 5-7): one ratio per sequence, s_i = exp(mean_t(logp - old)),
    clipped like PPO's; every token of sequence i carries -min(s_i A_i, clip(s_i) A_i)."""
    log_ratio = sequence_mean(logprobs - old, tokens.sequence, tokens.num_sequences)  # [S]
    ratio = torch.exp(log_ratio)[tokens.sequence]  # [n]
    return (*clipped_surrogate(ratio, tokens.advantages, objective.epsilon_low, objective.epsilon_high), ratio)


def _cispo_policy(logprobs, old, tokens, objective):
    """CISPO (MiniMax-M1, eq. 4): -sg(min(r_t, 1 + epsilon_high)) A log p_t. The clipped
    weight caps the step size but, unlike PPO's clip, never drops a token's gradient."""
    ratio = torch.exp(logprobs.detach() - old)
    capped = ratio > 1 + objective.epsilon_high
    weight = ratio.clamp(max=1 + objective.epsilon_high)
    return -weight * tokens.advantages * logprobs, torch.zeros_like(capped), capped, ratio


POLICY_LOSSES = {"grpo": _grpo_policy, "gspo": _gspo_policy, "cispo": _cispo_policy}
"""name -> fn(logprobs, old, tokens, objective) -> (token_loss, clipped_low, clipped_high, ratio)."""
assert tuple(POLICY_LOSSES) == get_args(PolicyLoss)


def _k1(log_ratio):
    return -log_ratio


def _k2(log_ratio):
    return 0.5 * log_ratio**2


def _k3(log_ratio):
    return torch.exp(log_ratio) - log_ratio - 1


KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3}
"""name -> fn(log r) with log r = ref - logp, per token (Schulman, "Approximating KL
divergence"): k1 = -log r (unbiased, can be < 0), k2 = (log r)^2 / 2, k3 = r - 1 - log r
(unbiased, >= 0)."""
assert tuple(KL_ESTIMATORS) == get_args(KLEstimator)


def kl_estimate(logprobs, ref_logprobs, estimator="k3"):
    """Per-token estimate of KL(policy || reference) from tokens sampled from the policy."""
    return KL_ESTIMATORS[estimator](ref_logprobs - logprobs)


def engine_importance_weights(behaviour, engine, tokens, objective):
    """Per-token weights [n] correcting for sampling from the engine rather than the trainer
    (truncated IS, Yao et al. 2025; verl's rollout correction): min(exp(behaviour - engine),
    cap), 0 for sequences whose geometric-mean ratio leaves `engine_seq_band`. Also returns
    (capped, dropped) token masks. All constant: no gradient."""
    log_ratio = behaviour - engine  # [n]
    capped = log_ratio > math.log(objective.engine_is_cap)
    weights = torch.exp(log_ratio).clamp(max=objective.engine_is_cap)
    dropped = torch.zeros_like(capped)
    if objective.engine_seq_band is not None:
        low, high = objective.engine_seq_band
        seq_ratio = torch.exp(sequence_mean(log_ratio, tokens.sequence, tokens.num_sequences))[tokens.sequence]
        dropped = (seq_ratio < low) | (seq_ratio > high)
        weights = weights.masked_fill(dropped, 0.0)
    return weights, capped, dropped


def objective_loss(logprobs, tokens: Tokens, objective: Objective):
    """The loss sum(tokens.weights * token_loss) of log-probs [n] (fp32, differentiable) and
    detached statistics of these tokens, as sums (and ratio_min/_max) that add up over calls
    (`merge_stats`). token_loss = engine IS weight * policy loss + beta * KL."""
    if objective.beta != 0 and tokens.ref_logprobs is None:
        raise ValueError(f"beta={objective.beta} needs reference log-probs (the KL term); pass them or set beta=0")
    behaviour = logprobs.detach() if tokens.old_logprobs is None else tokens.old_logprobs
    token_loss, clipped_low, clipped_high, ratio = POLICY_LOSSES[objective.policy_loss](
        logprobs, behaviour, tokens, objective)
    n = logprobs.shape[0]
    stats = {"tokens": logprobs.new_tensor(float(n)), "clipped_low": clipped_low.sum().float(),
             "clipped_high": clipped_high.sum().float(), "ratio": ratio.detach().sum(),
             "ratio_min": ratio.detach().amin() if n else logprobs.new_tensor(math.inf),
             "ratio_max": ratio.detach().amax() if n else logprobs.new_tensor(-math.inf)}
    if tokens.engine_logprobs is not None:
        stats.update(_engine_stats(behaviour, tokens.engine_logprobs))
        if objective.engine_is_cap is not None:
            weights, capped, dropped = engine_importance_weights(behaviour, tokens.engine_logprobs, tokens, objective)
            token_loss = token_loss * weights
            stats.update(is_capped=capped.sum().float(), is_dropped=dropped.sum().float())
    if tokens.ref_logprobs is not None:
        kl = kl_estimate(logprobs, tokens.ref_logprobs, objective.kl_estimator)
        stats["kl"] = kl.detach().sum()
        if objective.beta != 0:
            token_loss = token_loss + objective.beta * kl
    loss = (tokens.weights * token_loss).sum()
    stats["loss"] = loss.detach()
    return loss, stats


def _engine_stats(behaviour, engine):
    """|trainer - engine| and the k3 estimate of KL(engine || trainer) from the engine's
    samples (log r = trainer - engine), summed over tokens."""
    log_ratio = behaviour.detach() - engine
    return {"engine_abs_diff": log_ratio.abs().sum(), "mismatch_kl": _k3(log_ratio).sum()}


def merge_stats(total: dict, part: dict) -> dict:
    """Combine the statistics of two disjoint token sets."""
    out = dict(total)
    for name, value in part.items():
        if name not in out:
            out[name] = value
        elif name.endswith("_min"):
            out[name] = torch.minimum(out[name], value)
        elif name.endswith("_max"):
            out[name] = torch.maximum(out[name], value)
        else:
            out[name] = out[name] + value
    return out


def summarize(stats: dict) -> dict:
    """Means over the tokens of `objective_loss`'s (merged) sums: clip fractions, ratio
    mean/min/max (1 without tokens), and kl, entropy, engine_abs_diff, mismatch_kl,
    is_capped_fraction, is_dropped_fraction where summed."""
    tokens = stats["tokens"]
    count, has_tokens = tokens.clamp(min=1), tokens > 0
    one = torch.ones_like(tokens)
    means = {
        "clip_low_fraction": stats["clipped_low"] / count,
        "clip_high_fraction": stats["clipped_high"] / count,
        "clip_fraction": (stats["clipped_low"] + stats["clipped_high"]) / count,
        "ratio_mean": torch.where(has_tokens, stats["ratio"] / count, one),
        "ratio_min": torch.where(has_tokens, stats["ratio_min"], one),
        "ratio_max": torch.where(has_tokens, stats["ratio_max"], one),
    }
    for name in ("kl", "entropy", "engine_abs_diff", "mismatch_kl"):
        if name in stats:
            means[name] = stats[name] / count
    for name in ("is_capped", "is_dropped"):
        if name in stats:
            means[f"{name}_fraction"] = stats[name] / count
    return means
