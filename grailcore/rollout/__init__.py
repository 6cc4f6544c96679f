"""Rollout engines: prompts in, sampled completions (text, token ids, logprobs) out."""

from grailcore.rollout.base import RolloutEngine

__all__ = ["RolloutEngine"]
