"""Forward + backward of sum(w * logprobs) through the lm head, per implementation:
naive log_softmax(h @ W.T), our chunked torch path, torch's linear_cross_entropy, and on
CUDA our Triton path and Liger-Kernel's fused op. Prints a table, appends CSV rows."""

import argparse
import importlib.util
import itertools
import sys

import torch
import torch.nn.functional as F

from bench.harness import markdown_rows, measure_round_robin, write_csv
from kernels.logprobs import default_chunk_size, fused_linear_logprobs

GPU_ONLY = ("triton", "liger")


def naive(hidden, weight, targets, chunk_size):
    logits = (hidden @ weight.T).float()  # [N, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def chunked_torch(hidden, weight, targets, chunk_size):
    return fused_linear_logprobs(hidden, weight, targets, impl="torch", chunk_size=chunk_size)


def torch_lce(hidden, weight, targets, chunk_size):
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size, chunking_method=None)
    return -F.linear_cross_entropy(hidden, weight, targets, reduction="none", options=options)


def triton(hidden, weight, targets, chunk_size):
    return fused_linear_logprobs(hidden, weight, targets, impl="triton", chunk_size=chunk_size)


def liger(hidden, weight, targets, chunk_size):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return -liger_fused_linear_cross_entropy(hidden, weight, targets, reduction="none")


IMPLEMENTATIONS = {fn.__name__: fn for fn in (naive, chunked_torch, torch_lce, triton, liger)}


def available_methods(names, device):
    """The requested methods that can run here, with a printed reason for each skipped one."""
    chosen = []
    for name in names:
        if name in GPU_ONLY and device.type != "cuda":
            print(f"skip {name}: needs CUDA", file=sys.stderr)
        elif name == "liger" and importlib.util.find_spec("liger_kernel") is None:
            print("skip liger: liger-kernel is not installed (pip install liger-kernel)", file=sys.stderr)
        else:
            chosen.append(name)
    return chosen


def bench_shape(n, hidden_size, vocab, dtype, device, methods, args):
    """Measure every method on one shape; returns CSV rows with ratios to naive."""
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=generator, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=generator, device=device) / hidden_size**0.5).to(dtype)
    weight.requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=generator, device=device)
    upstream = torch.randn(n, generator=generator, device=device)
    chunk_size = args.chunk_size or default_chunk_size(n, vocab)
    calls = {
        name: (lambda fn=IMPLEMENTATIONS[name]: (fn(hidden, weight, targets, chunk_size) * upstream).sum().backward())
        for name in methods
    }

    def drop_grads(_name):
        hidden.grad = weight.grad = None

    results = measure_round_robin(calls, device=device, warmup=args.warmup, repeats=args.repeats, after_each=drop_grads)
    baseline = results.get("naive")
    rows = []
    for name, result in results.items():
        rows.append({
            "method": name, "n": n, "hidden": hidden_size, "vocab": vocab, "dtype": str(dtype).removeprefix("torch."),
            "device": device.type, "chunk_size": chunk_size if name != "naive" else "",
            "median_s": round(result.median_s, 4), "min_s": round(min(result.seconds), 4),
            "median_cpu_s": round(result.median_cpu_s, 4),
            "peak_mib": round(result.peak_mib, 1),
            "time_vs_naive": round(result.median_s / baseline.median_s, 3) if baseline else "",
            "cpu_time_vs_naive": round(result.median_cpu_s / baseline.median_cpu_s, 3) if baseline else "",
            "mem_vs_naive": round(result.peak_mib / baseline.peak_mib, 3) if baseline else "",
            "repeats": len(result.seconds),
        })
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 65536], help="tokens (rows)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[896, 1536])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16; default fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk; default 2**26 // vocab")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one small shape (N=1024, H=896, V=49152), 1 repeat")
    parser.add_argument("--csv", default="bench/results/logprobs.csv")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.hidden, args.vocab, args.repeats = [1024], [896], [49152], 1
    return args


COLUMNS = [
    "method", "n", "hidden", "vocab", "dtype", "median_s", "median_cpu_s", "peak_mib", "time_vs_naive",
    "cpu_time_vs_naive", "mem_vs_naive",
]


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    methods = available_methods(args.methods, device)
    for index, (n, hidden_size, vocab) in enumerate(itertools.product(args.n, args.hidden, args.vocab)):
        rows = bench_shape(n, hidden_size, vocab, dtype, device, methods, args)
        write_csv(args.csv, rows)
        print(markdown_rows(rows, COLUMNS, header=index == 0), flush=True)


if __name__ == "__main__":
    main()
