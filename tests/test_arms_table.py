"""experiments/arms_table.py and d_check.py on the committed runs of experiments/results/grpo_reward_exact/:
a seed-averaged arm is the per-seed mean, its paired difference is compare's; the position habit d_check reads."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from grailcore.evaluation.compare import paired_differences

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "experiments" / "results" / "grpo_reward_exact"


def _load(name: str):
    sys.path.insert(0, str(REPO / "experiments"))
    spec = importlib.util.spec_from_file_location(name, REPO / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


table = _load("arms_table")


def test_a_two_run_arm_is_the_mean_of_its_runs_and_pairs_as_compare_does(capsys):
    accuracy, likelihood = RUNS / "grpo_accuracy", RUNS / "grpo_likelihood"
    table.main(["--arm", f"start={accuracy}@0", "--arm", f"a={accuracy}@24", "--arm", f"b={likelihood}@24",
                "--arm", f"ab={accuracy},{likelihood}@24", "--pair", "ab", "start", "--n-boot", "200"])
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in out.splitlines() if line.startswith("| ")}
    a, b, both = (float(rows["TV to the true choice probabilities"][k].split()[0]) for k in (1, 2, 3))
    assert both == pytest.approx((a + b) / 2, abs=1e-3) and a != pytest.approx(b, abs=0.01)
    assert rows["TV to the true choice probabilities"][3].startswith(f"{both:.3f} ({a:.3f}, {b:.3f})")
    files = [str(run / "eval" / "step_000024.jsonl") for run in (accuracy, likelihood)]
    expected = paired_differences(files, str(accuracy / "eval" / "step_000000.jsonl"), alpha=1.0, n_boot=200)
    assert rows["TV (exact)"][0].strip("* |").startswith(f"{expected['tv'].value:+.3f} [{expected['tv'].lo:+.3f},")
    with pytest.raises(SystemExit, match="no evaluation at step 7"):
        table.main(["--arm", f"x={accuracy}@7"])


def test_d_check_reads_the_policys_position_habit_from_an_evaluation_file():
    """experiments/d_check.py: the warm start's on-slate answer distribution per slate size,
    each a distribution, with the shown-third habit the arms' README reports (~0.4 on option 3)."""
    check = _load("d_check")
    habit = check.position_habit(RUNS / "grpo_accuracy" / "eval" / "step_000000.jsonl")
    assert set(habit) == {3, 4, 5}
    assert all(v.sum() == pytest.approx(1.0) and (v >= 0).all() for v in habit.values())
    assert all(int(v.argmax()) == 2 and v[2] > 0.38 for v in habit.values())


def test_rollout_positions_reads_shares_rewards_and_the_push_on_each_answer(tmp_path):
    positions = _load("rollout_positions")
    folder = tmp_path / "rollouts"
    folder.mkdir()
    # step 1: answers 3, 3, 1 and a dodge; step 2 (rank 1's file): answer 2; a math row is ignored
    rows = [(1, 0, 3, 0.5, 1.0), (1, 0, 3, -0.5, 0.2), (1, 0, 1, 1.5, 0.4), (1, 0, None, -2.0, -1.6), (2, 1, 2, 0.0, 0.0)]
    for step, rank, answer, gail, advantage in rows:
        with open(folder / f"step_{step:06d}.rank{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "task": "viewer", "answer": answer, "rewards": {"gail": gail},
                                "advantage": advantage}) + "\n")
    with open(folder / "step_000001.rank0.jsonl", "a") as f:
        f.write(json.dumps({"step": 1, "task": "math", "rewards": {"gail": 9.0}, "advantage": 9.0}) + "\n")
    lines = positions.table(positions.load(tmp_path), window=2)
    cells = {line.split(" | ")[1]: line.strip("| ").split(" | ") for line in lines[2:]}
    assert cells["shown 3"] == ["1-2", "shown 3", "0.400", "+0.000", "+0.600", "+0.240"]
    assert cells["shown 1"][2:] == ["0.200", "+1.500", "+0.400", "+0.080"]
    assert cells["dodge"][2:] == ["0.200", "-2.000", "-1.600", "-0.320"] and list(cells)[-1] == "dodge"
    with pytest.raises(SystemExit, match="--logging.rollouts"):
        positions.load(tmp_path / "nothing")


def test_position_probe_pays_the_third_option_less_than_any_other_and_a_dodge_least():
    probe = _load("position_probe")
    from grailcore.data.schema import Example
    from grailcore.rewards import available_rewards
    ex = Example(example_id="e", task="viewer", messages=({"role": "user", "content": "q"},), gold_index=1,
                 n_options=4, option_texts=("a", "b", "c", "d"), state_text="s")
    answer = "<think>t</think><answer>{}</answer><opinion>increase</opinion>"
    paid = [probe.avoid_shown_3(ex, answer.format(k)) for k in (1, 2, 3, 4)]
    assert paid == [1.0, 1.0, -1.0, 1.0] and "avoid_shown_3" in available_rewards()
    assert probe.avoid_shown_3(ex, answer.format(9)) == probe.avoid_shown_3(ex, "Sure! " + answer.format(1)) == -2.0


def test_the_arms_plot_reads_each_seeds_evaluations_on_policy_steps(tmp_path):
    """A GRAIL run's step s is policy step s - warm-up; a seed without a step-0 evaluation takes
    the warm start's; the curve is the seeds' mean; the PNG is written."""
    arms_plot = _load("arms_plot")
    start, grail = RUNS / "c_accuracy", [RUNS / "c_grail", RUNS / "c_grail_s1"]
    tv = "eval/tv_choice"
    at = {run.name: arms_plot.evaluations(run, tv) for run in (start, *grail)}
    curve = arms_plot.curve("GRAIL", grail, 24, tv, start)
    assert curve.steps == [0, 24]
    assert curve.seeds == [[at["c_grail"][24], at["c_grail"][48]], [at["c_grail_s1"][24], at["c_grail_s1"][48]]]
    assert curve.mean[1] == pytest.approx((at["c_grail"][48] + at["c_grail_s1"][48]) / 2)
    plain = arms_plot.curve("0/1", [start, RUNS / "c_accuracy_s1"], 0, tv, start)
    assert plain.steps == [0, 12, 24] and plain.seeds[1][0] == at["c_accuracy"][0]  # s1 did not evaluate at 0
    out = arms_plot.main(["--arm", f"GRAIL={grail[0]},{grail[1]}@24", "--start", str(start),
                          "--out", str(tmp_path / "arms.png")])
    assert out is None and (tmp_path / "arms.png").stat().st_size > 10_000
