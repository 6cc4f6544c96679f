"""Fused linear + log-softmax + gather (and entropy): per-token log-probs of `targets`
under `hidden @ weight.T / temperature`, forward and backward, without ever holding
the full [N, V] logits. Rows are processed in chunks; only a chunk's logits exist."""

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path needs no triton
    triton = None

# A chunk's logits hold about this many elements (256 MiB in fp32).
_CHUNK_ELEMENTS = 1 << 26
_MAX_BLOCK_V = 4096

if triton is not None:

    @triton.jit
    def _row_stats_kernel(
        logits_ptr, logits_stride, targets_ptr, lse_ptr, logprobs_ptr, entropy_ptr, n_cols,
        WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program per row: online logsumexp over vocab blocks, then the target's
        log-prob and (optionally) the entropy lse - sum(p * z)."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_stride
        running_max = float("-inf")
        running_sum = 0.0
        running_dot = 0.0  # sum(exp(z - running_max) * z), rescaled like running_sum
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            z = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(z, 0))
            rescale = tl.exp(running_max - new_max)
            e = tl.exp(z - new_max)  # 0 past the row's end
            running_sum = running_sum * rescale + tl.sum(e, 0)
            if WANT_ENTROPY:
                # where(): 0 * -inf past the row's end would be nan
                running_dot = running_dot * rescale + tl.sum(e * tl.where(in_row, z, 0.0), 0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        target_z = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32)
        tl.store(lse_ptr + row, lse)
        tl.store(logprobs_ptr + row, target_z - lse)
        if WANT_ENTROPY:
            tl.store(entropy_ptr + row, lse - running_dot / running_sum)

    @triton.jit
    def _grad_logits_kernel(
        logits_ptr, logits_stride, targets_ptr, lse_ptr, entropy_ptr, grad_logprobs_ptr,
        grad_entropy_ptr, n_cols, HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        """One program per row: overwrite the logits z with d(loss)/dz, where
        dlogp/dz = onehot - p and dH/dz = -p * (log p + H)."""
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_stride
        lse = tl.load(lse_ptr + row)
        target = tl.load(targets_ptr + row)
        grad_logprob = tl.load(grad_logprobs_ptr + row)
        if HAS_GRAD_ENTROPY:
            grad_entropy = tl.load(grad_entropy_ptr + row)
            entropy = tl.load(entropy_ptr + row)
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < n_cols
            log_p = tl.load(row_ptr + cols, mask=in_row, other=0.0).to(tl.float32) - lse
            p = tl.exp(log_p)
            if HAS_GRAD_ENTROPY:
                grad = -p * (grad_logprob + grad_entropy * (log_p + entropy))
            else:
                grad = -p * grad_logprob
            grad = tl.where(cols == target, grad + grad_logprob, grad)
            tl.store(row_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_row)


def _block_v(n_cols):
    return min(_MAX_BLOCK_V, triton.next_power_of_2(n_cols))


def row_stats_triton(logits, targets, want_entropy):
    """Launcher: (lse, logprobs, entropy or None), each [n] fp32, for logits [n, V]."""
    n_rows, n_cols = logits.shape
    lse, logprobs = (torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(2))
    entropy = torch.empty_like(lse) if want_entropy else None
    _row_stats_kernel[(n_rows,)](
        logits, logits.stride(0), targets, lse, logprobs, lse if entropy is None else entropy, n_cols,
        WANT_ENTROPY=want_entropy, BLOCK_V=_block_v(n_cols), num_warps=8,
    )
    return lse, logprobs, entropy


def grad_logits_triton(logits, targets, lse, entropy, grad_logprobs, grad_entropy):
    """Launcher: turns logits [n, V] into d(loss)/d(logits) in place and returns it."""
    n_rows, n_cols = logits.shape
    has_grad_entropy = grad_entropy is not None
    _grad_logits_kernel[(n_rows,)](
        logits, logits.stride(0), targets, lse, entropy if has_grad_entropy else lse, grad_logprobs,
        grad_entropy if has_grad_entropy else grad_logprobs, n_cols,
        HAS_GRAD_ENTROPY=has_grad_entropy, BLOCK_V=_block_v(n_cols), num_warps=8,
    )
    return logits


class _TritonRowOps:
    """Row math by the Triton kernels; they need no scratch beyond the logits."""

    stats = staticmethod(row_stats_triton)
    grad_logits = staticmethod(grad_logits_triton)


class _TorchRowOps:
    """Torch twins of the Triton launchers, in fp32 with scratch reused across chunks:
    fresh [n, V] buffers each chunk would page-fault on CPU and cost as much as the math."""

    def __init__(self, chunk_size, vocab_size, dtype, device):
        self.exp = torch.empty(chunk_size, vocab_size, device=device)  # [n, V] fp32
        self.upcast = None if dtype == torch.float32 else torch.empty_like(self.exp)

    def _fp32(self, logits):
        return logits if self.upcast is None else self.upcast[: len(logits)].copy_(logits)

    def stats(self, logits, targets, want_entropy):
        z = self._fp32(logits)  # [n, V] fp32, not modified
        exp_shifted = self.exp[: len(z)]
        row_max = z.amax(-1, keepdim=True)  # [n, 1]
        sum_exp = torch.sub(z, row_max, out=exp_shifted).exp_().sum(-1)  # [n]
        lse = row_max.squeeze(-1) + sum_exp.log()
        logprobs = z.gather(-1, targets[:, None]).squeeze(-1) - lse
        entropy = lse - exp_shifted.mul_(z).sum(-1) / sum_exp if want_entropy else None
        return lse, logprobs, entropy

    def grad_logits(self, logits, targets, lse, entropy, grad_logprobs, grad_entropy):
        log_p = self._fp32(logits).sub_(lse[:, None])  # [n, V]
        grad = torch.exp(log_p, out=self.exp[: len(log_p)])  # p, then the grad in place
        if grad_entropy is None:
            grad.mul_(-grad_logprobs[:, None])
        else:
            # -p * (g + ge * (log p + H)) = p * (-ge * log p - (g + ge * H))
            grad.mul_(log_p.mul_(-grad_entropy[:, None]).sub_((grad_logprobs + grad_entropy * entropy)[:, None]))
        grad.scatter_add_(-1, targets[:, None], grad_logprobs[:, None])
        return grad if grad.dtype == logits.dtype else logits.copy_(grad)


def row_ops(impl, chunk_size, vocab_size, dtype, device):
    """Per-chunk row math for `impl`: `.stats(logits, targets, want_entropy)` and
    `.grad_logits(logits, targets, lse, entropy, grad_logprobs, grad_entropy)`."""
    return _TritonRowOps() if impl == "triton" else _TorchRowOps(chunk_size, vocab_size, dtype, device)


class Chunks:
    """Row chunks of valid rows: yields (rows [n], hidden_rows [n, H] already divided by
    the temperature, logits [n, V] in one buffer reused by every chunk)."""

    def __init__(self, hidden, weight, rows, chunk_size, temperature):
        self.hidden, self.weight, self.rows, self.temperature = hidden, weight, rows, temperature
        self.chunk_size = max(1, min(chunk_size, len(rows)))
        self.buffer = hidden.new_empty(self.chunk_size, weight.shape[0])

    def __iter__(self):
        for chunk_rows in self.rows.split(self.chunk_size):
            hidden_rows = self.hidden.index_select(0, chunk_rows)  # [n, H]
            if self.temperature != 1.0:
                hidden_rows.div_(self.temperature)  # z / T folded into the small [n, H] side
            logits = torch.mm(hidden_rows, self.weight.T, out=self.buffer[: len(chunk_rows)])
            yield chunk_rows, hidden_rows, logits


class GradAccumulator:
    """d(loss)/d(hidden) [N, H] and d(loss)/d(weight) [V, H], filled chunk by chunk; weight
    grads are summed in fp32, low-precision chunk products through one scratch buffer."""

    def __init__(self, hidden, weight, need_hidden, need_weight, temperature):
        self.weight, self.need_weight, self.temperature = weight, need_weight, temperature
        self.grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        self.grad_weight = None  # [V, H] fp32, created by the first chunk
        self.scratch = None  # [V, H] in the input dtype, for low-precision chunk products

    def add(self, rows, hidden_rows, grad_logits):
        """Add one chunk given its logits' grad: rows [n], hidden_rows [n, H], grad_logits [n, V]."""
        if self.grad_hidden is not None:
            self.set_hidden(rows, grad_logits @ self.weight)
        if self.need_weight:
            self.add_weight(grad_logits.T, hidden_rows)

    def set_hidden(self, rows, grad_rows):
        """d(loss)/d(hidden / temperature) of the rows [n] -> their d(loss)/d(hidden)."""
        self.grad_hidden.index_copy_(0, rows, grad_rows.div_(self.temperature).to(self.grad_hidden.dtype))

    def add_weight(self, a, b):
        """grad_weight += a @ b (a [V, n], b [n, H] in the input dtype)."""
        if self.grad_weight is None and a.dtype == torch.float32:  # the first chunk writes: no zero-fill
            self.grad_weight = torch.mm(a, b)
        elif a.dtype == torch.float32:
            self.grad_weight.addmm_(a, b)  # in place: no [V, H] temporary
        else:
            self.scratch = torch.mm(a, b, out=self.scratch)
            if self.grad_weight is None:
                self.grad_weight = self.scratch.float()
            else:
                self.grad_weight += self.scratch

    def add_weight_rows(self, index, values):
        """grad_weight[index] += values (index [n], values [n, H] fp32)."""
        if self.grad_weight is None:
            self.grad_weight = torch.zeros_like(self.weight, dtype=torch.float32)
        self.grad_weight.index_put_((index,), values, accumulate=True)  # index_add_ is 30x slower on CPU

    def result(self):
        """(grad_hidden or None, grad_weight or None), in the input dtype."""
        if not self.need_weight:
            return self.grad_hidden, None
        if self.grad_weight is None:  # every row was masked
            return self.grad_hidden, torch.zeros_like(self.weight)
        return self.grad_hidden, self.grad_weight.to(self.weight.dtype)


class _FusedLinearLogprobs(torch.autograd.Function):
    """Forward keeps only per-row lse (and entropy); backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy, ignore_index, chunk_size, impl):
        rows = (targets != ignore_index).nonzero().squeeze(1)  # [N_valid]: masked rows cost nothing
        chunks = Chunks(hidden, weight, rows, chunk_size, temperature)
        ops = row_ops(impl, chunks.chunk_size, weight.shape[0], hidden.dtype, hidden.device)
        lse, logprobs = (hidden.new_zeros(hidden.shape[0], dtype=torch.float32) for _ in range(2))
        entropy = torch.zeros_like(lse) if want_entropy else None
        for chunk_rows, _, logits in chunks:
            stats = ops.stats(logits, targets[chunk_rows], want_entropy)
            for full, chunk in zip((lse, logprobs, entropy), stats):
                if full is not None:
                    full.index_copy_(0, chunk_rows, chunk)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, targets, rows, lse, entropy)
        ctx.temperature, ctx.chunk_size, ctx.impl = temperature, chunk_size, impl
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, rows, lse, entropy = ctx.saved_tensors
        if grad_logprobs is None:  # only the entropy was used
            grad_logprobs = torch.zeros_like(lse)
        chunks = Chunks(hidden, weight, rows, ctx.chunk_size, ctx.temperature)
        ops = row_ops(ctx.impl, chunks.chunk_size, weight.shape[0], hidden.dtype, hidden.device)
        grads = GradAccumulator(hidden, weight, *ctx.needs_input_grad[:2], ctx.temperature)
        for chunk_rows, hidden_rows, logits in chunks:
            entropy_args = (None, None) if grad_entropy is None else (entropy[chunk_rows], grad_entropy[chunk_rows])
            grad_logits = ops.grad_logits(
                logits, targets[chunk_rows], lse[chunk_rows], entropy_args[0],
                grad_logprobs[chunk_rows].float(), entropy_args[1],
            )
            grads.add(chunk_rows, hidden_rows, grad_logits)
        return (*grads.result(), None, None, None, None, None, None)


def resolve_impl(impl, device):
    """'auto' -> 'triton' for CUDA tensors when triton is installed, else 'torch'."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton is not None else "torch"
    if impl == "triton":
        if triton is None:
            raise RuntimeError("impl='triton' needs the triton package: pip install triton, or use impl='torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"impl='triton' on {device.type} tensors needs TRITON_INTERPRET=1 (tests only)")
    return impl


def default_chunk_size(n_rows, vocab_size):
    """Rows per chunk so that one chunk's logits hold about 2**26 elements."""
    return max(1, min(n_rows, _CHUNK_ELEMENTS // vocab_size))


def check_inputs(hidden, weight, targets, ignore_index):
    """Raise ValueError naming the argument when shapes, devices or targets are off."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N]={tuple(hidden.shape[:1])}, got {tuple(targets.shape)}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(f"hidden, weight, targets on different devices: {hidden.device}, {weight.device}, {targets.device}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    valid = targets[targets != ignore_index]
    if valid.numel() and (valid.min() < 0 or valid.max() >= weight.shape[0]):
        raise ValueError(f"targets must be in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}")


def fused_linear_logprobs(
    hidden, weight, targets, temperature=1.0, *, return_entropy=False, ignore_index=-100,
    chunk_size=None, impl="auto",
):
    """log softmax(hidden @ weight.T / temperature)[targets] without the [N, V] logits.

    hidden [N, H] and weight [V, H] in fp32/bf16/fp16, targets [N] int. Returns fp32
    logprobs [N] (and entropy [N] if `return_entropy`); rows whose target is
    `ignore_index` give 0 and no gradient. Differentiable in hidden and weight.
    impl: 'torch' (chunked torch), 'triton' (CUDA kernels), 'auto' picks by device."""
    check_inputs(hidden, weight, targets, ignore_index)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    impl = resolve_impl(impl, hidden.device)
    chunk_size = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0])
    logprobs, entropy = _FusedLinearLogprobs.apply(
        hidden, weight, targets.long(), float(temperature), return_entropy, ignore_index, chunk_size, impl
    )
    return (logprobs, entropy) if return_entropy else logprobs
