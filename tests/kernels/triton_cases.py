"""Triton kernel cases, run by test_triton_interpreter.py in a subprocess with
TRITON_INTERPRET=1 (it must be set before triton is imported), on tiny CPU shapes."""

import os

import pytest
import torch

from kernel_cases import assert_matches, make_logprob_problem
from kernels.grpo_loss import fused_grpo_loss
from kernels.logprobs import fused_linear_logprobs
from kernels.reference import grpo_loss_ref

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run through test_triton_interpreter.py (needs TRITON_INTERPRET=1)", allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, vocab, chunk_size", [(13, 5000, 5), (3, 257, None)])  # V > and < the 4096 block
def test_triton_matches_fp64_reference(n, vocab, chunk_size, dtype):
    problem = make_logprob_problem(n, 16, vocab, dtype, temperature=0.7)
    out = problem.run(fused_linear_logprobs, impl="triton", chunk_size=chunk_size)
    for name in ("logprobs", "entropy"):
        assert_matches(out[name], problem.expected[name], dtype, "values", name)
    for name in ("grad_hidden", "grad_weight"):
        assert_matches(out[name], problem.expected[name], dtype, "grads", name)
    masked = problem.targets == problem.ignore_index
    assert (out["logprobs"][masked] == 0).all() and (out["grad_hidden"][masked] == 0).all()


def test_triton_logprobs_only_backward_matches_torch_path():
    problem = make_logprob_problem(13, 16, 5000, torch.float32)
    grads = {}
    for impl in ("torch", "triton"):
        hidden = problem.hidden.clone().requires_grad_()
        weight = problem.weight.clone().requires_grad_()
        logprobs = fused_linear_logprobs(hidden, weight, problem.targets, impl=impl)
        (logprobs * problem.up_logprobs).sum().backward()
        grads[impl] = (logprobs.detach(), hidden.grad, weight.grad)
    for triton_value, torch_value in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(triton_value, torch_value, rtol=1e-5, atol=1e-6)


def test_triton_grpo_loss_matches_reference():
    generator = torch.Generator().manual_seed(0)
    batch, seq, hidden_size, vocab = 2, 5, 16, 4999
    hidden = torch.randn(batch, seq, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) * 0.75
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    old = torch.randn(batch, seq, generator=generator) - 9
    advantages = torch.tensor([0.5, -1.0])
    results = []
    for loss_fn, dtype, kwargs in ((fused_grpo_loss, torch.float32, {"impl": "triton"}), (grpo_loss_ref, torch.float64, {})):
        leaves = [hidden.to(dtype).detach().requires_grad_(), weight.to(dtype).detach().requires_grad_()]
        loss, _ = loss_fn(*leaves, targets, old, None, advantages, mask, temperature=0.7, **kwargs)
        loss.backward()
        results.append((loss.detach(), leaves[0].grad, leaves[1].grad))
    for (name, kind), ours, expected in zip((("loss", "values"), ("grad_hidden", "grads"), ("grad_weight", "grads")), *results):
        assert_matches(ours, expected, torch.float32, kind, name)
