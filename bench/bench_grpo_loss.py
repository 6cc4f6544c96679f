"""Forward + backward of the GRPO loss from last hidden states: naive (full logits,
log_softmax, loss), chunked log-probs then the loss, and the fused loss (torch, and Triton
on CUDA). Prints a table, appends CSV rows."""

import argparse
import itertools
import sys

import torch

from bench.harness import markdown_rows, measure_round_robin, write_csv
from kernels.grpo_loss import fused_grpo_loss
from kernels.logprobs import default_chunk_size, fused_linear_logprobs
from kernels.reference import aggregate_token_loss, grpo_token_loss

LOSS_ARGS = dict(temperature=0.7, epsilon_low=0.2, epsilon_high=0.28, beta=0.04, loss_type="grpo")


def _loss_from_logprobs(logprobs, inputs):
    """The same loss as fused_grpo_loss, from [B, T] log-probs."""
    token_loss, _, _ = grpo_token_loss(
        logprobs, inputs["old"], inputs["ref"], inputs["advantages"][:, None],
        LOSS_ARGS["epsilon_low"], LOSS_ARGS["epsilon_high"], LOSS_ARGS["beta"],
    )
    return aggregate_token_loss(token_loss, inputs["mask"], LOSS_ARGS["loss_type"])


def naive(hidden, weight, inputs, chunk_size):
    logits = (hidden @ weight.T).float() / LOSS_ARGS["temperature"]  # [B*T, V]
    targets = inputs["targets"].clamp(min=0).reshape(-1, 1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets).view(inputs["targets"].shape)
    return _loss_from_logprobs(logprobs, inputs)


def chunked_logprobs_then_loss(hidden, weight, inputs, chunk_size):
    targets = inputs["targets"]
    logprobs = fused_linear_logprobs(
        hidden, weight, targets.reshape(-1), LOSS_ARGS["temperature"], impl="torch", chunk_size=chunk_size
    )
    return _loss_from_logprobs(logprobs.view(targets.shape), inputs)


def _fused(impl):
    def run(hidden, weight, inputs, chunk_size):
        loss, _ = fused_grpo_loss(
            hidden, weight, inputs["targets"], inputs["old"], inputs["ref"], inputs["advantages"],
            inputs["mask"], chunk_size=chunk_size, impl=impl, **LOSS_ARGS,
        )
        return loss

    return run


IMPLEMENTATIONS = {
    "naive": naive,
    "chunked_logprobs_then_loss": chunked_logprobs_then_loss,
    "fused_torch": _fused("torch"),
    "fused_triton": _fused("triton"),
}


def make_inputs(batch, seq, vocab, valid_fraction, device, generator):
    """Targets, old/ref log-probs and advantages for `batch` sequences of `seq` tokens, the
    last (1 - valid_fraction) of each right-padded away on average."""
    lengths = (seq * (valid_fraction + (1 - valid_fraction) * torch.rand(batch, generator=generator, device=device)))
    mask = torch.arange(seq, device=device)[None, :] < lengths.long().clamp(min=1)[:, None]  # [B, T]
    targets = torch.randint(0, vocab, (batch, seq), generator=generator, device=device).masked_fill(~mask, -100)
    old = -torch.rand(batch, seq, generator=generator, device=device) * 5 - 8  # ~ log-probs of a random model
    return {
        "targets": targets, "mask": mask, "old": old, "ref": old + 0.1,
        "advantages": torch.randn(batch, generator=generator, device=device),
    }


def bench_shape(batch, seq, hidden_size, vocab, dtype, device, methods, args):
    generator = torch.Generator(device=device).manual_seed(0)
    n = batch * seq
    hidden = torch.randn(n, hidden_size, generator=generator, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator, device=device) / hidden_size**0.5).to(dtype)
    weight.requires_grad_()
    inputs = make_inputs(batch, seq, vocab, args.valid_fraction, device, generator)
    chunk_size = args.chunk_size or default_chunk_size(n, vocab)
    calls = {
        name: (lambda fn=IMPLEMENTATIONS[name]: fn(hidden, weight, inputs, chunk_size).backward()) for name in methods
    }

    def drop_grads(_name):
        hidden.grad = weight.grad = None

    results = measure_round_robin(calls, device=device, warmup=args.warmup, repeats=args.repeats, after_each=drop_grads)
    baseline = results.get("naive")
    return [
        {
            "method": name, "batch": batch, "seq": seq, "hidden": hidden_size, "vocab": vocab,
            "dtype": str(dtype).removeprefix("torch."), "device": device.type,
            "valid_fraction": args.valid_fraction, "median_s": round(result.median_s, 4),
            "min_s": round(min(result.seconds), 4),
            "median_cpu_s": round(result.median_cpu_s, 4), "peak_mib": round(result.peak_mib, 1),
            "time_vs_naive": round(result.median_s / baseline.median_s, 3) if baseline else "",
            "cpu_time_vs_naive": round(result.median_cpu_s / baseline.median_cpu_s, 3) if baseline else "",
            "mem_vs_naive": round(result.peak_mib / baseline.peak_mib, 3) if baseline else "",
            "repeats": len(result.seconds),
        }
        for name, result in results.items()
    ]


COLUMNS = [
    "method", "batch", "seq", "hidden", "vocab", "dtype", "median_s", "median_cpu_s", "peak_mib", "time_vs_naive",
    "cpu_time_vs_naive", "mem_vs_naive",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16, help="sequences")
    parser.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 4096], help="tokens per sequence")
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 1536])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--valid-fraction", type=float, default=1.0, help="mean share of unpadded tokens")
    parser.add_argument("--dtype", default=None, help="default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one small shape (16 x 64 tokens, H=896, V=49152)")
    parser.add_argument("--csv", default="bench/results/grpo_loss.csv")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq, args.hidden, args.vocab, args.repeats = [64], [896], [49152], 1
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    methods = [m for m in args.methods if device.type == "cuda" or m != "fused_triton"]
    if len(methods) < len(args.methods):
        print("skip fused_triton: needs CUDA", file=sys.stderr)
    shapes = itertools.product(args.seq, args.hidden, args.vocab)
    for index, (seq, hidden_size, vocab) in enumerate(shapes):
        rows = bench_shape(args.batch, seq, hidden_size, vocab, dtype, device, methods, args)
        write_csv(args.csv, rows)
        print(markdown_rows(rows, COLUMNS, header=index == 0), flush=True)


if __name__ == "__main__":
    main()
