"""SFT warm start: `python -m grailcore.sft --cfg configs/x.py [overrides]` fine-tunes the
policy on (prompt, gold target) pairs with a completion-only loss, through the same
model, data, checkpoint, logging and evaluation machinery as GRPO."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch

from grailcore import checkpoint as ckpt
from grailcore import dist as gdist
from grailcore.batch import micro_batches
from grailcore.cli import parse_config, save_config
from grailcore.config import Config, validate
from grailcore.data.schema import Example
from grailcore.export import export_hf
from grailcore.metrics import MetricsLogger, Progress, StepTimer
from grailcore.setup import Parts, build
from grailcore.types import Completion

log = logging.getLogger(__name__)


def sft_target(example: Example, rationale: str) -> str:
    """The completion a perfect simulator writes for `example` (viewer or math)."""
    if example.task == "math":
        return f"<think>\nThe answer is {example.answer}.\n</think>\n<answer>{example.answer}</answer>"
    opinion = f"<opinion>{example.opinion_direction}</opinion>" if example.opinion_direction else ""
    if example.meta.get("layout") == "direct":  # data.layout="direct": no reasoning, no rationale
        return f"<answer>{example.gold_index}</answer>{opinion}"
    think = rationale.format(answer=example.gold_index)
    return f"<think>\n{think}\n</think>\n<answer>{example.gold_index}</answer>{opinion}"


def target_completions(tokenizer, examples: list[Example], rationale: str) -> list[Completion]:
    """Tokenised targets, each ending with EOS so the model learns to stop."""
    out = []
    for ex in examples:
        text = sft_target(ex, rationale)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append(Completion(text=text, token_ids=tuple(ids), logprobs=None, finish_reason="stop"))
    return out


def sft_step(parts: Parts, cfg: Config, indices: list[int]) -> dict[str, float]:
    """One optimizer step of mean target-token NLL over `indices` (this rank's share)."""
    examples = [parts.train[i] for i in indices]
    targets = target_completions(parts.tokenizer, examples, cfg.sft.rationale)
    batches = micro_batches([parts.train_ids[i] for i in indices], targets, torch.zeros(len(indices)),
                            parts.tokenizer.pad_token_id, cfg.optim.micro_batch_size)
    total_tokens = sum(float(b.completion_mask.sum()) for b in batches)
    nll = 0.0
    for b in batches:
        out = parts.policy(b.input_ids, b.attention_mask, b.num_completion_tokens,
                           temperature=1.0, completion_mask=b.completion_mask)
        loss = -(out.logprobs * b.completion_mask).sum() / total_tokens  # [] mean over the step
        loss.backward()
        nll += float(loss.detach())
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.policy.parameters(), cfg.optim.grad_clip)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    return {"sft/nll": nll, "grad_norm": float(grad_norm), "lr": parts.scheduler.get_last_lr()[0],
            "tokens/target": total_tokens}


def run_sft(parts: Parts, cfg: Config) -> dict:
    rank0, run_dir = parts.dist.rank == 0, Path(cfg.run_dir)
    metrics_log = MetricsLogger(run_dir, cfg.logging.tensorboard, enabled=rank0,
                                resume_step=parts.start_step if cfg.resume else None)
    progress = Progress(cfg.optim.max_steps, parts.start_step, enabled=rank0 and cfg.logging.progress)
    first = parts.evaluate(0) if cfg.eval.on_start and parts.start_step == 0 else None
    if first:
        metrics_log.log(0, first)
    start = time.time()
    step = parts.start_step
    while step < cfg.optim.max_steps:
        timer = StepTimer()
        indices = parts.sampler.next(cfg.sft.batch_size)
        share = len(indices) // parts.dist.world_size
        with timer("step"):
            metrics = sft_step(parts, cfg, indices[parts.dist.rank * share:(parts.dist.rank + 1) * share])
        parts.engine_stale = True
        metrics = parts.reduce({**metrics, **timer.as_metrics()})
        step += 1
        metrics_log.log(step, metrics)
        progress.update(step, nll=metrics["sft/nll"])
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            _save(parts, cfg, step)
    progress.close()
    final = parts.evaluate(step)
    metrics_log.log(step, final)
    _save(parts, cfg, step)
    export_hf(parts.policy.lm, parts.tokenizer, run_dir / "final")
    metrics_log.close()
    summary = {"steps": step, "seconds": round(time.time() - start, 1), "first_eval": first, "final_eval": final}
    if rank0:
        print("=== SFT summary ===")
        for key, value in sorted(final.items()):
            if not key.endswith("_ci"):
                print(f"{key:40s} {value:.4f}" + (f"   (start {first[key]:.4f})" if first and key in first else ""))
    return summary


def _save(parts: Parts, cfg: Config, step: int) -> None:
    state = {"step": step, "sampler": parts.sampler.state_dict()}
    ckpt.save_checkpoint(Path(cfg.run_dir), step, parts.policy, parts.optimizer, parts.scheduler, state,
                         keep=cfg.checkpoint.keep, trainable_only=cfg.model.lora_rank > 0)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(sys.argv[1:] if argv is None else argv, description=__doc__)
    validate(cfg)
    if cfg.sft.batch_size % max(1, gdist.get_world_size()):
        raise ValueError("sft.batch_size must be divisible by the number of ranks")
    parts = build(cfg)
    logging.basicConfig(level=logging.INFO if parts.dist.rank == 0 else logging.WARNING)
    if parts.dist.rank == 0:
        save_config(cfg, Path(cfg.run_dir))
    try:
        return run_sft(parts, cfg)
    finally:
        parts.engine.close()
        gdist.shutdown()


if __name__ == "__main__":
    main()
    gdist.exit_finished_worker()
