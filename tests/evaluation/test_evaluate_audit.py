"""Evaluation says, beside accuracy, what the leak audit finds on the rows it scored (and, for
a data file, on the file as given), with the trivial-rule baselines as before."""

from __future__ import annotations

import re

from grailcore.config import Config, DataConfig
from grailcore.data import load_examples
from grailcore.eval import main
from grailcore.evaluation import EvalOptions, evaluate, flatten
from grailcore.evaluation.completions_io import write_completions
from grailcore.evaluation.report import summary_table
from grailcore.evaluation.run import EvalJob, load_rows

from .helpers import REPO, completion

FLAW = REPO / "tests" / "data" / "fixtures" / "gun_flaw_200.jsonl"  # gold appended last, rendered bare


def test_rows_with_the_flaw_are_reported_beside_the_accuracy_they_allow():
    loaded = load_examples(str(FLAW), DataConfig())
    last = [[completion(ex.n_options)] for ex in loaded.raw_examples]  # a model that always answers last
    raw = evaluate(loaded.raw_examples, last, options=EvalOptions(n_boot=0))
    assert raw["choice"]["accuracy"].value == 1.0 and raw["baselines"]["always_last"]["accuracy"].value == 1.0
    assert raw["data_audit"]["verdict"] == "LEAK" and raw["data_audit"]["n_rows"] == 200
    assert any("always_last accuracy 1.000" in r for r in raw["data_audit"]["rules_over_threshold"])
    flat = flatten(raw)
    assert flat["eval/audit/leak"] == 1.0 and flat["eval/audit/margin/always_last"] > 0.7
    assert re.search(r"leak audit of these rows +LEAK: all: always_last accuracy 1\.000", summary_table(raw))
    # The same rows as training shows them: the audit finds nothing and answering last is chance.
    shown = evaluate(loaded.examples, [[completion(ex.n_options)] for ex in loaded.examples],
                     options=EvalOptions(n_boot=0))
    assert shown["data_audit"]["verdict"] == "OK" and not shown["data_audit"]["rules_over_threshold"]
    assert flatten(shown)["eval/audit/leak"] == 0.0 and shown["choice"]["accuracy"].value < 0.4


def test_cli_prints_the_audit_of_scored_rows_and_of_the_file_as_given(tmp_path, capsys):
    loaded = load_examples(str(FLAW), DataConfig())
    path = write_completions(tmp_path / "c.jsonl", loaded.raw_examples,
                             [[completion(ex.n_options)] for ex in loaded.raw_examples])
    main(["--completions", str(path), "--out", str(tmp_path / "out"), "--n-boot", "0"])
    assert re.search(r"leak audit of these rows +LEAK", capsys.readouterr().out)
    assert "Leak audit of these 200 rows as the model saw them" in (tmp_path / "out" / "report.md").read_text()
    # Sampling a model on the file: the rows are re-rendered and shuffled; the file's own flaw
    # is still reported (in the report's meta and on the console).
    examples, _, meta = load_rows(EvalJob(out=str(tmp_path), options=EvalOptions(), data=str(FLAW),
                                          max_samples=50), Config())
    assert len(examples) == 50 and meta["leak_audit_of_the_file_as_given"].startswith("LEAK on 200 rows; all: ")
