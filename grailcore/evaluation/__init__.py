"""Viewer evaluation: metrics with viewer-clustered CIs, baselines, distribution
fidelity and reports. The trainer calls `evaluate_examples`; the CLI is `grailcore.eval`."""

from grailcore.evaluation.evaluate import EvalOptions, evaluate, evaluate_examples, evaluate_rows, flatten
from grailcore.evaluation.generate import generate_completions
from grailcore.evaluation.order import permute_example, permuted_copies

__all__ = ["EvalOptions", "evaluate", "evaluate_examples", "evaluate_rows", "flatten", "generate_completions",
           "permute_example", "permuted_copies"]
