"""Weight hot-swap time per sync method: an fp32 policy pushed into an in-process vLLM engine
(`grailcore.rollout.sync.push_weights` -> `VLLMEngine.update_weights`: FSDP gathers, vLLM's
reload with its cast to the engine dtype, tied lm-head repack, prefix-cache reset), methods
round-robin on the same engine:

- `per_tensor`: every weight, one gather (under FSDP) per tensor: the first sync of a run;
- `bucketed_<N>mib`: every weight, gathered N MiB at a time through one flat buffer
  (`--bucket-mib`, several sizes side by side; under torchrun only: one process gathers nothing);
- `changed_only`: what an optimizer step can change with the bottom layers frozen
  (`--trainable-layers`, as `model.trainable_layers`): every later sync of such a run.

    python -m bench.bench_sync --models micro-llama tiny-llama smollm2-135m-instruct
    torchrun --nproc_per_node 2 -m bench.bench_sync --models smollm2-135m-instruct

Under torchrun the policy is FSDP2-sharded (grailcore.parallel) and every rank pushes into
its own engine, as in training; times are the slowest rank's. Appends CSV rows
(bench/results/sync.csv) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import os

import torch

from bench import machine
from bench.harness import markdown_rows, measure_round_robin, write_csv
from grailcore import dist as gdist
from grailcore.build import _freeze_below
from grailcore.config import Config, ModelConfig, RolloutConfig
from grailcore.model import load_policy, resolve_model_path
from grailcore.policy import PolicyModel
from grailcore.rollout.sync import changed_names, push_weights
from grailcore.rollout.vllm_engine import VLLMEngine

METHODS = ("per_tensor", "bucketed", "changed_only")


def _policy(model_dir, cfg: Config, info) -> torch.nn.Module:
    lm = load_policy(model_dir, "float32")
    _freeze_below(lm, min(cfg.model.trainable_layers, len(lm.get_decoder().layers)))
    if info.world_size == 1:
        return lm
    from grailcore.parallel import parallelize

    return parallelize(PolicyModel(lm, "fused", 1024), cfg, info).lm


def bench_model(name: str, info, args) -> dict:
    model_dir = resolve_model_path(name)
    cfg = Config(seed=0, model=ModelConfig(trainable_layers=args.trainable_layers, gradient_checkpointing=False),
                 rollout=RolloutConfig(max_prompt_tokens=256, max_completion_tokens=16,
                                       vllm_kv_cache_bytes=64 << 20, engine_dtype=args.engine_dtype))
    policy = _policy(model_dir, cfg, info)
    params = sum(p.numel() for p in policy.parameters())  # DTensor.numel() is the global count
    engine = VLLMEngine.create(model_dir, cfg, info)
    sent: dict[str, int] = {}
    pushes = {"per_tensor": dict(changed_only=False, bucket_bytes=0),
              **{f"bucketed_{mib}mib": dict(changed_only=False, bucket_bytes=mib << 20) for mib in args.bucket_mib},
              "changed_only": dict(changed_only=True, bucket_bytes=0)}
    methods = [m for m in pushes if m.split("_")[0] in {a.split("_")[0] for a in args.methods}
               and not (m.startswith("bucketed") and info.world_size == 1)]  # nothing to gather in one process

    def call(method):
        def push():
            sent[method] = push_weights(policy, engine, **pushes[method])
            gdist.barrier()  # the slowest rank's time
        return push

    try:
        results = measure_round_robin({m: call(m) for m in methods}, device="cpu", warmup=1,
                                      repeats=args.repeats)
    finally:
        engine.close()  # vLLM's shutdown destroys the process group: nothing collective after this
    row = {"model": name, "params_m": round(params / 1e6, 2), "fp32_mib": round(params * 4 / 2**20, 1),
           "world_size": info.world_size, "engine_dtype": engine.precision.name,
           "trainable_layers": args.trainable_layers,
           "changed_tensors": len(changed_names(policy))}
    for method, result in results.items():
        row[f"{method}_s"] = round(result.median_s, 3)
        row[f"{method}_cpu_s"] = round(result.median_cpu_s, 3)
        row[f"{method}_tensors"] = sent[method]
    for method in results:
        if method != "per_tensor" and "per_tensor" in results:
            row[f"{method}_vs_per_tensor"] = round(results[method].median_s / results["per_tensor"].median_s, 3)
    row.update(repeats=args.repeats, load_avg_1m=round(os.getloadavg()[0], 1), cpu=machine.summary())
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["micro-llama", "tiny-llama", "smollm2-135m-instruct"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--trainable-layers", type=int, default=8,
                        help="top decoder layers left trainable (changed_only sends these); the demo trains 8")
    parser.add_argument("--bucket-mib", type=int, nargs="+", default=[8, 32], help="bucket sizes, one column each")
    parser.add_argument("--engine-dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default="bench/results/sync.csv")
    args = parser.parse_args(argv)
    info = gdist.init_distributed()
    if info.world_size > 1 and len(args.models) > 1:
        parser.error("under torchrun give one model per run (the engine's shutdown ends the process group)")
    rows = [bench_model(name, info, args) for name in args.models]
    if info.rank == 0:
        write_csv(args.csv, rows)
        print(markdown_rows(rows, list(rows[0]), header=True))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
