"""grailcore.run_report on hand-written metrics.jsonl files: curves, baselines, step time, runs side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from grailcore.run_report import baseline_table, load_run, main, time_breakdown


def _write_run(run_dir: Path, gail: bool, reward_slope: float, steps: int = 30, with_eval: bool = True) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "micro-llama"},
                                                        "gail": {"enabled": gail}}))
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "wall_time": 1000.0 + step, "reward/total": reward_slope * step,
                  "reward/total_std": 0.1, "reward/slate_accuracy": 0.01 * step, "reward/slate_accuracy/std": 0.2,
                  "reward/slate_accuracy/errors": 0.0, "reward/format": 0.5,
                  "reward/total/gun": 0.02 * step, "reward/total/wage": 0.01 * step,
                  "time/generation": 2.0, "time/scoring": 0.5, "time/training": 1.0, "time/step": 4.0}
        if step % 2 == 0:  # weight sync every second step
            record["time/weight_sync"] = 0.2
        lines.append(json.dumps(record))
        if with_eval and step % 10 == 0:
            lines.append(json.dumps({"step": step, "wall_time": 1000.5 + step, "eval/accuracy": 0.2 + 0.01 * step,
                                     "eval/opinion_accuracy": 0.4, "eval/baseline/random": 0.2,
                                     "eval/baseline/always_first": 0.25, "eval/baseline/always_no_change": 0.5,
                                     "eval/accuracy/gun": 0.3}))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run_dir


def test_report_compares_two_runs(tmp_path):
    grpo = _write_run(tmp_path / "grpo_gun", gail=False, reward_slope=0.01)
    grail = _write_run(tmp_path / "grail_gun", gail=True, reward_slope=0.02)
    report = main([str(grpo), str(grail), "--out", str(tmp_path / "report")])
    text = report.read_text()
    for png in ("reward_total.png", "reward_components.png", "reward_by_source.png", "eval_curves.png",
                "eval_vs_baselines.png", "step_time.png"):
        path = tmp_path / "report" / png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"]({png})" in text
    assert "| grpo_gun | GRPO | micro-llama | 30 | 0.300 | 0.500 |" in text
    assert "| grail_gun | GRAIL | micro-llama | 30 | 0.600 | 0.500 |" in text
    assert "| random | 0.200 | 0.200 |" in text and "| always_no_change | 0.500 | 0.500 |" in text
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert summary["grail_gun"]["final_reward"] == pytest.approx(0.6)


def test_time_breakdown_averages_sparse_phases_and_keeps_other(tmp_path):
    run = load_run(_write_run(tmp_path / "r", gail=False, reward_slope=0.0, steps=10))
    b = time_breakdown(run)
    assert b["generation"] == pytest.approx(2.0)
    assert b["weight_sync"] == pytest.approx(0.1)  # 0.2 on half of the steps
    assert b["other"] == pytest.approx(4.0 - 2.0 - 0.5 - 1.0 - 0.1)
    assert len(run.train) == 10 and len(run.evals) == 1


def test_baselines_split_choice_and_opinion(tmp_path):
    run = load_run(_write_run(tmp_path / "r", gail=False, reward_slope=0.0))
    table = baseline_table([run])
    assert set(table["choice"]) == {"model", "random", "always_first"}
    assert set(table["opinion"]) == {"model", "always_no_change"}
    assert table["choice"]["model"]["r"] == pytest.approx(0.5)  # the last evaluation


def test_missing_metrics_are_named_not_hidden(tmp_path):
    run_dir = _write_run(tmp_path / "noeval", gail=False, reward_slope=0.01, with_eval=False)
    text = main([str(run_dir), "--out", str(tmp_path / "out")]).read_text()
    assert "_Not shown: no evaluation records._" in text
    assert not (tmp_path / "out" / "eval_curves.png").exists()


def test_cli_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        main([str(tmp_path), "--out", str(tmp_path / "o")])
    run_dir = _write_run(tmp_path / "a", gail=False, reward_slope=0.0)
    with pytest.raises(SystemExit):
        main([str(run_dir), "--names", "x", "y", "--out", str(tmp_path / "o")])
