"""`--dry-run`: exercise one step of the real pipeline without changing the model, then
print what a full run will cost. Builds nothing itself (setup.build did); renders
prompts, runs one rollout + reward pass and one loss forward/backward through
`grailcore.optimize.policy_update` with the optimizer step withheld (weights checked
unchanged), and summarises tokens and memory (an estimate and the measured peak RSS).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from grailcore.advantages import group_advantages
from grailcore.batch import micro_batches
from grailcore.config import Config
from grailcore.optimize import UpdateStats, policy_update
from grailcore.policy import PolicyModel
from grailcore.rollout.collect import collect_rollouts
from grailcore.setup import Parts
from grailcore.types import SamplingParams

log = logging.getLogger(__name__)
SUMMARY_FILE = "dry_run.json"
PROMPTS_RENDERED = 3
SHOWN_PROMPT_CHARS = 600


@dataclass(frozen=True)
class MemoryEstimate:
    """Rough bytes per rank for training (within ~2x; activations are the loose part)."""

    params: int
    grads: int
    optimizer_states: int
    """AdamW exp_avg + exp_avg_sq, kept in the parameter dtype."""
    activations: int
    """One micro-batch: the decoder's saved tensors plus the log-prob head's logits."""
    reference: int
    """A frozen reference model (grpo.beta > 0; 0 under LoRA, whose reference is the policy)."""
    engine: int
    """The rollout engine's own weights and KV cache (0 when it shares the policy's)."""

    @property
    def total(self) -> int:
        return sum(dataclasses.astuple(self))


def activation_bytes(tokens: int, hidden: int, intermediate: int, layers: int, vocab: int, dtype_bytes: int,
                     checkpointing: bool, fused_logprobs: bool, logprob_chunk: int) -> int:
    """Saved activations of one forward over `tokens` through `layers` decoder layers that
    keep them for backward (frozen layers run without autograd and keep none).

    Per token and layer a Llama-style block keeps about 8*hidden + 4*intermediate
    elements for backward (norm inputs/outputs, q/k/v/o, gate/up/act/product; sdpa keeps
    no [T, T] scores). With checkpointing only each layer's input is kept, plus one layer
    recomputed at a time. The head's fp32 logits (with their softmax and gradient, x3)
    cover all tokens on the naive path and `logprob_chunk` rows on the fused one.
    """
    per_layer = 8 * hidden + 4 * intermediate
    if checkpointing and layers:
        decoder = tokens * (hidden * layers + per_layer)
    else:
        decoder = tokens * per_layer * layers
    logit_rows = min(tokens, logprob_chunk) if fused_logprobs else tokens
    return decoder * dtype_bytes + 3 * logit_rows * vocab * 4


def _layers_with_grad(lm: torch.nn.Module) -> int:
    """Decoder layers with a trainable parameter (model.trainable_layers freezes the rest)."""
    layers = getattr(lm.get_decoder(), "layers", [])
    return sum(any(p.requires_grad for p in layer.parameters()) for layer in layers)


def estimate_memory(parts: Parts, cfg: Config, max_prompt_tokens: int) -> MemoryEstimate:
    """MemoryEstimate of this run per rank: FSDP shards params, grads and states over ranks."""
    params = list(parts.policy.parameters())
    numel = sum(p.numel() for p in params)  # global sizes, also for FSDP's DTensors
    trainable = sum(p.numel() for p in params if p.requires_grad)
    dtype_bytes = params[0].element_size()
    shards = parts.dist.world_size
    model_cfg = parts.policy.lm.config
    hidden = getattr(model_cfg, "hidden_size", 0)
    rows = cfg.optim.micro_batch_size
    # Prefix sharing runs each prompt once per group in the training forward.
    prompt_rows = -(-rows // cfg.grpo.group_size) if cfg.grpo.prefix_sharing else rows
    tokens = prompt_rows * max_prompt_tokens + rows * cfg.rollout.max_completion_tokens
    activations = activation_bytes(
        tokens, hidden, getattr(model_cfg, "intermediate_size", 4 * hidden), _layers_with_grad(parts.policy.lm),
        getattr(model_cfg, "vocab_size", 0), dtype_bytes,
        cfg.model.gradient_checkpointing, cfg.model.logprob_impl == "fused", cfg.model.logprob_chunk_size)
    full_weights = numel * dtype_bytes
    if cfg.rollout.engine == "vllm":
        engine = full_weights + cfg.rollout.vllm_kv_cache_bytes
    else:
        engine = 0 if shards == 1 else full_weights  # sharded ranks sample from a full copy
    return MemoryEstimate(
        params=full_weights // shards, grads=trainable * dtype_bytes // shards,
        optimizer_states=2 * trainable * dtype_bytes // shards, activations=activations,
        # Under LoRA the reference is the policy with its adapters off: no second copy.
        reference=full_weights // shards if isinstance(parts.reference, PolicyModel) else 0, engine=engine,
    )


class _Withheld:
    """An optimizer or scheduler whose `step` is a no-op (counted); everything else passes through."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.steps_withheld = 0

    def step(self, *args, **kwargs) -> None:
        self.steps_withheld += 1

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def _fingerprint(model: torch.nn.Module) -> list[tuple[float, float]]:
    """(sum, sum of squares) of this rank's shard of every parameter, in float64."""
    out = []
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            values = local.detach().double()
            out.append((float(values.sum()), float((values * values).sum())))
    return out


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _show_prompt(text: str) -> str:
    if len(text) <= SHOWN_PROMPT_CHARS:
        return text
    half = SHOWN_PROMPT_CHARS // 2
    return f"{text[:half]}\n  [... {len(text) - SHOWN_PROMPT_CHARS} chars ...]\n{text[-half:]}"


