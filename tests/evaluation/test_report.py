"""Report generation writes metrics.json, report.md and the PNGs with the numbers in them."""

import json

import pytest

from grailcore.evaluation.evaluate import EvalOptions, evaluate
from grailcore.evaluation.report import summary_table, write_report

from .helpers import completion, example

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_results(opinions: bool = True):
    examples = [example(i, 1 + i % 3, 3, viewer=f"v{i // 2}", opinion="increase" if opinions else None,
                        option_texts=("A — views 5", "B — views 9", "C — views 1"),
                        true_probs=(0.5, 0.3, 0.2)) for i in range(8)]
    completions = [[completion(1, "increase"), completion(2, "decrease")] for _ in examples]
    return evaluate(examples, completions, options=EvalOptions(n_boot=100))


def test_report_writes_every_file(tmp_path):
    results = small_results()
    paths = write_report(results, tmp_path / "out", {"model": "fake"})
    names = {p.name for p in paths.values()}
    assert names == {"metrics.json", "report.md", "accuracy_vs_baselines.png", "position_confusion.png",
                     "reliability.png", "opinion_confusion.png"}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    metrics = json.loads(paths["metrics"].read_text())
    assert metrics["meta"] == {"model": "fake"}
    assert metrics["choice"]["accuracy"]["value"] == pytest.approx(3 / 8)  # gold 1 on rows 0, 3, 6
    assert metrics["choice"]["accuracy"]["lo"] <= 3 / 8 <= metrics["choice"]["accuracy"]["hi"]
    assert metrics["bootstrap"]["unit"] == "viewer" and metrics["bootstrap"]["n_clusters"] == 4
    report = paths["report"].read_text()
    for needle in ("Accuracy vs baselines", "| most_viewed |", "bayes_optimal", "By n options",
                   "NLL of the human choice: true", "alpha = 1.0", "0.375 ["):
        assert needle in report


def test_no_opinion_plot_without_gold_directions(tmp_path):
    paths = write_report(small_results(opinions=False), tmp_path, {})
    assert "opinion_confusion" not in paths
    assert "No gold `opinion_direction`" in paths["report"].read_text()


def test_summary_table_lists_model_and_baselines():
    table = summary_table(small_results())
    assert "accuracy (strict parse, first sample)     0.375 [" in table
    assert "baseline: always_first" in table and "opinion accuracy" in table
