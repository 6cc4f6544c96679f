"""The evaluation job behind `python -m grailcore.eval`: get rows and completions
(from a model through the rollout engine, or from a file), score them, write the report."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from grailcore.config import Config
from grailcore.data.audit import audit_examples
from grailcore.data.schema import Example
from grailcore.evaluation.completions_io import read_completions, write_completions
from grailcore.evaluation.evaluate import EvalOptions, evaluate
from grailcore.evaluation.report import summary_table, write_report



@dataclass(frozen=True)
class EvalJob:
    """Every setting resolved (CLI over preset over defaults); nothing is None that is used."""

    out: str
    options: EvalOptions
    completions: str | None = None
    model: str | None = None
    data: str | None = None
    split: str = "validation"
    train_data: str | None = None
    max_samples: int | None = None
    """Sampling a model: a seeded sample of N rows (options.seed) in stored order; scoring
    a completions file: its first N rows."""
    samples_per_row: int = 1
    temperature: float = 1.0
    max_tokens: int = 128
    permutations: int = 0
    """Order robustness: also score every row under this many seeded option permutations."""
    temperatures: tuple[float, ...] = ()
    """A sweep: one engine samples the rows at each temperature (overriding `temperature`),
    each scored into out/T{t:g}/."""


def load_rows(job: EvalJob, cfg: Config) -> tuple[list[Example], list[Example] | None, dict[str, Any]]:
    """Evaluated examples, training examples for the priors (or None) and a description."""
    from grailcore.data.loaders import load_examples, sample_rows

    result = load_examples(job.data, cfg.data, split=job.split)
    examples = sample_rows(result.examples, job.max_samples or None, job.options.seed)
    meta = {"data": job.data, "split": result.split, "rows_loaded": len(result.examples),
            "rows_skipped_as_malformed": result.skipped}
    raw = [ex for ex in result.raw_examples or () if ex.task == "viewer"]
    if raw:  # what the file carries before re-rendering and shuffling (the scored rows' audit is in results)
        report = audit_examples(raw)
        meta["leak_audit_of_the_file_as_given"] = (f"{report.verdict} on {report.n_examples} rows"
                                                   + "".join(f"; {reason}" for reason in report.reasons))
    return examples, load_train(job, cfg, eval_has_splits=result.split != "all"), meta


def load_train(job: EvalJob, cfg: Config, eval_has_splits: bool) -> list[Example] | None:
    """Rows to fit the position/opinion priors on; never the evaluated rows themselves."""
    from grailcore.data.loaders import load_examples

    if job.train_data:
        return load_examples(job.train_data, cfg.data, split="train").examples
    if not eval_has_splits or job.split == "train":
        return None  # no held-out train rows: priors are fitted on the eval rows (and labelled so)
    return load_examples(job.data, cfg.data, split="train").examples


def check_disjoint(examples: list[Example], train: list[Example] | None) -> None:
    """Priors fitted on the scored rows would flatter the baselines: refuse shared rows."""
    shared = {e.example_id for e in examples} & {t.example_id for t in train or ()}
    if shared:
        raise ValueError(f"the training rows share {len(shared)} example ids with the evaluated rows "
                         f"(e.g. {sorted(shared)[:3]}); give --train-data rows held out from the evaluation")


def build_engine(cfg: Config, model_dir: Path, tokenizer):
    """The configured rollout engine over a freshly loaded policy (HF by default), on the
    GPU when there is one."""
    from grailcore.dist import init_distributed
    from grailcore.model import load_policy
    from grailcore.rollout import build_engine as configured_engine
    from grailcore.rollout.hf import HFEngine

    dist = init_distributed()

    def hf_engine() -> HFEngine:
        policy = load_policy(model_dir, cfg.model.dtype, cfg.model.attn_implementation).to(dist.device)
        return HFEngine(policy.eval().requires_grad_(False), tokenizer, shares_weights=True)

    return configured_engine(cfg, model_dir, dist, hf_engine)


def permuted_path(completions: Path, r: int) -> Path:
    """Where the r-th (1-based) permuted copy's completions sit beside `completions`."""
    return completions.with_name(f"{completions.stem}_perm{r}{completions.suffix}")


def read_permuted(job: EvalJob, n_rows: int) -> list[tuple[list[Example], list[list[str]]]]:
    """The permuted copies written beside `job.completions` by an earlier model run."""
    out = []
    for r in range(1, job.permutations + 1):
        path = permuted_path(Path(job.completions), r)
        if not path.is_file():
            raise FileNotFoundError(f"--permutations {job.permutations} with --completions needs {path} "
                                    "(written by a model run with --permutations)")
        copy, texts = read_completions(path)
        out.append((copy[:n_rows], texts[:n_rows]))
    return out


