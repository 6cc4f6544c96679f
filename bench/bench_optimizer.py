"""AdamW step time, torch's `foreach` against its `fused` implementation, on the trainable
parameters of a real policy (SmolLM2-135M-Instruct by default, fp32, all layers), the two
alternating so load hits both alike. grailcore's trainer uses `fused` where it applies.

    python -m bench.bench_optimizer --models smollm2-135m-instruct --repeats 5

Appends CSV rows (bench/results/optimizer.csv) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.harness import markdown_rows, measure_round_robin, write_csv
from grailcore.model import load_policy, resolve_model_path


def bench_model(name: str, repeats: int) -> list[dict]:
    policy = load_policy(resolve_model_path(name), "float32")
    params = [p for p in policy.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 1e-3
    optimizers = {kind: torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0, **{kind: True})
                  for kind in ("foreach", "fused")}
    with torch.no_grad():
        results = measure_round_robin({kind: opt.step for kind, opt in optimizers.items()},
                                      device="cpu", warmup=1, repeats=repeats)
    n = sum(p.numel() for p in params)
    base = results["foreach"].median_s
    return [{"model": name, "params_m": round(n / 1e6, 2), "impl": kind, "median_s": round(r.median_s, 4),
             "median_cpu_s": round(r.median_cpu_s, 4), "vs_foreach": round(r.median_s / base, 3),
             "threads": torch.get_num_threads(), "repeats": len(r.seconds),
             "load_avg_1m": round(os.getloadavg()[0], 1)} for kind, r in results.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default="bench/results/optimizer.csv")
    args = parser.parse_args(argv)
    rows = [row for name in args.models for row in bench_model(name, args.repeats)]
    write_csv(args.csv, rows)
    print(markdown_rows(rows, list(rows[0]), header=True))


if __name__ == "__main__":
    main()