def _rollout(parts: Parts, cfg: Config):
    """One step's rollouts on this rank (its share of the prompts, as the loop draws them),
    their group advantages and the training micro-batches."""
    indices = parts.sampler.next(cfg.grpo.prompts_per_step)
    per_rank = len(indices) // parts.dist.world_size
    mine = indices[parts.dist.rank * per_rank:(parts.dist.rank + 1) * per_rank]
    params = SamplingParams(n=cfg.grpo.group_size, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                            max_tokens=cfg.rollout.max_completion_tokens, seed=cfg.seed * 1_000_003 + parts.dist.rank)
    rollouts = collect_rollouts(parts.engine, [parts.train[i] for i in mine], [parts.train_ids[i] for i in mine],
                                params, parts.scorer)
    adv = group_advantages(rollouts.rewards.total, cfg.grpo.group_size, cfg.grpo.scale_rewards)
    batches = micro_batches(rollouts.prompt_ids, rollouts.completions, adv.advantages, parts.tokenizer.pad_token_id,
                            cfg.optim.micro_batch_size, cfg.grpo.mask_truncated)
    return rollouts, adv, batches


def _loss_without_step(parts: Parts, cfg: Config, batches) -> tuple[UpdateStats, int]:
    """policy_update's forward/backward/clip with the optimizer and scheduler steps withheld;
    (its stats, steps withheld). Raises if the weights changed anyway."""
    before = _fingerprint(parts.policy)
    optimizer, scheduler = _Withheld(parts.optimizer), _Withheld(parts.scheduler)
    one_pass = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, num_iterations=1))
    update = policy_update(parts.policy, parts.reference, optimizer, scheduler, batches, one_pass,
                           parts.dist.world_size)[0]
    if _fingerprint(parts.policy) != before:
        raise RuntimeError("dry run changed the policy weights; the optimizer step must be withheld")
    return update, optimizer.steps_withheld


