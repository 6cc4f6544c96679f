"""Forward + backward of the GRPO loss from the last hidden states, side by side: naive (full
logits, log_softmax, the loss), grailcore's `fused_grpo_loss`, Liger-Kernel's
`LigerFusedLinearGRPOLoss` (compiled=False and True) and torch's `linear_cross_entropy` for
the log-probs followed by the loss. Every method computes the same loss (dapo, clip-higher,
k3 KL) on the same inputs, each call in a fresh process so peak RSS is its own; rounds go
round-robin over the methods so load from other processes hits all alike. Prints a table,
appends CSV rows (bench/harness.py)."""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

from bench import machine
from bench.harness import markdown_rows, measure_round_robin, write_csv
from kernels.grpo_loss import default_chunk_size, fused_grpo_loss
from kernels.objective import Objective, objective_loss, padded_tokens

TEMPERATURE, EPS_LOW, EPS_HIGH, BETA, LOSS_TYPE = 0.7, 0.2, 0.28, 0.04, "dapo"


def _loss_from_logprobs(logprobs, inputs):
    """The loss of [B, T] log-probs through the shared objective (as grailcore's naive path)."""
    index, tokens = padded_tokens(inputs["mask"], inputs["advantages"], loss_type=LOSS_TYPE,
                                  old_logprobs=inputs["old"], ref_logprobs=inputs["ref"])
    objective = Objective(epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA)
    return objective_loss(logprobs.reshape(-1)[index], tokens, objective)[0]


def naive(hidden, weight, inputs, chunk_size):
    logits = (hidden.flatten(0, 1) @ weight.T).float() / TEMPERATURE  # [B*T, V]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, inputs["targets"].reshape(-1, 1))
    return _loss_from_logprobs(logprobs.view(inputs["targets"].shape), inputs)


def _grailcore(impl):
    def run(hidden, weight, inputs, chunk_size):
        loss, _ = fused_grpo_loss(
            hidden, weight, inputs["targets"], inputs["old"], inputs["ref"], inputs["advantages"], inputs["mask"],
            temperature=TEMPERATURE, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=BETA, loss_type=LOSS_TYPE,
            chunk_size=chunk_size, impl=impl,
        )
        return loss

    return run


def torch_lce(hidden, weight, inputs, chunk_size):
    """torch 2.13's chunked linear + cross-entropy for the log-probs (recomputes in backward),
    with the same rows per chunk as grailcore, then the loss."""
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size, chunking_method=None)
    targets = inputs["targets"].reshape(-1)
    logprobs = -F.linear_cross_entropy(hidden.flatten(0, 1) / TEMPERATURE, weight, targets, reduction="none",
                                       options=options)
    return _loss_from_logprobs(logprobs.view(inputs["targets"].shape), inputs)


def _liger(compiled):
    def run(hidden, weight, inputs, chunk_size):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # benchmark extra, never in grailcore

        loss_fn = LigerFusedLinearGRPOLoss(beta=BETA, compiled=compiled, use_ref_model=True, epsilon_low=EPS_LOW,
                                           epsilon_high=EPS_HIGH, loss_type=LOSS_TYPE, temperature=TEMPERATURE)
        loss, _ = loss_fn(hidden, weight, inputs["targets"], inputs["mask"].long(), inputs["advantages"],
                          ref_per_token_logps=inputs["ref"], old_per_token_logps=inputs["old"])
        return loss

    return run


IMPLEMENTATIONS = {
    "naive": naive,
    "grailcore": _grailcore("torch"),
    "grailcore_triton": _grailcore("triton"),
    "liger": _liger(compiled=False),
    "liger_compiled": _liger(compiled=True),
    "torch_lce": torch_lce,
}
CUDA_ONLY = ("grailcore_triton",)


def make_inputs(batch, seq, hidden_size, vocab, dtype, device):
    """Seeded hidden states [B, T, H], lm head [V, H], targets, old/ref log-probs of a random
    model's size, advantages; every token valid (as in the issue's measurements)."""
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(batch, seq, hidden_size, generator=generator, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator, device=device) / hidden_size**0.5).to(dtype)
    old = -torch.rand(batch, seq, generator=generator, device=device) * 5 - 8
    inputs = {
        "targets": torch.randint(0, vocab, (batch, seq), generator=generator, device=device),
        "mask": torch.ones(batch, seq, dtype=torch.bool, device=device), "old": old, "ref": old + 0.1,
        "advantages": torch.randn(batch, generator=generator, device=device),
    }
    return hidden.requires_grad_(), weight.requires_grad_(), inputs


def worker(args):
    """One method, one shape, in this process: warm-up calls, then one measured call. Prints
    one JSON line: wall and CPU seconds, peak extra RSS, and the loss (for the cross-check)."""
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    hidden, weight, inputs = make_inputs(args.batch, args.seq, args.hidden, args.vocab, dtype, device)
    name, _, rows = args.worker.partition("@")  # "grailcore@128": 128 rows per chunk
    fn = IMPLEMENTATIONS[name]
    chunk_size = int(rows or 0) or args.chunk_size or default_chunk_size(args.batch * args.seq, args.vocab)
    warmup = max(1, args.warmup) if name == "liger_compiled" else args.warmup  # compilation is not timed
    losses = []

    def call():
        loss = fn(hidden, weight, inputs, chunk_size)
        loss.backward()
        losses.append(float(loss.detach()))

    def drop_grads(_name):
        hidden.grad = weight.grad = None

    result = measure_round_robin({args.worker: call}, device=device, warmup=warmup, repeats=1,
                                 after_each=drop_grads)[args.worker]
    rows_per_chunk = {"naive": "", "liger": f"{args.seq} (1 seq)", "liger_compiled": f"{args.seq} (1 seq)"}
    print(json.dumps({"wall_s": result.seconds[0], "cpu_s": result.cpu_seconds[0], "peak_mib": result.peak_mib,
                      "loss": losses[-1], "chunk_size": rows_per_chunk.get(name, chunk_size), "warmup": warmup}))


