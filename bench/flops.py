"""Training FLOP/s against the machine's measured matmul peak: the policy's forward +
backward on a GRPO micro-batch (padded and prefix-shared), interleaved with fp32 GEMMs
that set the peak, so both see the same load. Also the FLOP counts train_step.py uses.

    python -m bench.flops --model smollm2-135m-instruct --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from bench.harness import markdown_rows, measure_round_robin, write_csv


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """What the FLOP count of a Llama/Qwen2-style decoder depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> DecoderShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size)

    def forward_flops(self, tokens: float, attention_pairs: float, scored: float) -> float:
        """One forward: `tokens` through every layer's projections and MLP, `attention_pairs`
        (query, key) pairs per layer (QK^T and AV), `scored` rows through the lm head."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_token = 2 * self.layers * (self.hidden * (2 * q_out + 2 * kv_out) + 3 * self.hidden * self.intermediate)
        attention = 4 * self.layers * q_out * attention_pairs
        return per_token * tokens + attention + 2 * self.hidden * self.vocab * scored

    def training_flops(self, tokens: float, attention_pairs: float, scored: float) -> float:
        """Forward + backward (twice the forward), without checkpointing's recompute:
        the model FLOPs a step needs, whatever recompute a trainer adds."""
        return 3 * self.forward_flops(tokens, attention_pairs, scored)


def causal_pairs(length: int) -> int:
    return length * (length + 1) // 2


def padded_work(prompt_lens: list[int], completion_lens: list[int]) -> tuple[int, int, int]:
    """(tokens, attention pairs, scored tokens) of real tokens when each (prompt,
    completion) row runs whole: the prompt repeated in every row, padding not counted."""
    rows = list(zip(prompt_lens, completion_lens))
    return (sum(p + c for p, c in rows), sum(causal_pairs(p + c) for p, c in rows), sum(completion_lens))


def packed_work(packs) -> tuple[int, int, int]:
    """The same for prefix sharing's packed rows (`grailcore.prefix.PackedPrompt`): the
    prompt once per pack, each completion but its last token behind it, tree-mask pairs."""
    tokens = pairs = scored = 0
    for pack in packs:
        segments = torch.bincount(pack.segment_ids)  # [prompt, completion 1, ...] lengths
        prompt, completions = int(segments[0]), segments[1:].tolist()
        tokens += int(pack.segment_ids.numel())
        pairs += causal_pairs(prompt) + sum(c * prompt + causal_pairs(c) for c in completions)
        scored += int(pack.targets.numel())
    return tokens, pairs, scored


def matmul_peak_calls(sizes=(1024, 2048)) -> tuple[dict, dict]:
    """{name: fn} square fp32 GEMMs and {name: flops} of one call each."""
    calls, flops = {}, {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        calls[f"mm{n}"] = (lambda a=a, b=b: torch.mm(a, b))
        flops[f"mm{n}"] = 2 * n**3
    return calls, flops


def _micro_batch(vocab: int, prompt_lens: list[int], completion_lens: list[list[int]], seed: int = 0):
    from grailcore.batch import collate
    from grailcore.types import Completion

    gen = torch.Generator().manual_seed(seed)
    prompt_ids, completions = [], []
    for p_len, lens in zip(prompt_lens, completion_lens):
        prompt = torch.randint(1, vocab, (p_len,), generator=gen).tolist()
        for n in lens:
            prompt_ids.append(prompt)
            completions.append(Completion("", tuple(torch.randint(1, vocab, (n,), generator=gen).tolist()),
                                          None, "stop"))
    return collate(prompt_ids, completions, torch.zeros(len(completions)), pad_id=0)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[610], help="one group per prompt")
    parser.add_argument("--completion-lens", type=int, nargs="+", default=[64, 40, 52, 30],
                        help="completion lengths of each group (every group the same)")
    parser.add_argument("--checkpointing", action="store_true", help="HF gradient checkpointing on")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--vllm-engine", action="store_true",
                        help="then measure everything again with an in-process vLLM engine alive (rows '+vllm')")
    parser.add_argument("--csv", default="bench/results/flops.csv")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from grailcore.model import load_policy, resolve_model_path
    from grailcore.policy import PolicyModel
    from grailcore.prefix import attention_pair_cost, pack_by_prompt

    torch.manual_seed(0)
    lm = load_policy(resolve_model_path(args.model), "float32", "sdpa")
    lm.config.use_cache = False
    if args.checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = PolicyModel(lm.train(), "fused", 1024)
    shape = DecoderShape.from_config(lm.config)
    groups = [(p, list(args.completion_lens)) for p in args.prompt_lens]
    batch = _micro_batch(shape.vocab, args.prompt_lens, [g[1] for g in groups])

    def fwd_bwd(prefix_sharing: bool):
        out = model(batch.input_ids, batch.attention_mask, batch.num_completion_tokens, temperature=1.0,
                    completion_mask=batch.completion_mask, prefix_sharing=prefix_sharing)
        out.logprobs.sum().backward()

    calls, flops = matmul_peak_calls()
    calls |= {"padded": lambda: fwd_bwd(False), "shared": lambda: fwd_bwd(True)}
    flat_prompts = [p for p, lens in groups for _ in lens]
    flat_completions = [c for _, lens in groups for c in lens]
    flops["padded"] = shape.training_flops(*padded_work(flat_prompts, flat_completions))
    packs = pack_by_prompt(batch.input_ids, batch.attention_mask, batch.num_completion_tokens,
                           batch.completion_mask, attention_pair_cost(lm.config))
    flops["shared"] = shape.training_flops(*packed_work(packs))
    load = open("/proc/loadavg").read().split()[0]
    began = time.time()
    rows = measure_rows(calls, flops, args, lm, load, suffix="")
    if args.vllm_engine:  # the same calls again, now with a live in-process engine beside them
        engine = _start_engine(args.model, args.prompt_lens, max(args.completion_lens))
        rows += measure_rows(calls, flops, args, lm, load, suffix="+vllm")
        engine.close()
    print(f"load {load} at start, {time.time() - began:.0f} s")
    write_csv(args.csv, rows)
    print(markdown_rows(rows, list(rows[0]), header=True))


def _start_engine(model: str, prompt_lens: list[int], max_new: int):
    """A VLLMEngine for `model` that has generated once (what the trainer's process holds)."""
    from grailcore import dist as gdist
    from grailcore.config import Config, RolloutConfig
    from grailcore.model import resolve_model_path
    from grailcore.rollout.vllm_engine import VLLMEngine
    from grailcore.types import SamplingParams

    cfg = Config(seed=0, rollout=RolloutConfig(max_prompt_tokens=max(prompt_lens), max_completion_tokens=max_new,
                                               vllm_kv_cache_bytes=256 << 20))
    engine = VLLMEngine.create(resolve_model_path(model), cfg, gdist.init_distributed())
    engine.generate([[1] * n for n in prompt_lens], SamplingParams(n=4, temperature=1.0, max_tokens=max_new, seed=0))
    return engine


def measure_rows(calls, flops, args, lm, load, suffix: str) -> list[dict]:
    results = measure_round_robin(calls, device="cpu", warmup=1, repeats=args.repeats,
                                  after_each=lambda name: lm.zero_grad(set_to_none=True))
    peak = max(flops[n] / results[n].median_s for n in calls if n.startswith("mm"))
    peak_cpu = max(flops[n] / results[n].median_cpu_s for n in calls if n.startswith("mm"))
    print(f"matmul peak{suffix} {peak / 1e9:.1f} GFLOP/s ({peak_cpu / 1e9:.1f} per CPU-second)")
    rows = []
    for name, m in results.items():
        rows.append({
            "name": name + suffix, "model": args.model if not name.startswith("mm") else "-",
            "checkpointing": args.checkpointing, "threads": torch.get_num_threads(), "load_1min": load,
            "median_s": round(m.median_s, 3), "median_cpu_s": round(m.median_cpu_s, 3),
            "gflop": round(flops[name] / 1e9, 1), "gflop_per_s": round(flops[name] / m.median_s / 1e9, 1),
            "of_peak": round(flops[name] / m.median_s / peak, 3),
            "of_peak_cpu_time": round(flops[name] / m.median_cpu_s / peak_cpu, 3),
            "peak_extra_mib": round(m.peak_mib),
        })
    return rows


if __name__ == "__main__":
    main()