def dry_run(parts: Parts, cfg: Config) -> dict:
    """One rollout, reward pass and loss backward with no optimizer step; returns the summary
    (also printed and written to run_dir/dry_run.json on rank 0). Raises if weights changed."""
    rendered = [parts.tokenizer.decode(ids) for ids in parts.train_ids[:PROMPTS_RENDERED]]
    if any(not text.strip() for text in rendered):
        raise RuntimeError("a rendered prompt decodes to empty text; check the tokenizer's chat template")
    rollouts, adv, batches = _rollout(parts, cfg)
    update, withheld = _loss_without_step(parts, cfg, batches)
    summary = _summary(parts, cfg, rollouts, adv.zero_variance_groups, update, withheld)
    if parts.dist.rank == 0:
        _print_summary(summary, rendered[0])
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _summary(parts: Parts, cfg: Config, rollouts, zero_variance_groups: int, update: UpdateStats,
             withheld: int) -> dict:
    prompt_lengths = [len(ids) for ids in parts.train_ids]
    completion_lengths = [len(c.token_ids) for c in rollouts.completions]
    step_tokens = sum(len(p) for p in rollouts.prompt_ids) + sum(completion_lengths)  # this rank
    memory = estimate_memory(parts, cfg, max(prompt_lengths))
    summary = {
        "model": cfg.model.name_or_path,
        "parameters": sum(p.numel() for p in parts.policy.parameters()),
        "trainable_parameters": sum(p.numel() for p in parts.policy.parameters() if p.requires_grad),
        "world_size": parts.dist.world_size,
        "train_examples": len(parts.train),
        "eval_examples": len(parts.eval_examples),
        "prompt_tokens": {"mean": round(statistics.fmean(prompt_lengths), 1), "max": max(prompt_lengths)},
        "completion_tokens": {"mean": round(statistics.fmean(completion_lengths), 1), "max": max(completion_lengths),
                              "limit": cfg.rollout.max_completion_tokens},
        "tokens_per_step": {
            "measured": int(round(parts.reduce({"t": float(step_tokens)})["t"] * parts.dist.world_size)),
            "upper_bound": cfg.grpo.prompts_per_step * cfg.grpo.group_size
            * (max(prompt_lengths) + cfg.rollout.max_completion_tokens),
        },
        "reward": parts.reduce({"total": float(rollouts.rewards.total.mean()),
                                **{name: float(v.mean()) for name, v in rollouts.rewards.per_reward.items()}}),
        "sample_completion": rollouts.completions[0].text[:SHOWN_PROMPT_CHARS // 2],
        "zero_variance_groups": int(zero_variance_groups),
        "loss": update.loss,
        "grad_norm": update.grad_norm,
        "optimizer_steps_withheld": withheld,
        "weights_unchanged": True,
        "memory_estimate_bytes": {**dataclasses.asdict(memory), "total": memory.total},
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if parts.data_audit is not None:
        summary["data_audit"] = parts.data_audit.summary()
    if torch.cuda.is_available():
        summary["peak_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return summary


def _audit_lines(audit: dict | None) -> list[str]:
    """The leak audit's verdicts per dataset (raw / as trained) and the override when used."""
    if audit is None:
        return []
    lines = [f"{'data audit' if i == 0 else '':<19}{dataset}: " + ", ".join(f"{stage} {v}" for stage, v in stages.items())
             for i, (dataset, stages) in enumerate(audit["verdicts"].items())]
    if audit["leak_overridden"]:
        lines.append(f"{'':<19}LEAK allowed by --data.allow-leaks (data.allow_leaks=True): training on leaky data")
    return lines + [f"{'':<19}details in RUN_DIR/{audit['file']}"] if lines else lines


def _print_summary(s: dict, first_prompt: str) -> None:
    mem = s["memory_estimate_bytes"]
    lines = [
        "=== dry run: first prompt (rendered, truncated) ===",
        _show_prompt(first_prompt),
        "=== dry run summary ===",
        f"model              {s['model']}  ({s['parameters']:,} params, {s['trainable_parameters']:,} trainable)",
        f"data               {s['train_examples']} train / {s['eval_examples']} eval examples",
        f"prompt tokens      mean {s['prompt_tokens']['mean']}, max {s['prompt_tokens']['max']}",
        f"completion tokens  mean {s['completion_tokens']['mean']}, max {s['completion_tokens']['max']} "
        f"(limit {s['completion_tokens']['limit']})",
        f"tokens per step    {s['tokens_per_step']['measured']:,} measured, "
        f"<= {s['tokens_per_step']['upper_bound']:,} at the limits",
        f"sample completion  {s['sample_completion']!r}",
        f"reward             {', '.join(f'{k}={v:.3f}' for k, v in s['reward'].items())}",
        f"groups w/o signal  {s['zero_variance_groups']} (all completions scored alike: zero advantage)",
        f"loss / grad norm   {s['loss']:.4f} / {s['grad_norm']:.4f}  "
        f"(optimizer steps withheld: {s['optimizer_steps_withheld']}, weights unchanged)",
        "memory per rank    " + ", ".join(f"{k} {_gib(v)}" for k, v in mem.items() if k != "total")
        + f"; total ~{_gib(mem['total'])} (estimate)",
        f"peak RSS           {_gib(s['peak_rss_bytes'])} (measured)",
    ]
    if "peak_cuda_allocated_bytes" in s:
        lines.append(f"peak CUDA alloc    {_gib(s['peak_cuda_allocated_bytes'])} (measured)")
    lines += _audit_lines(s.get("data_audit"))
    print("\n".join(lines), flush=True)
