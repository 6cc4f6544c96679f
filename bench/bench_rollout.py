"""Rollouts on chat-templated viewer prompts: in-process vLLM (VLLMEngine) vs transformers
generate (HFEngine), warm and round-robin, plus a full-weight hot swap. `--vllm-dtypes
bfloat16 float32` runs one vLLM engine per dtype side by side (is bf16 native on this CPU?);
`--engine-threads 1 2` runs each on each thread count (`rollout.engine_threads`).
Under torchrun it instead compares an engine per rank against rank 0 generating for all.
Appends CSV rows, each naming the CPU (bench/machine.py)."""

import argparse
import os
import statistics

import torch

from bench import machine
from bench.harness import markdown_rows, measure_round_robin, write_csv
from grailcore import dist as gdist
from grailcore.config import Config, DataConfig, RolloutConfig
from grailcore.data import load_examples
from grailcore.data.prompt import encode_prompt
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.rollout.hf import HFEngine
from grailcore.rollout.vllm_engine import VLLMEngine
from grailcore.types import SamplingParams


def build_prompts(tokenizer, count: int) -> list[list[int]]:
    """The first `count` synthetic gun-control viewer prompts (~550-750 tokens each)."""
    examples = load_examples("synthetic:gun_control", DataConfig(synthetic_n=8 * count), split="train").examples
    if len(examples) < count:
        raise ValueError(f"synthetic:gun_control gave {len(examples)} train prompts, fewer than --prompts {count}")
    return [encode_prompt(tokenizer, ex) for ex in examples[:count]]


def engine_config(args, prompts, engine_dtype: str = "auto") -> Config:
    longest = max(len(p) for p in prompts)
    rollout = RolloutConfig(max_prompt_tokens=max(longest, 16), max_completion_tokens=args.max_tokens,
                            vllm_kv_cache_bytes=args.kv_cache_mib << 20, engine_dtype=engine_dtype)
    return Config(seed=0, rollout=rollout)


def timed_generate(engine, prompts, params, new_tokens: list[int]):
    """A callable for the harness that also records the new tokens of each call."""
    def call():
        groups = engine.generate(prompts, params)
        new_tokens.append(sum(len(c.token_ids) for g in groups for c in g))
    return call


class _OnThreads:
    """A vLLM engine generating on `threads` torch threads (`rollout.engine_threads`)."""

    def __init__(self, engine, threads: int):
        self.engine, self.threads, self.precision = engine, threads, engine.precision

    def generate(self, prompts, params):
        self.engine.threads = self.threads
        return self.engine.generate(prompts, params)

    def update_weights(self, named_tensors):
        self.engine.threads = self.threads
        self.engine.update_weights(named_tensors)


def generation_rows(results, tokens, args, engines, threads: dict, load) -> list[dict]:
    baseline = results[next(iter(results))]  # HF generate, or the first vLLM dtype with --no-hf
    rows = []
    for name, result in results.items():
        median_tokens = statistics.median(tokens[name])
        rows.append({
            "what": f"generate_{name}", "dtype": engines[name].precision.name, "cpu": machine.summary(),
            "torch_threads": threads[name],
            "prompts": args.prompts, "samples": args.samples, "max_tokens": args.max_tokens,
            "median_s": round(result.median_s, 3), "median_cpu_s": round(result.median_cpu_s, 3),
            "new_tokens": median_tokens, "tok_per_s": round(median_tokens / result.median_s, 1),
            "speedup_vs_first": round(baseline.median_s / result.median_s, 2),
            "cpu_speedup_vs_first": round(baseline.median_cpu_s / result.median_cpu_s, 2),
            "peak_mib": round(result.peak_mib, 1), "repeats": len(result.seconds), "load_avg_1m": load,
        })
    return rows


