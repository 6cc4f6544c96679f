"""Weight hot-swap time against model size: the full-weight push of an fp32 HF policy into
an in-process vLLM engine (`VLLMEngine.update_weights`: cast to the engine dtype,
`reload_weights`, tied lm-head repack, prefix-cache reset), one model after another.

    python -m bench.bench_sync --models micro-llama tiny-llama smollm2-135m-instruct

Appends CSV rows (bench/results/sync.csv) and prints a markdown table. Under torchrun the
trainer adds the FSDP2 gather to this; its `time/weight_sync` metric shows the total.
"""

from __future__ import annotations

import argparse
import os

import torch

from bench.harness import markdown_rows, measure_round_robin, write_csv
from grailcore import dist as gdist
from grailcore.config import Config, RolloutConfig
from grailcore.model import load_policy, resolve_model_path
from grailcore.rollout.vllm_engine import VLLMEngine


def bench_model(name: str, info, repeats: int) -> dict:
    model_dir = resolve_model_path(name)
    policy = load_policy(model_dir, "float32").eval()
    params = sum(p.numel() for p in policy.parameters())
    cfg = Config(seed=0, rollout=RolloutConfig(max_prompt_tokens=256, max_completion_tokens=16,
                                               vllm_kv_cache_bytes=64 << 20))
    engine = VLLMEngine.create(model_dir, cfg, info)
    try:
        swap = measure_round_robin({"swap": lambda: engine.update_weights(policy.named_parameters())},
                                   device="cpu", warmup=1, repeats=repeats)["swap"]
    finally:
        engine.close()
    fp32_mib = params * 4 / 2**20
    return {"model": name, "params_m": round(params / 1e6, 2), "fp32_mib": round(fp32_mib, 1),
            "median_s": round(swap.median_s, 3), "median_cpu_s": round(swap.median_cpu_s, 3),
            "mib_per_s": round(fp32_mib / swap.median_s, 1), "peak_extra_mib": round(swap.peak_mib, 1),
            "repeats": len(swap.seconds), "load_avg_1m": round(os.getloadavg()[0], 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["micro-llama", "tiny-llama", "smollm2-135m-instruct"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default="bench/results/sync.csv")
    args = parser.parse_args(argv)
    info = gdist.init_distributed()
    rows = [bench_model(name, info, args.repeats) for name in args.models]
    write_csv(args.csv, rows)
    print(markdown_rows(rows, list(rows[0]), header=True))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
