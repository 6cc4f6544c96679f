"""`python -m grailcore.eval --completions` on a tiny file, and the completions-file format."""

import json
import subprocess
import sys

import pytest

from grailcore.data.schema import SchemaError
from grailcore.eval import main
from grailcore.evaluation.completions_io import EvalSamples, example_row, read_completions, write_completions

from .helpers import REPO, completion, example

OPTIONS = ("A (c, 10s long) — Engagement: views 10", "B (c, 20s long) — Engagement: views 30",
           "C (c, 30s long) — Engagement: views 20")


def rendered(i: int, gold: int, viewer: str, opinion: str):
    """An example whose prompt has the seed format, so the loader's OPTIONS parsing accepts it."""
    prompt = "VIEWER x\n\nOPTIONS\n" + "\n".join(f"{k}. {t}" for k, t in enumerate(OPTIONS, 1)) + "\n\nQUESTIONS\n1. ?"
    ex = example(i, gold, 3, viewer=viewer, opinion=opinion, option_texts=OPTIONS, true_probs=(0.2, 0.5, 0.3))
    return ex.replace(messages=({"role": "user", "content": prompt},))


def tiny_file(tmp_path):
    examples = [rendered(0, 2, "a", "increase"), rendered(1, 3, "a", "no_change"), rendered(2, 2, "b", "decrease")]
    completions = [[completion(2, "increase")], [completion(1, "no_change")], [completion(2, "increase")]]
    path = write_completions(tmp_path / "completions.jsonl", EvalSamples(examples, completions))
    return path, examples


def test_completions_file_round_trip(tmp_path):
    path, examples = tiny_file(tmp_path)
    samples = read_completions(path)
    loaded, completions = samples.examples, samples.texts
    assert completions == [[completion(2, "increase")], [completion(1, "no_change")], [completion(2, "increase")]]
    for a, b in zip(examples, loaded):
        assert example_row(a) == example_row(b)
        assert b.option_texts == OPTIONS  # parsed back from the prompt: most-viewed works on files


def test_completions_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    row = {**example_row(rendered(0, 2, "a", "increase"))}
    bad.write_text(json.dumps({**row, "completion": "x"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(SchemaError, match=r"bad.jsonl:2: no completion field"):
        read_completions(bad)
    bad.write_text(json.dumps({**row, "completions": []}) + "\n")
    with pytest.raises(SchemaError, match=r"bad.jsonl:1: field 'completions'"):
        read_completions(bad)


def test_cli_scores_a_completions_file_in_process(tmp_path, capsys):
    path, _ = tiny_file(tmp_path)
    results = main(["--completions", str(path), "--out", str(tmp_path / "out"), "--n-boot", "50"])
    assert results["choice"]["accuracy"].value == pytest.approx(2 / 3)
    assert results["opinion"]["accuracy"].value == pytest.approx(2 / 3)
    assert results["bootstrap"]["unit"] == "viewer" and results["bootstrap"]["n_clusters"] == 2
    assert results["fidelity"]["tv_choice"].value > 0  # true probs survived the file
    printed = capsys.readouterr().out
    assert "accuracy (strict parse, first sample)     0.667" in printed and "baseline: most_viewed" in printed
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["meta"]["completions"] == str(path)
    assert (tmp_path / "out" / "report.md").is_file()


def test_cli_as_a_module(tmp_path):
    path, _ = tiny_file(tmp_path)
    out = tmp_path / "cli_out"
    proc = subprocess.run([sys.executable, "-m", "grailcore.eval", "--completions", str(path), "--out", str(out),
                           "--n-boot", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "0.667" in proc.stdout
    accuracy = json.loads((out / "metrics.json").read_text())["choice"]["accuracy"]
    assert accuracy == {"value": pytest.approx(2 / 3), "lo": None, "hi": None}  # no bootstrap: null, not NaN


def test_cli_without_inputs_says_what_to_give():
    with pytest.raises(SystemExit, match="--completions"):
        main([])


def test_cli_refuses_priors_fitted_on_the_evaluated_rows(tmp_path):
    path, examples = tiny_file(tmp_path)
    train = tmp_path / "train.jsonl"  # the same rows as plain pre-rendered loader rows
    plain = [{k: v for k, v in example_row(ex).items() if k not in ("viewer_id", "true_choice_probs")}
             for ex in examples]
    train.write_text("".join(json.dumps(row) + "\n" for row in plain))
    with pytest.raises(ValueError, match="share 3 example ids"):
        main(["--completions", str(path), "--train-data", str(train), "--out", str(tmp_path / "o"), "--n-boot", "0"])
    train.write_text("".join(json.dumps({**row, "example_id": f"t{i}"}) + "\n" for i, row in enumerate(plain)))
    results = main(["--completions", str(path), "--train-data", str(train), "--out", str(tmp_path / "o")])
    assert "train (3 rows)" in results["baselines"]["most_frequent_position"]["description"]


def test_temperature_sweep_loads_the_model_once_and_scores_each_temperature(tmp_path, monkeypatch):
    from grailcore.evaluation import run as eval_run

    built = []
    build_engine = eval_run.build_engine
    monkeypatch.setattr(eval_run, "build_engine", lambda *a: built.append(1) or build_engine(*a))
    sweep = main(["--model", "micro-llama", "--data", "synthetic:gun_control", "--max-samples", "3",
                  "--samples-per-row", "2", "--temperatures", "0.5", "1.3", "--max-tokens", "4", "--n-boot", "0",
                  "--out", str(tmp_path / "sweep")])
    assert len(built) == 1 and set(sweep) == {0.5, 1.3}
    for t in (0.5, 1.3):
        metrics = json.loads((tmp_path / "sweep" / f"T{t:g}" / "metrics.json").read_text())
        assert metrics["meta"]["temperature"] == t and metrics["n_rows"] == 3 and metrics["samples_per_row"] == 2
    with pytest.raises(ValueError, match="--completions has nothing to sample"):
        main(["--completions", str(tiny_file(tmp_path)[0]), "--temperatures", "0.5", "1.0", "--out", str(tmp_path / "x")])