def bench_engines(args) -> list[dict]:
    """One process: both engines on the same prompts and sampling parameters."""
    model_dir = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_dir)
    prompts = build_prompts(tokenizer, args.prompts)
    policy = load_policy(model_dir, "float32").eval()  # the trainer's policy: the HF engine samples from it
    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)  # before the engine starts: vLLM then disables the setter
    info = gdist.init_distributed()
    engines = {} if args.no_hf else {"hf": HFEngine(policy, tokenizer)}
    threads = {"hf": torch.get_num_threads()}
    vllm_engines = {}
    for dtype in args.vllm_dtypes:  # one in-process engine per dtype, side by side
        name = "vllm" if len(args.vllm_dtypes) == 1 else f"vllm_{dtype}"
        vllm_engines[name] = VLLMEngine.create(model_dir, engine_config(args, prompts, dtype), info)
        for count in args.engine_threads:  # the same engine on each thread count, calls alternating
            run = name if len(args.engine_threads) == 1 else f"{name}_{count}t"
            engines[run], threads[run] = _OnThreads(vllm_engines[name], count), count or torch.get_num_threads()
    params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
    tokens = {name: [] for name in engines}
    calls = {name: timed_generate(engine, prompts, params, tokens[name]) for name, engine in engines.items()}
    results = measure_round_robin(calls, device="cpu", warmup=args.warmup, repeats=args.repeats)
    for name in tokens:
        del tokens[name][:args.warmup]
    rows = generation_rows(results, tokens, args, engines, threads, round(os.getloadavg()[0], 1))
    runs = {name: e for name, e in engines.items() if name != "hf"}
    swaps = measure_round_robin({name: (lambda e=e: e.update_weights(policy.named_parameters()))
                                 for name, e in runs.items()}, device="cpu", warmup=1, repeats=args.repeats)
    for name, swap in swaps.items():
        rows.append({"what": f"swap_full_weights_{name}", "dtype": f"float32->{runs[name].precision.name}",
                     "torch_threads": threads[name],
                     "median_s": round(swap.median_s, 3), "median_cpu_s": round(swap.median_cpu_s, 3),
                     "peak_mib": round(swap.peak_mib, 1), "repeats": len(swap.seconds),
                     "load_avg_1m": round(os.getloadavg()[0], 1)})
    for engine in vllm_engines.values():
        engine.close()
    return rows


def bench_ranks(args) -> list[dict]:
    """Under torchrun: every rank generating its share vs rank 0 generating all prompts
    and broadcasting the completions (ranks > 0 wait). Rows from rank 0 only."""
    info = gdist.init_distributed()
    model_dir = resolve_model_path(args.model)
    prompts = build_prompts(load_tokenizer(model_dir), args.prompts)
    if len(prompts) % info.world_size:
        raise ValueError(f"--prompts {args.prompts} must be divisible by the world size {info.world_size}")
    engine = VLLMEngine.create(model_dir, engine_config(args, prompts), info)
    params = SamplingParams(n=args.samples, temperature=args.temperature, max_tokens=args.max_tokens, seed=info.rank)
    share = len(prompts) // info.world_size
    mine = prompts[info.rank * share:(info.rank + 1) * share]

    def engine_per_rank():
        engine.generate(mine, params)
        gdist.barrier()

    def rank0_generates():
        groups = engine.generate(prompts, params) if info.rank == 0 else None
        gdist.broadcast_object(groups)

    results = measure_round_robin({"engine_per_rank": engine_per_rank, "rank0_generates": rank0_generates},
                                  device="cpu", warmup=args.warmup, repeats=args.repeats)
    baseline = results["rank0_generates"]
    rows = [{"what": name, "dtype": engine.precision.name, "cpu": machine.summary(), "world_size": info.world_size, "prompts": args.prompts,
             "samples": args.samples, "max_tokens": args.max_tokens, "median_s": round(r.median_s, 3),
             "speedup_vs_rank0": round(baseline.median_s / r.median_s, 2), "repeats": len(r.seconds),
             "load_avg_1m": round(os.getloadavg()[0], 1)} for name, r in results.items()]
    gdist.all_reduce_mean({"alive": 1.0})  # the trainer's group still works with engines up
    engine.close()  # last: vLLM's shutdown destroys the default process group
    gdist.shutdown()
    return rows if info.rank == 0 else []


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name or local HF dir")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (n)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--kv-cache-mib", type=int, default=1024)
    parser.add_argument("--hf-threads", type=int, default=None,
                        help="torch threads for the HF engine (default: torch's, i.e. the trainer's)")
    parser.add_argument("--vllm-dtypes", nargs="+", default=["auto"],
                        choices=["auto", "bfloat16", "float32", "float16"],
                        help="rollout.engine_dtype of the vLLM engine; several: one engine each, side by side")
    parser.add_argument("--engine-threads", nargs="+", type=int, default=[1],
                        help="rollout.engine_threads of the vLLM engines (0: the trainer's); several: each "
                             "engine on each count, calls alternating")
    parser.add_argument("--no-hf", action="store_true", help="skip transformers generate (slow)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--csv", default="bench/results/rollout.csv")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rows = bench_ranks(args) if under_torchrun else bench_engines(args)
    if rows:
        csv_path = args.csv.replace(".csv", "_ranks.csv") if under_torchrun else args.csv
        write_csv(csv_path, rows)
        for columns in dict.fromkeys(tuple(row) for row in rows):  # one table per row shape
            print(markdown_rows([r for r in rows if tuple(r) == columns], list(columns), header=True))


if __name__ == "__main__":
    main()
