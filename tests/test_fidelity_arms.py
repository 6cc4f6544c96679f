"""experiments/fidelity_arms.py (issues #13, #7): the plan it runs, the verdict it computes
from the numbers, and (slow) the whole pipeline on micro-llama."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


arms = _load("fidelity_arms")
report = _load("fidelity_report")


def est(value: float, half_width: float = 0.01) -> dict:
    return {"value": value, "lo": value - half_width, "hi": value + half_width}


def row(tv: float, nll: float, half_width: float = 0.01) -> dict:
    return {**{key: None for key, _, _ in report.COLUMNS}, "tv": est(tv, half_width), "nll": est(nll, half_width),
            "acc": est(0.3), "parsed": est(0.9)}


def test_plan_matches_compute_and_scores_order_only_at_the_matched_temperature(tmp_path):
    args = arms.parse_args(["--out", str(tmp_path), "--steps", "3", "--seeds", "0", "1", "--prompts-per-step", "8",
                            "--group-size", "4", "--temperatures", "0.5", "1.3", "--permutations", "2"])
    assert args.temperatures == [0.5, 1.0, 1.3]  # the matched temperature is always swept
    train = arms.training_jobs(args, tmp_path)
    assert [j.name for j in train] == ["sft/s0", "grpo/s0", "grail/s0", "sft/s1", "grpo/s1", "grail/s1"]
    sft, grpo = train[0].argv, train[1].argv
    assert sft[sft.index("--sft.batch-size") + 1] == "32"  # P x G targets: as many completions as GRPO trains
    assert sft[-2:] == ["--rollout.engine", "hf"] and "--rollout.engine" not in grpo  # --sft-args' default
    assert grpo[grpo.index("--grpo.prompts-per-step") + 1] == "8" and grpo[grpo.index("--grpo.group-size") + 1] == "4"
    for argv in (sft, grpo, train[2].argv):
        assert argv[argv.index("--optim.max-steps") + 1] == "3" and argv[argv.index("--seed") + 1] == "0"
    evals = {j.name: j.argv for j in arms.eval_jobs(args, tmp_path)}
    # the warm start and every arm x seed: one sweep over the unmatched temperatures, one matched run
    assert len(evals) == (1 + 3 * 2) * 2
    sweep, matched = evals["eval grail/s1 T=0.5,1.3"], evals["eval grail/s1 T=1"]
    assert sweep[sweep.index("--temperatures") + 1:][:2] == ["0.5", "1.3"]
    assert sweep[sweep.index("--permutations") + 1] == "0" and matched[matched.index("--permutations") + 1] == "2"
    assert {a[a.index("--max-samples") + 1] for a in evals.values()} == {"48"}  # same rows for every model


def test_a_finished_arm_with_other_settings_is_not_reused(tmp_path):
    args = arms.parse_args(["--out", str(tmp_path), "--steps", "10"])
    run = tmp_path / "grpo_s0"
    run.mkdir()
    (run / "config.yaml").write_text(f"seed: 0\nmodel:\n  name_or_path: {args.start}\noptim:\n  max_steps: 12\n")
    with pytest.raises(SystemExit, match=r"max_steps 12 \(asked: 10\)"):
        arms.check_reused_arm(run, args, seed=0)
    (run / "config.yaml").write_text(f"seed: 0\nmodel:\n  name_or_path: {args.start}\noptim:\n  max_steps: 10\n")
    arms.check_reused_arm(run, args, seed=0)


def test_missing_warm_start_says_how_to_make_it(tmp_path):
    args = arms.parse_args(["--out", str(tmp_path), "--start", str(tmp_path / "nothing" / "final")])
    with pytest.raises(SystemExit, match="grailcore.sft --cfg configs/demo_sft_gun.py"):
        arms.ensure_start(args)


def test_verdict_names_the_most_human_arm_at_its_best_temperature():
    # sft is best at T=0.7, grail at T=1.3 (still worse than sft): the verdict must say so
    table = {"0.7": {"start": row(0.40, 1.50), "sft/s0": row(0.20, 1.30), "grail/s0": row(0.35, 1.45)},
             "1.3": {"start": row(0.45, 1.60), "sft/s0": row(0.30, 1.40), "grail/s0": row(0.25, 1.35)}}
    refs = {"tv_floor": est(0.10), "nll_uniform": est(1.39), "nll_true": est(1.20), "samples_per_row": 4}
    text = "\n".join(report.verdict(table, refs, matched="1.3"))
    assert "**sft** (0.200 at T=0.7), ahead of grail (0.250 at T=1.3) by 0.050" in text
    assert "GRAIL **does not beat** temperature-tuned SFT" in text
    assert "do not overlap" in text
    assert "sft +67%" in text  # (0.40 - 0.20) / (0.40 - 0.10) of the warm start's excess TV removed

    wide = {t: {label: row(r["tv"]["value"], r["nll"]["value"], half_width=0.2) for label, r in rows.items()}
            for t, rows in table.items()}
    assert "overlap, so these rows do not separate them" in "\n".join(report.verdict(wide, refs, matched="1.3"))
    table["1.3"]["grail/s0"] = row(0.15, 1.25)
    text = "\n".join(report.verdict(table, refs, matched="1.3"))
    assert "**grail** (0.150 at T=1.3)" in text and "GRAIL is lower" in text


@pytest.mark.slow  # ~3 min on 2 shared cores: 4 trainings and 8 evaluations, each its own process
def test_pipeline_end_to_end_on_micro_llama(tmp_path):
    tiny = ["--rollout.engine", "hf", "--rollout.max-prompt-tokens", "2048", "--rollout.max-completion-tokens", "16",
            "--model.trainable-layers", "0", "--data.synthetic-n", "200", "--logging.no-tensorboard",
            "--optim.micro-batch-size", "4"]
    start = tmp_path / "start"
    subprocess.run([sys.executable, "-m", "grailcore.sft", "--cfg", "configs/demo_sft_gun.py", "--model.name-or-path",
                    "micro-llama", "--optim.max-steps", "1", "--sft.batch-size", "2", "--eval.no-on-start",
                    "--eval.max-samples", "2", "--run-dir", str(start), *tiny], cwd=REPO, check=True,
                   capture_output=True)
    out = tmp_path / "out"
    command = [sys.executable, "experiments/fidelity_arms.py", "--out", str(out), "--start", str(start / "final"),
               "--steps", "2", "--prompts-per-step", "2", "--group-size", "2", "--eval-rows", "8", "--samples", "2",
               "--temperatures", "0.7", "1.0", "--permutations", "1", "--n-boot", "50",
               "--train-args", " ".join(tiny + ["--gail.model", "tiny-bert"])]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert set(result["table"]) == {"0.7", "1"}
    for rows in result["table"].values():
        assert list(rows) == ["start", "sft/s0", "grpo/s0", "grail/s0"]
        assert all(r["tv"]["lo"] is not None and r["nll"]["value"] > 0 for r in rows.values())
    matched = result["table"]["1"]["grail/s0"]
    assert matched["order_std"] is not None and result["table"]["0.7"]["grail/s0"]["order_std"] is None
    assert result["compute"]["grpo/s0"]["steps"] == 2 and result["compute"]["sft/s0"]["steps"] == 2
    assert result["compute"]["sft/s0"]["lr"] == "0.0002"  # the SFT preset's own rate
    text = (out / "results.md").read_text()
    assert "## Verdict" in text and "## T = 1 (matched)" in text and "grailcore.eval" in text
    assert "paired difference" in text and "(bootstrap over viewers)" in text  # the verdict pairs the arms
    assert (out / "fidelity_vs_temperature.png").stat().st_size > 0
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)  # all done: resumes
    assert again.returncode == 0 and again.stdout.count("[skip]") == 11, again.stdout[-2000:]


def test_verdict_reports_the_paired_difference_of_the_arms_it_compares():
    from grailcore.evaluation.bootstrap import Estimate

    table = {"0.7": {"start": row(0.40, 1.50), "sft/s0": row(0.20, 1.30), "grail/s0": row(0.35, 1.45)},
             "1.3": {"start": row(0.45, 1.60), "sft/s0": row(0.30, 1.40), "grail/s0": row(0.25, 1.35)}}
    refs = {"tv_floor": est(0.10), "nll_uniform": est(1.39), "nll_true": est(1.20), "samples_per_row": 4}
    asked = []

    def paired(label_a, t_a, label_b, t_b):
        asked.append((label_a, t_a, label_b, t_b))
        return {"tv": Estimate(-0.05, -0.08, -0.02), "nll": Estimate(-0.05, -0.11, 0.01)}

    text = "\n".join(report.verdict(table, refs, matched="1.3", paired=paired))
    assert ("sft/s0", "0.7", "grail/s0", "1.3") in asked  # the winner against the runner-up, each at its best T
    assert ("grail/s0", "1.3", "sft/s0", "0.7") in asked  # GRAIL against temperature-tuned SFT
    assert "paired difference sft/s0 - grail/s0 on the same rows -0.050 [-0.080, -0.020]" in text
    assert "the interval excludes 0" in text and "the interval includes 0" in text  # tv separates, nll does not
    assert "do not overlap" not in text and "paired (one viewer bootstrap" in text