def _run_worker(method, batch, seq, hidden_size, vocab, args):
    command = [sys.executable, "-m", "bench.bench_grpo_loss", "--worker", method, "--batch", str(batch),
               "--seq", str(seq), "--hidden", str(hidden_size), "--vocab", str(vocab), "--dtype", args.dtype,
               "--device", args.device, "--warmup", str(args.warmup)]
    if args.chunk_size:
        command += ["--chunk-size", str(args.chunk_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        print(f"{method} at B={batch} T={seq} V={vocab} failed (exit {done.returncode}): {tail[0]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_shape(batch, seq, hidden_size, vocab, methods, args):
    """`args.rounds` rounds, each running every method once in its own process."""
    runs = {method: [] for method in methods}
    for _ in range(args.rounds):
        for method in methods:
            result = _run_worker(method, batch, seq, hidden_size, vocab, args)
            if result is not None:
                runs[method].append(result)
    losses = {m: r[0]["loss"] for m, r in runs.items() if r}
    reference = losses.get("naive", next(iter(losses.values()), None))
    for method, loss in losses.items():  # every method must compute the same loss
        if abs(loss - reference) > 1e-4 * max(1.0, abs(reference)):
            raise RuntimeError(f"{method} gave loss {loss}, {reference} expected: not the same loss")
    median = {m: {k: statistics.median(x[k] for x in r) for k in ("wall_s", "cpu_s", "peak_mib")}
              for m, r in runs.items() if r}
    baseline = median.get("naive")
    rows = []
    for method, values in median.items():
        spread = lambda key: f"{min(x[key] for x in runs[method]):.2f}-{max(x[key] for x in runs[method]):.2f}"  # noqa: E731
        ratio = lambda key: round(values[key] / baseline[key], 3) if baseline else ""  # noqa: E731
        rows.append({
            "method": method, "batch": batch, "seq": seq, "tokens": batch * seq, "hidden": hidden_size,
            "vocab": vocab, "dtype": args.dtype, "device": args.device, "chunk_size": runs[method][0]["chunk_size"],
            "median_s": round(values["wall_s"], 3), "wall_range_s": spread("wall_s"),
            "median_cpu_s": round(values["cpu_s"], 3), "cpu_range_s": spread("cpu_s"),
            "peak_mib": round(values["peak_mib"], 1), "peak_range_mib": spread("peak_mib"),
            "time_vs_naive": ratio("wall_s"), "cpu_time_vs_naive": ratio("cpu_s"), "mem_vs_naive": ratio("peak_mib"),
            "rounds": len(runs[method]), "warmup": runs[method][0]["warmup"], "loss": losses[method], "cpu": machine.summary(),
        })
    return rows


COLUMNS = ["method", "tokens", "vocab", "chunk_size", "median_s", "wall_range_s", "median_cpu_s", "cpu_range_s",
           "peak_mib", "peak_range_mib", "time_vs_naive", "cpu_time_vs_naive", "mem_vs_naive"]


def available_methods(names, device):
    chosen = []
    for method in names:
        name = method.partition("@")[0]
        if name not in IMPLEMENTATIONS:
            raise SystemExit(f"unknown method {method!r}; choose from {list(IMPLEMENTATIONS)} (name@rows for a chunk size)")
        if name in CUDA_ONLY and device.type != "cuda":
            print(f"skip {name}: needs CUDA", file=sys.stderr)
        elif name.startswith("liger") and importlib.util.find_spec("liger_kernel") is None:
            print(f"skip {name}: liger-kernel is not installed (pip install -e '.[bench]')", file=sys.stderr)
        else:
            chosen.append(method)
    return chosen


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64], help="sequences (tokens = batch x seq)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (SmolLM2-135M: 576)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=["naive", "grailcore", "liger", "liger_compiled", "torch_lce"],
                        help=f"of {list(IMPLEMENTATIONS)}; name@rows sets the rows per chunk (grailcore, torch_lce)")
    parser.add_argument("--skip-naive-above", type=float, default=10.0,
                        help="GiB: skip naive where B*T*V*4 bytes x 3 (its [N, V] tensors) would exceed this")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: grailcore's policy)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed calls before the measured one, per process (liger_compiled: at least 1)")
    parser.add_argument("--rounds", type=int, default=3, help="processes per method and shape")
    parser.add_argument("--csv", default="bench/results/grpo_loss.csv")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        args.batch = args.batch[0] if isinstance(args.batch, list) else args.batch
        args.vocab = args.vocab[0] if isinstance(args.vocab, list) else args.vocab
        return worker(args)
    methods = available_methods(args.methods, torch.device(args.device))
    for index, (batch, vocab) in enumerate((b, v) for b in args.batch for v in args.vocab):
        shape_methods = methods
        naive_gib = batch * args.seq * vocab * 4 * 3 / 2**30
        if "naive" in methods and naive_gib > args.skip_naive_above:
            print(f"skip naive at {batch * args.seq} tokens, V={vocab}: ~{naive_gib:.0f} GiB of [N, V] tensors",
                  file=sys.stderr)
            shape_methods = [m for m in methods if m != "naive"]
        rows = bench_shape(batch, args.seq, args.hidden, vocab, shape_methods, args)
        write_csv(args.csv, rows)
        print(markdown_rows(rows, COLUMNS, header=index == 0), flush=True)


if __name__ == "__main__":
    main()
