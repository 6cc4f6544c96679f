import pytest
import torch
import torch.nn.functional as F

from kernel_cases import assert_matches, make_logprob_problem
from kernels.logprobs import fused_linear_logprobs
from kernels.reference import logprobs_entropy_ref, logprobs_ref

SHAPES = [  # N, H, V, chunk_size: odd N, V off any block size, chunks that do not divide N
    (1, 8, 1000, None),
    (37, 32, 1003, 8),
    (64, 64, 5000, 17),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(problem, dtype, **kwargs):
    out = problem.run(fused_linear_logprobs, impl="torch", **kwargs)
    assert out["logprobs"].dtype == out["entropy"].dtype == torch.float32
    assert out["grad_hidden"].dtype == out["grad_weight"].dtype == dtype
    for name in ("logprobs", "entropy"):
        assert_matches(out[name], problem.expected[name], dtype, "values", name)
    for name in ("grad_hidden", "grad_weight"):
        assert_matches(out[name], problem.expected[name], dtype, "grads", name)
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, hidden_size, vocab, chunk_size", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_fp64_reference(n, hidden_size, vocab, chunk_size, dtype, temperature):
    problem = make_logprob_problem(n, hidden_size, vocab, dtype, temperature)
    _check(problem, dtype, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_reference_at_a_real_vocab_size(dtype):
    problem = make_logprob_problem(257, 128, 49152, dtype, temperature=0.7)
    _check(problem, dtype)


def test_masked_rows_give_zero_and_no_gradient():
    problem = make_logprob_problem(37, 32, 1003, torch.float32, ignore_index=-1)
    out = _check(problem, torch.float32, chunk_size=8)
    masked = problem.targets == -1
    assert masked.sum() >= 5
    assert (out["logprobs"][masked] == 0).all() and (out["entropy"][masked] == 0).all()
    assert (out["grad_hidden"][masked] == 0).all()
    assert (out["logprobs"][~masked] < 0).all()


def test_all_rows_masked_gives_zeros():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    logprobs = fused_linear_logprobs(hidden, weight, torch.full((5,), -100))
    (logprobs * 2).sum().backward()
    assert (logprobs == 0).all()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_any_chunk_size_matches_reference(chunk_size):
    problem = make_logprob_problem(37, 32, 1003, torch.float32, temperature=0.7)
    _check(problem, torch.float32, chunk_size=chunk_size)


@pytest.mark.parametrize("used", ["logprobs", "entropy"])
def test_backward_through_one_output_only(used):
    problem = make_logprob_problem(37, 32, 1003, torch.float32, temperature=0.7)
    hidden = problem.hidden.clone().requires_grad_()
    weight = problem.weight.clone().requires_grad_()
    outputs = fused_linear_logprobs(hidden, weight, problem.targets, 0.7, return_entropy=True)
    hidden64 = problem.hidden.double().requires_grad_()
    weight64 = problem.weight.double().requires_grad_()
    expected = logprobs_entropy_ref(hidden64, weight64, problem.targets, 0.7)
    index = 0 if used == "logprobs" else 1
    (outputs[index] * problem.up_logprobs).sum().backward()
    (expected[index] * problem.up_logprobs.double()).sum().backward()
    assert_matches(hidden.grad, hidden64.grad, torch.float32, "grads", f"{used}-only grad_hidden")
    assert_matches(weight.grad, weight64.grad, torch.float32, "grads", f"{used}-only grad_weight")


def test_frozen_weight_gets_no_grad_and_hidden_grad_is_right():
    problem = make_logprob_problem(37, 32, 1003, torch.float32, temperature=0.7)
    hidden = problem.hidden.clone().requires_grad_()
    logprobs = fused_linear_logprobs(hidden, problem.weight, problem.targets, 0.7)
    (logprobs * problem.up_logprobs).sum().backward()
    hidden64 = problem.hidden.double().requires_grad_()
    expected = logprobs_ref(hidden64, problem.weight.double(), problem.targets, 0.7)
    (expected * problem.up_logprobs.double()).sum().backward()
    assert_matches(hidden.grad, hidden64.grad, torch.float32, "grads", "grad_hidden")
    assert problem.weight.grad is None


def test_matches_torch_linear_cross_entropy():
    problem = make_logprob_problem(64, 64, 5000, torch.float32)
    runs = {}
    for name in ("ours", "builtin"):
        hidden = problem.hidden.clone().requires_grad_()
        weight = problem.weight.clone().requires_grad_()
        if name == "ours":
            logprobs = fused_linear_logprobs(hidden, weight, problem.targets)
        else:
            options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=16, chunking_method=None)
            logprobs = -F.linear_cross_entropy(hidden, weight, problem.targets, reduction="none", options=options)
        (logprobs * problem.up_logprobs).sum().backward()
        runs[name] = (logprobs.detach(), hidden.grad, weight.grad)
    for ours, builtin in zip(runs["ours"], runs["builtin"]):
        torch.testing.assert_close(ours, builtin, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda h, w, t: (h[:, :-1], w, t), "hidden must be"),
        (lambda h, w, t: (h, w, t[:-1]), "targets must be"),
        (lambda h, w, t: (h, w.double(), t), "share a dtype"),
        (lambda h, w, t: (h, w, torch.full_like(t, w.shape[0])), "targets must be in"),
    ],
)
def test_bad_inputs_are_rejected_with_a_reason(change, message):
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=message):
        fused_linear_logprobs(*change(hidden, weight, targets))


def test_bad_options_are_rejected():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        fused_linear_logprobs(hidden, weight, targets, impl="cuda")
    # Triton on CPU tensors only runs under the interpreter (tests/kernels/triton_cases.py)
    with pytest.raises(RuntimeError, match="triton"):
        fused_linear_logprobs(hidden, weight, targets, impl="triton")
