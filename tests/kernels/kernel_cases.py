"""Shared test problems for the kernel tests: random inputs, their fp64 references, and
per-dtype tolerances."""

import dataclasses

import torch

from kernels.reference import logprobs_entropy_ref

# Max error allowed, relative to the largest reference magnitude (see `assert_matches`).
# fp32 checks the math itself (measured errors <= 3e-6). In bf16/fp16 the matmul rounds
# the logits to the input dtype, as a bf16 model's lm head does, and that bounds what any
# kernel can reach: measured <= 1.5e-2 values / 4e-2 grads in bf16 and <= 1.5e-3 /
# 3.5e-3 in fp16, while naive log_softmax(h @ W.T) gets up to 1.4e-2 / 5.3e-2 in bf16.
TOLERANCE = {
    torch.float32: {"values": 1e-5, "grads": 2e-5},
    torch.float16: {"values": 4e-3, "grads": 8e-3},
    torch.bfloat16: {"values": 3e-2, "grads": 8e-2},
}


def assert_matches(actual, expected, dtype, kind, what):
    """max|actual - expected| <= TOLERANCE[dtype][kind] * max(1, max|expected|)."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    limit = TOLERANCE[dtype][kind] * scale
    assert error <= limit, f"{what} ({dtype}): max error {error:.3g} > {limit:.3g}"


@dataclasses.dataclass
class LogprobProblem:
    """Inputs in `dtype` and, computed in fp64 from the same (rounded) values, the
    reference log-probs, entropy and grads of sum(up_logprobs * logp + up_entropy * H)."""

    hidden: torch.Tensor  # [N, H]
    weight: torch.Tensor  # [V, H]
    targets: torch.Tensor  # [N], some equal to ignore_index
    up_logprobs: torch.Tensor  # [N] upstream grads
    up_entropy: torch.Tensor  # [N]
    temperature: float
    ignore_index: int
    expected: dict  # logprobs, entropy, grad_hidden, grad_weight (fp64)

    def run(self, fn, **kwargs):
        """fn(hidden, weight, targets, temperature, return_entropy=True, ...) on fresh
        leaves; returns logprobs, entropy, grad_hidden, grad_weight."""
        hidden = self.hidden.clone().requires_grad_()
        weight = self.weight.clone().requires_grad_()
        logprobs, entropy = fn(
            hidden, weight, self.targets, self.temperature, return_entropy=True,
            ignore_index=self.ignore_index, **kwargs,
        )
        (logprobs * self.up_logprobs + entropy * self.up_entropy).sum().backward()
        return {"logprobs": logprobs, "entropy": entropy, "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def make_logprob_problem(n, hidden_size, vocab, dtype, temperature=1.0, ignore_index=-100, seed=0):
    """A LogprobProblem with about a quarter of the targets set to ignore_index."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=generator).to(dtype)
    # logits with std ~3: peaked but not one-hot distributions
    weight = (torch.randn(vocab, hidden_size, generator=generator) * 3 / hidden_size**0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=generator)
    targets[torch.rand(n, generator=generator) < 0.25] = ignore_index
    up_logprobs = torch.randn(n, generator=generator)
    up_entropy = torch.randn(n, generator=generator)
    hidden64 = hidden.double().requires_grad_()
    weight64 = weight.double().requires_grad_()
    logprobs, entropy = logprobs_entropy_ref(hidden64, weight64, targets, temperature, ignore_index)
    (logprobs * up_logprobs.double() + entropy * up_entropy.double()).sum().backward()
    expected = {
        "logprobs": logprobs.detach(), "entropy": entropy.detach(),
        "grad_hidden": hidden64.grad, "grad_weight": weight64.grad,
    }
    return LogprobProblem(hidden, weight, targets, up_logprobs, up_entropy, temperature, ignore_index, expected)
