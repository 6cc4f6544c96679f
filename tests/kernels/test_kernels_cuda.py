import pytest
import torch

from kernel_cases import assert_matches, make_logprob_problem
from kernels.grpo_loss import fused_grpo_loss
from kernels.logprobs import fused_linear_logprobs, resolve_impl
from kernels.reference import grpo_loss_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _to_cuda_problem(problem):
    problem.hidden, problem.weight = problem.hidden.cuda(), problem.weight.cuda()
    problem.targets, problem.up_logprobs, problem.up_entropy = (
        problem.targets.cuda(), problem.up_logprobs.cuda(), problem.up_entropy.cuda()
    )
    return problem


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_auto_picks_triton_and_matches_fp64_reference(dtype):
    assert resolve_impl("auto", torch.device("cuda")) == "triton"
    problem = _to_cuda_problem(make_logprob_problem(1001, 256, 49157, dtype, temperature=0.7))
    out = problem.run(fused_linear_logprobs, chunk_size=300)
    for name in ("logprobs", "entropy"):
        assert_matches(out[name].cpu(), problem.expected[name], dtype, "values", name)
    for name in ("grad_hidden", "grad_weight"):
        assert_matches(out[name].cpu(), problem.expected[name], dtype, "grads", name)


def test_peak_memory_is_a_fraction_of_the_logits():
    n, hidden_size, vocab = 4096, 896, 151936
    hidden = torch.randn(n, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (n,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_linear_logprobs(hidden, weight, targets).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # grads of weight (bf16 + fp32 accumulator) dominate; one [N, V] fp32 logits would be 2.5 GB
    assert extra < 0.5 * n * vocab * 4, f"peak extra {extra / 2**20:.0f} MiB"


def test_grpo_loss_on_cuda_matches_reference():
    generator = torch.Generator().manual_seed(0)
    batch, seq, hidden_size, vocab = 4, 33, 128, 32003
    hidden = torch.randn(batch, seq, hidden_size, generator=generator)
    weight = torch.randn(vocab, hidden_size, generator=generator) * 0.25
    targets = torch.randint(0, vocab, (batch, seq), generator=generator)
    mask = torch.rand(batch, seq, generator=generator) < 0.8
    old = torch.randn(batch, seq, generator=generator) - 10
    ref = old + 0.1
    advantages = torch.randn(batch, generator=generator)
    results = []
    for loss_fn, device, dtype in ((fused_grpo_loss, "cuda", torch.float32), (grpo_loss_ref, "cpu", torch.float64)):
        leaves = [x.to(device, dtype).requires_grad_() for x in (hidden, weight)]
        inputs = [x.to(device) for x in (targets, old, ref, advantages, mask)]
        loss, _ = loss_fn(*leaves, *inputs, temperature=0.9, beta=0.04, loss_type="grpo")
        loss.backward()
        results.append([t.detach().cpu() for t in (loss, leaves[0].grad, leaves[1].grad)])
    for (name, kind), ours, expected in zip((("loss", "values"), ("grad_hidden", "grads"), ("grad_weight", "grads")), *results):
        assert_matches(ours, expected, torch.float32, kind, name)
