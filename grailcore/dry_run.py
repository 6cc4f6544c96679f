"""`--dry-run`: one step of the run's own step function (GRPO: rollout, rewards, loss
backward; SFT: target loss backward) with its update withheld, then what a full run will
cost. Renders prompts, checks the weights did not change, and summarises tokens and memory
(an estimate and the measured peak RSS).
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

from grailcore.config import Config
from grailcore.metrics_log import StepTimer
from grailcore.policy import PolicyModel
from grailcore.steps import StepOutput, Update
from grailcore.trainer import Trainer

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


def estimate_memory(trainer: Trainer, cfg: Config, max_prompt_tokens: int) -> MemoryEstimate:
    """MemoryEstimate of this run per rank: FSDP shards params, grads and states over ranks."""
    policy = trainer.policy.model
    params = list(policy.parameters())
    numel = sum(p.numel() for p in params)  # global sizes, also for FSDP's DTensors
    trainable = sum(p.numel() for p in params if p.requires_grad)
    dtype_bytes = params[0].element_size()
    shards = trainer.dist.world_size
    model_cfg = policy.lm.config
    hidden = getattr(model_cfg, "hidden_size", 0)
    rows = cfg.optim.micro_batch_size
    # Prefix sharing runs each prompt once per group in the training forward.
    prompt_rows = -(-rows // cfg.grpo.group_size) if cfg.grpo.prefix_sharing else rows
    tokens = prompt_rows * max_prompt_tokens + rows * cfg.rollout.max_completion_tokens
    activations = activation_bytes(
        tokens, hidden, getattr(model_cfg, "intermediate_size", 4 * hidden), _layers_with_grad(policy.lm),
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
        reference=full_weights // shards if isinstance(trainer.policy.reference, PolicyModel) else 0, engine=engine,
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


def dry_run(trainer: Trainer) -> dict:
    """The run's step once with its update withheld; returns the summary (also printed and
    written to run_dir/dry_run.json on rank 0). Raises if the weights changed."""
    cfg, tokenizer = trainer.cfg, trainer.policy.tokenizer
    rendered = [tokenizer.decode(ids) for ids in trainer.data.train_ids[:PROMPTS_RENDERED]]
    if any(not text.strip() for text in rendered):
        raise RuntimeError("a rendered prompt decodes to empty text; check the tokenizer's chat template")
    before = _fingerprint(trainer.policy.model)
    withheld = Update(_Withheld(trainer.optimizer), _Withheld(trainer.scheduler), applied=False)
    out = trainer.step(StepTimer(), withheld)
    if _fingerprint(trainer.policy.model) != before:
        raise RuntimeError("dry run changed the policy weights; the optimizer step must be withheld")
    summary = _summary(trainer, cfg, out, withheld.optimizer.steps_withheld)
    if trainer.dist.rank == 0:
        _print_summary(summary, rendered[0])
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _summary(trainer: Trainer, cfg: Config, out: StepOutput, withheld: int) -> dict:
    policy, data = trainer.policy.model, trainer.data
    prompt_lengths = [len(ids) for ids in data.train_ids]
    completion_lengths = [len(c.token_ids) for c in out.completions]
    step_tokens = sum(len(p) for p in out.prompt_ids) + sum(completion_lengths)  # this rank
    memory = estimate_memory(trainer, cfg, max(prompt_lengths))
    summary = {
        "model": cfg.model.name_or_path,
        "parameters": sum(p.numel() for p in policy.parameters()),
        "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "world_size": trainer.dist.world_size,
        "train_examples": len(data.train),
        "eval_examples": len(data.eval_examples),
        "prompt_tokens": {"mean": round(statistics.fmean(prompt_lengths), 1), "max": max(prompt_lengths)},
        "completion_tokens": {"mean": round(statistics.fmean(completion_lengths), 1), "max": max(completion_lengths),
                              "limit": cfg.rollout.max_completion_tokens},
        "tokens_per_step": {
            "measured": int(round(trainer.reduce({"t": float(step_tokens)})["t"] * trainer.dist.world_size)),
            "upper_bound": out.sequences_per_step * (max(prompt_lengths) + max(cfg.rollout.max_completion_tokens,
                                                                               max(completion_lengths))),
        },
        "sample_completion": out.completions[0].text[:SHOWN_PROMPT_CHARS // 2],
        "loss": out.loss,
        "grad_norm": out.grad_norm,
        "optimizer_steps_withheld": withheld,
        "weights_unchanged": True,
        "memory_estimate_bytes": {**dataclasses.asdict(memory), "total": memory.total},
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if trainer.data.data_audit is not None:
        summary["data_audit"] = trainer.data.data_audit.summary()
    if out.rewards is not None:  # a step that samples (GRPO): what its rollouts scored
        summary["reward"] = trainer.reduce({"total": float(out.rewards.total.mean()),
                                            **{name: float(v.mean()) for name, v in out.rewards.per_reward.items()}})
        summary["zero_variance_groups"] = int(out.zero_variance_groups)
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
    ]
    if "reward" in s:
        lines += [
            f"reward             {', '.join(f'{k}={v:.3f}' for k, v in s['reward'].items())}",
            f"groups w/o signal  {s['zero_variance_groups']} (all completions scored alike: zero advantage)",
        ]
    lines += [
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
