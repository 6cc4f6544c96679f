"""`python -m grailcore.eval --completions` on a tiny file, and the completions-file format."""

import json
import subprocess
import sys

import pytest

from grailcore.data.schema import SchemaError
from grailcore.eval import main
from grailcore.data.prompt import DIRECT_SYSTEM_PROMPT
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


def test_a_model_run_writes_exact_metrics_says_so_and_rescoring_the_file_needs_no_model(tmp_path, capsys):
    """`grailcore.eval --model` (micro-llama, HF engine): metrics from the answer-slot
    distributions, labelled; its completions file gives the same numbers without the model;
    --no-exact and the direct layout are labelled too."""
    args = ["--model", "micro-llama", "--data", "synthetic:gun_control", "--max-samples", "4",
            "--samples-per-row", "2", "--max-tokens", "6", "--n-boot", "20"]
    exact = main([*args, "--out", str(tmp_path / "exact")])
    metrics = json.loads((tmp_path / "exact" / "metrics.json").read_text())
    assert metrics["fidelity"]["estimator"] == "exact_answer_slot"
    assert metrics["fidelity"]["answer_slot"]["forced_slot_share"] == 1.0  # 6 random tokens never answer
    assert metrics["fidelity"]["answer_slot"]["rows_with_forced_slot"] == 4
    assert metrics["fidelity"]["ece"]["lo"] is not None  # intervals clustered by viewer
    assert "tv_choice_sampling_floor" not in metrics["fidelity"]
    assert "exact_answer_slot" in (tmp_path / "exact" / "report.md").read_text()
    assert "choice distribution estimator" in capsys.readouterr().out
    again = main(["--completions", str(tmp_path / "exact" / "completions.jsonl"), "--n-boot", "20",
                  "--out", str(tmp_path / "rescored")])
    assert again["fidelity"]["estimator"] == "exact_answer_slot"
    assert again["fidelity"]["tv_choice"].value == pytest.approx(exact["fidelity"]["tv_choice"].value)
    assert again["fidelity"]["nll"]["model"].value == pytest.approx(exact["fidelity"]["nll"]["model"].value)
    sampled_only = main([*args, "--no-exact", "--out", str(tmp_path / "histogram")])
    assert sampled_only["fidelity"]["estimator"] == "histogram_fallback"
    direct = main([*args, "--layout", "direct", "--out", str(tmp_path / "direct")])
    assert direct["fidelity"]["estimator"] == "direct"
    row = json.loads((tmp_path / "direct" / "completions.jsonl").read_text().splitlines()[0])
    assert row["layout"] == "direct" and len(row["answer_slot"]["choice"]) == 1
    back = read_completions(tmp_path / "direct" / "completions.jsonl").examples[0]
    assert back.messages[0]["content"] == DIRECT_SYSTEM_PROMPT and back.meta["layout"] == "direct"
