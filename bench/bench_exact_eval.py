"""What exact answer-slot distributions add to an evaluation: the same rows sampled by the
same engine with the same seed, once sampling only (`exact=False`, the histogram-fallback
evaluation) and once with every completion's answer-slot distribution read
(`exact=True`), round-robin in one process. Target: exact <= 1.2x sampling-only.
Appends CSV rows to bench/results/exact_eval.csv.

    python -m bench.bench_exact_eval --engine vllm --rows 16 --samples 4 --max-tokens 128
"""

import argparse
import os

import numpy as np
import torch

from bench.harness import markdown_rows, measure_round_robin, write_csv
from grailcore import dist as gdist
from grailcore.config import Config, DataConfig, RolloutConfig
from grailcore.data import load_examples
from grailcore.data.prompt import encode_prompt
from grailcore.evaluation.generate import eval_sampling_params, generate_raw
from grailcore.model import load_policy, load_tokenizer, resolve_model_path
from grailcore.rollout.hf import HFEngine


def build_engine(args, tokenizer, examples):
    model_dir = resolve_model_path(args.model)
    if args.engine == "hf":
        return HFEngine(load_policy(model_dir, "float32").eval().requires_grad_(False), tokenizer)
    from grailcore.rollout.vllm_engine import VLLMEngine

    longest = max(len(encode_prompt(tokenizer, ex)) for ex in examples)
    rollout = RolloutConfig(max_prompt_tokens=longest, max_completion_tokens=args.max_tokens,
                            vllm_kv_cache_bytes=args.kv_cache_mib << 20)
    return VLLMEngine.create(model_dir, Config(seed=0, rollout=rollout), gdist.init_distributed())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("hf", "vllm"), default="vllm")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="registry name or local HF dir")
    parser.add_argument("--rows", type=int, default=16, help="validation rows of synthetic:gun_control")
    parser.add_argument("--samples", type=int, default=4, help="completions per row (k)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--layout", choices=("think", "direct"), default="think")
    parser.add_argument("--kv-cache-mib", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--csv", default="bench/results/exact_eval.csv")
    args = parser.parse_args(argv)

    model_dir = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_dir)
    examples = load_examples("synthetic:gun_control", DataConfig(synthetic_n=3000, layout=args.layout),
                             split="validation").examples[:args.rows]
    engine = build_engine(args, tokenizer, examples)
    params = eval_sampling_params(args.samples, args.temperature, args.max_tokens, seed=0)
    last = {}

    def run(name: str, exact: bool, sampled_reads: bool = True, prune_below: float | None = None,
            mixture: str = "draw"):
        def call():
            last[name] = generate_raw(engine, tokenizer, examples, params, exact=exact, sampled_reads=sampled_reads,
                                      prune_below=prune_below, mixture=mixture)
        return call

    tight = 1e-6  # the cut before sampled reads: the reference every exact mode is compared with
    modes = {"sampling_only": run("sampling_only", False), "sampling_exact": run("sampling_exact", True),
             "sampling_exact_all_mixtures": run("sampling_exact_all_mixtures", True, mixture="exact"),
             "sampling_exact_tight": run("sampling_exact_tight", True, prune_below=tight, mixture="exact"),
             "sampling_exact_scored_tight": run("sampling_exact_scored_tight", True, False, tight, "exact")}
    results = measure_round_robin(modes, device="cpu", warmup=args.warmup, repeats=args.repeats)
    raw = last["sampling_only"][0]
    reference = last["sampling_exact_scored_tight"][1]
    same = all([c.token_ids for row in raw for c in row] == [c.token_ids for row in other for c in row]
               for other, _ in last.values())

    def gap(slots) -> str:  # the largest difference of any read probability from the reference reads
        if slots is None:  # (a drawn mixture's opinion is an estimate, not a read: left out)
            return ""
        pairs = [(s.choice + (s.opinion if s.opinion_slot != "mixture_draw" else ()),
                  t.choice + (t.opinion if s.opinion_slot != "mixture_draw" else ()))
                 for r, q in zip(slots, reference) for s, t in zip(r.samples, q.samples)]
        return f"{max(abs(a - b) for mine, theirs in pairs for a, b in zip(mine, theirs)):.1e}"

    def opinion_tv(slots) -> str:  # mean over rows of the TV between row-mean opinion distributions
        if slots is None:  # (what a drawn mixture's noise and the cut move in the evaluation's estimate)
            return ""
        tvs = [0.5 * np.abs(np.mean([s.opinion for s in r.samples], axis=0)
                            - np.mean([s.opinion for s in q.samples], axis=0)).sum() for r, q in zip(slots, reference)]
        return f"{np.mean(tvs):.1e}"

    def share(slots, field: str, kinds: tuple[str, ...]) -> float | str:  # of the completions
        if slots is None:
            return ""
        samples = [s for r in slots for s in r.samples]
        return round(sum(getattr(s, field) in kinds for s in samples) / len(samples), 3)

    forced = share(last["sampling_exact"][1], "choice_slot", ("forced",))
    base = results["sampling_only"]
    rows = [{"what": name, "engine": args.engine, "model": args.model, "layout": args.layout, "rows": args.rows,
             "samples": args.samples, "max_tokens": args.max_tokens, "temperature": args.temperature,
             "torch_threads": torch.get_num_threads(), "median_s": round(r.median_s, 2),
             "median_cpu_s": round(r.median_cpu_s, 2), "ratio_vs_sampling": round(r.median_s / base.median_s, 3),
             "cpu_ratio_vs_sampling": round(r.median_cpu_s / base.median_cpu_s, 3),
             "forced_slot_share": forced, "mixture_share": share(last[name][1], "opinion_slot", ("mixture", "mixture_draw")),
             "same_completions": same,
             "max_abs_diff_vs_scored_tight": gap(last[name][1]),
             "row_opinion_tv_vs_scored_tight": opinion_tv(last[name][1]),
             "new_tokens": sum(len(c.token_ids) for row in raw for c in row), "repeats": len(r.seconds),
             "load_avg_1m": round(os.getloadavg()[0], 1)} for name, r in results.items()]
    write_csv(args.csv, rows)
    print(markdown_rows(rows, list(rows[0]), header=True))
    if args.engine == "vllm":
        engine.close()


if __name__ == "__main__":
    main()
