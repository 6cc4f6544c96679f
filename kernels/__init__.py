"""Fused log-prob / entropy / GRPO-loss kernels with plain-torch references; imports
nothing from grailcore."""

from kernels.grpo_loss import fused_grpo_loss
from kernels.logprobs import fused_linear_logprobs
from kernels.reference import grpo_loss_ref, logprobs_entropy_ref, logprobs_ref

__all__ = ["fused_grpo_loss", "fused_linear_logprobs", "grpo_loss_ref", "logprobs_entropy_ref", "logprobs_ref"]