def open_model(job: EvalJob, cfg: Config) -> tuple[Any, Any]:
    """(engine, tokenizer) of `job.model`; one engine serves every temperature of a sweep."""
    from grailcore.model import load_tokenizer, resolve_model_path

    model_dir = resolve_model_path(job.model)
    tokenizer = load_tokenizer(model_dir)
    return build_engine(cfg, model_dir, tokenizer), tokenizer


def sample_model(job: EvalJob, cfg: Config, examples: list[Example], out: Path, engine, tokenizer
                 ) -> tuple[list[list[str]], dict, list[tuple[list[Example], list[list[str]]]]]:
    """Completions of `job.model` for `examples` (and for `job.permutations` reordered copies)
    at `job.temperature`, saved to out/completions.jsonl (and completions_perm{r}.jsonl) for rescoring."""
    from grailcore.evaluation.generate import eval_sampling_params, generate_permuted, generate_raw

    params = eval_sampling_params(job.samples_per_row, job.temperature, job.max_tokens, cfg.rollout.top_p,
                                  seed=job.options.seed)
    raw = generate_raw(engine, tokenizer, examples, params)
    permuted_raw = generate_permuted(engine, tokenizer, examples, job.permutations, params, job.options.seed)
    completions = [[c.text for c in row] for row in raw]
    reasons = [[c.finish_reason for c in row] for row in raw]
    write_completions(out / "completions.jsonl", examples, completions, reasons)
    permuted = []
    for r, (copy, rows) in enumerate(permuted_raw, 1):
        texts = [[c.text for c in row] for row in rows]
        write_completions(permuted_path(out / "completions.jsonl", r), copy, texts,
                          [[c.finish_reason for c in row] for row in rows])
        permuted.append((copy, texts))
    truncated = sum(r == "length" for row in reasons for r in row) / max(1, sum(map(len, reasons)))
    meta = {"model": job.model, "engine": type(engine).__name__, "greedy": params.greedy,
            "temperature": None if params.greedy else params.temperature, "top_p": params.top_p,
            "max_tokens": params.max_tokens, "truncated_share": round(truncated, 4),
            "permutations": job.permutations}
    return completions, meta, permuted


def score(job: EvalJob, examples: list[Example], completions: list[list[str]], train: list[Example] | None,
          meta: dict[str, Any], permuted: list, out: Path) -> dict[str, Any]:
    """Every metric of one set of completions, written to `out` and summarised on stdout."""
    meta = {**meta, "priors_fitted_on": f"{len(train)} training rows" if train else "the evaluated rows (no train rows)"}
    results = evaluate(examples, completions, train, job.options, permuted)
    paths = write_report(results, out, meta)
    print(summary_table(results))
    if "leak_audit_of_the_file_as_given" in meta:
        print(f"leak audit of the file as given: {meta['leak_audit_of_the_file_as_given']}")
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return results


def temperature_dir(out: Path, temperature: float) -> Path:
    """Where a sweep writes the evaluation at `temperature`."""
    return out / f"T{temperature:g}"


def run(job: EvalJob, cfg: Config) -> dict[str, Any]:
    """Score, write metrics.json / report.md / PNGs into `job.out`, print the short table.
    A temperature sweep writes one such set per temperature and returns {temperature: results}."""
    out = Path(job.out)
    if job.completions:
        if job.temperatures:
            raise ValueError("--temperatures samples a model at each temperature; --completions has nothing to sample")
        examples, completions = read_completions(job.completions)
        if job.max_samples:
            examples, completions = examples[: job.max_samples], completions[: job.max_samples]
        train = load_train(job, cfg, eval_has_splits=False)
        check_disjoint(examples, train)
        out.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"completions": job.completions, "permutations": job.permutations}
        return score(job, examples, completions, train, meta, read_permuted(job, len(examples)), out)
    examples, train, meta = load_rows(job, cfg)
    check_disjoint(examples, train)
    engine, tokenizer = open_model(job, cfg)
    sweep = {}
    try:
        for t in job.temperatures or (job.temperature,):
            target = temperature_dir(out, t) if job.temperatures else out
            target.mkdir(parents=True, exist_ok=True)
            one = replace(job, temperature=t)
            completions, sample_meta, permuted = sample_model(one, cfg, examples, target, engine, tokenizer)
            sweep[t] = score(one, examples, completions, train, {**meta, **sample_meta}, permuted, target)
    finally:
        engine.close()
    return sweep if job.temperatures else sweep[job.temperature]
