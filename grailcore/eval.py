"""Evaluate viewer simulation: `python -m grailcore.eval --model NAME --data PATH` samples a
model through the rollout engine; `--completions F.jsonl` scores existing completions.
Writes metrics.json, report.md and PNG plots into `--out`."""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Literal, Sequence

import tyro

from grailcore.cli import command, load_preset
from grailcore.config import Config
from grailcore.evaluation.evaluate import EvalOptions
from grailcore.evaluation.run import EvalJob, run


@dataclass(frozen=True)
class EvalArgs:
    """Score a model or a completions file on viewer rows (unset fields come from --cfg or defaults)."""

    completions: str | None = None
    """JSONL rows with the seed sample's prompt fields plus `completion` (str) or `completions`
    (list; the first is scored as the greedy answer); `example_completion` also works."""
    model: str | None = None
    """Registry name or local HF dir to sample from (default: the preset's model)."""
    data: str | None = None
    """Eval data, any loader path (default: the preset's data.eval_path, else data.train_path)."""
    split: Literal["train", "validation", "test"] = "validation"
    train_data: str | None = None
    """Loader data whose train split fits the position/opinion priors; must not share rows with the
    evaluated ones (default: the train split of --data when it has splits, else the eval rows, labelled)."""
    max_samples: int | None = None
    """Evaluate N rows (default: all): with --model a --seed-ed sample spread over the split's viewers
    (the rows a trainer with eval.max_samples N and data.seed S evaluates), with --completions the file's first N."""
    samples_per_row: int | None = None
    """k completions per row; 1 = greedy (default: the preset's eval.samples_per_row)."""
    temperature: float | None = None
    """Sampling temperature when k > 1 (default: the preset's eval.temperature)."""
    temperatures: tuple[float, ...] = ()
    """A temperature sweep instead of --temperature: the model is loaded once and samples the same rows
    at each temperature; each is scored into OUT/T<t>/ (e.g. --temperatures 0.5 0.7 1.0 1.3 -> OUT/T0.5 ...)."""
    max_tokens: int | None = None
    """Completion length cap (default: the preset's rollout.max_completion_tokens)."""
    permutations: int | None = None
    """Order robustness: also sample/score every row under R seeded option permutations (default: the
    preset's eval.permutations). With --completions, reads <stem>_perm1..R.jsonl beside the file."""
    cfg: str | None = None
    """Preset (configs/x.py or YAML) whose model, data, rollout and eval sections supply defaults."""
    out: str = "runs/eval"
    n_boot: int = 1000
    """Bootstrap replicates of the viewer-clustered 95% intervals (0 = none)."""
    smoothing_alpha: float = 1.0
    """Additive smoothing of the histogram fallback (completions files without answer-slot
    distributions, or --no-exact)."""
    no_exact: bool = False
    """Keep the sampled answers only and score fidelity with the histogram fallback, instead of reading
    each completion's answer-slot distribution (also off when the preset sets eval.exact_distributions False)."""
    layout: Literal["think", "direct"] | None = None
    """Answer layout the rows are rendered in (default: the preset's data.layout): 'direct' asks for
    `<answer>k</answer><opinion>..</opinion>` with no reasoning and reads each row's distribution once."""
    seed: int = 0


def resolve(args: EvalArgs) -> tuple[EvalJob, Config]:
    """Fill unset arguments from the preset (or the config defaults)."""
    cfg = load_preset(args.cfg) if args.cfg else Config()
    if args.layout is not None:
        cfg = replace(cfg, data=replace(cfg.data, layout=args.layout))
    if args.completions is None and args.model is None and args.cfg is None:
        raise SystemExit("give --completions F.jsonl, or --model (and --data) to sample a model, or --cfg")
    job = EvalJob(
        out=args.out,
        options=EvalOptions(n_boot=args.n_boot, smoothing_alpha=args.smoothing_alpha, seed=args.seed),
        completions=args.completions,
        model=args.model or cfg.model.name_or_path,
        data=args.data or cfg.data.eval_path or cfg.data.train_path,
        split=args.split,
        train_data=args.train_data,
        max_samples=args.max_samples,
        samples_per_row=args.samples_per_row or cfg.eval.samples_per_row,
        temperature=args.temperature if args.temperature is not None else cfg.eval.temperature,
        max_tokens=args.max_tokens or cfg.rollout.max_completion_tokens,
        permutations=args.permutations if args.permutations is not None else cfg.eval.permutations,
        temperatures=tuple(args.temperatures),
        exact=cfg.eval.exact_distributions and not args.no_exact,
    )
    if job.permutations < 0:
        raise SystemExit(f"--permutations must be >= 0, got {job.permutations}")
    return job, cfg


def main(argv: Sequence[str] | None = None) -> dict:
    args = tyro.cli(EvalArgs, args=sys.argv[1:] if argv is None else list(argv), description=__doc__,
                    prog="python -m grailcore.eval")
    return run(*resolve(args))


if __name__ == "__main__":
    command(main)
