"""Fused log-prob / entropy / GRPO-loss kernels, the GRPO objective they share, and
plain-torch references; imports nothing from grailcore."""

from kernels.grpo_loss import fused_grpo_loss, fused_grpo_loss_tokens
from kernels.logprobs import fused_linear_logprobs
from kernels.objective import Objective, Tokens, objective_loss
from kernels.reference import grpo_loss_ref, logprobs_entropy_ref, logprobs_ref

__all__ = ["Objective", "Tokens", "fused_grpo_loss", "fused_grpo_loss_tokens", "fused_linear_logprobs",
           "grpo_loss_ref", "logprobs_entropy_ref", "logprobs_ref", "objective_loss"]
