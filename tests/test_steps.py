"""The steps (grailcore/steps.py): advantages with scale_rewards="batch" or
reward_aggregation="normalize_then_sum" divide by the whole step's std, so 2 ranks equal 1 process; prompt seeds; SFT targets in both answer layouts."""

from __future__ import annotations

import json

import pytest
import torch

from grailcore.advantages import decoupled_advantages, group_advantages
from grailcore.config import DataConfig
from grailcore.data.loaders import load_examples
from grailcore.rewards.parsing import parse_viewer
from grailcore.steps import prompt_seeds, sft_target, step_advantages
from test_dist import torchrun

GROUP = 4
# Rank 0's two groups have a small spread, rank 1's a large one: a per-rank std differs
# from the step's, so only the gathered std gives world size 2 == world size 1. The last
# group of rank 1 has identical rewards (advantage exactly 0, counted on its own rank).
RANK_REWARDS = [[0.0, 0.1, 0.2, 0.0, 0.3, 0.3, 0.1, 0.2], [0.0, 5.0, 1.0, 3.0, 2.0, 2.0, 2.0, 2.0]]

# [N, 2]: the rewards beside a second reward with another spread (rank 1's last group stays
# constant in both); source text, so the worker below defines the same function.
TWO_REWARDS = "lambda rewards: torch.stack([rewards, torch.where(rewards > 1.5, 2.0, rewards * 3 % 1)], dim=1)"
two_rewards = eval(TWO_REWARDS)  # noqa: S307 - the constant above

ADVANTAGE_WORKER = '''
import json, sys, torch
from grailcore import dist as gdist
from grailcore.steps import prompt_seeds, step_advantages

two_rewards = {two}
info = gdist.init_distributed()
rewards = torch.tensor({rewards!r}[info.rank])
out = {{}}
for scale in ("batch", "group", "none"):
    adv = step_advantages(rewards, {group}, scale)
    out[scale] = [adv.advantages.tolist(), adv.zero_variance_groups, adv.zero_variance_mask.tolist()]
adv = step_advantages(two_rewards(rewards), {group}, "group", weights=(0.5, 1.0))  # normalize_then_sum
out["gdpo"] = [adv.advantages.tolist(), adv.zero_variance_groups, adv.zero_variance_mask.tolist()]
try:
    gdist.all_gather(torch.zeros(2 + info.rank))
except ValueError as err:
    out["mismatch"] = str(err)
with open(f"{{sys.argv[1]}}/rank{{info.rank}}.json", "w") as f:
    json.dump(out, f)
gdist.finish_worker()  # barrier, destroy, exit without finalization (no exit abort)
'''


@pytest.mark.parametrize("scale", ["batch", "group", "none"])
def test_one_process_step_advantages_are_the_pure_ones(scale):
    rewards = torch.tensor(RANK_REWARDS[0] + RANK_REWARDS[1])
    assert torch.equal(step_advantages(rewards, GROUP, scale).advantages,
                       group_advantages(rewards, GROUP, scale).advantages)


def test_two_ranks_give_the_advantages_of_one_process_for_every_scale(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(ADVANTAGE_WORKER.format(rewards=RANK_REWARDS, group=GROUP, two=TWO_REWARDS))
    torchrun(script, str(tmp_path), timeout=120)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    whole = torch.tensor(RANK_REWARDS[0] + RANK_REWARDS[1])
    for scale in ("batch", "group", "none"):
        one = group_advantages(whole, GROUP, scale)  # the same global batch in one process
        two = torch.tensor(ranks[0][scale][0] + ranks[1][scale][0])
        torch.testing.assert_close(two, one.advantages, rtol=0, atol=1e-6, msg=f"scale={scale}")
        assert [r[scale][1] for r in ranks] == [0, 1]
        assert ranks[0][scale][2] + ranks[1][scale][2] == one.zero_variance_mask.tolist()
    one = decoupled_advantages(two_rewards(whole), (0.5, 1.0), GROUP)  # normalize_then_sum: the step's std
    torch.testing.assert_close(torch.tensor(ranks[0]["gdpo"][0] + ranks[1]["gdpo"][0]), one.advantages,
                               rtol=0, atol=1e-6)
    assert [r["gdpo"][1] for r in ranks] == [0, 1]
    per_rank = torch.cat([decoupled_advantages(two_rewards(torch.tensor(r)), (0.5, 1.0), GROUP).advantages
                          for r in RANK_REWARDS])
    assert not torch.allclose(per_rank, one.advantages, atol=1e-3)
    # The check is not vacuous: each rank's own std gives other advantages.
    per_rank = torch.cat([group_advantages(torch.tensor(r), GROUP, "batch").advantages for r in RANK_REWARDS])
    assert not torch.allclose(per_rank, group_advantages(whole, GROUP, "batch").advantages, atol=1e-3)
    assert all("every rank must gather the same shape" in r["mismatch"] for r in ranks)


def test_prompt_seeds_depend_on_run_step_example_and_slot_only():
    seeds = prompt_seeds(0, 5, ["a", "a", "b", "c"], first_slot=0)
    assert seeds == prompt_seeds(0, 5, ["a", "a", "b", "c"], first_slot=0)  # a resumed run: the same
    # Rank 1 of 2 holds slots 2, 3 of the same global list: its seeds are the global list's.
    assert prompt_seeds(0, 5, ["b", "c"], first_slot=2) == seeds[2:]
    others = {*seeds, *prompt_seeds(0, 6, ["a", "a", "b", "c"], 0), *prompt_seeds(1, 5, ["a", "a", "b", "c"], 0)}
    assert len(others) == 12  # the same example twice in a step, another step, another run seed
    # vLLM's child k draws seed + k: no two prompts' seeds may lie within a group of each other.
    ordered = sorted(others)
    assert min(b - a for a, b in zip(ordered, ordered[1:])) > 1 << 20
    assert all(0 <= s < 1 << 62 for s in others)


def test_targets_follow_the_rows_layout_and_parse_in_it():
    think = load_examples("synthetic:gun_control", DataConfig(synthetic_n=60), split="train").examples[0]
    direct = load_examples("synthetic:gun_control", DataConfig(synthetic_n=60, layout="direct"),
                           split="train").examples[0]
    rationale = "Option {answer} fits."
    assert sft_target(think, rationale).startswith(f"<think>\nOption {think.gold_index} fits.\n</think>")
    assert sft_target(direct, rationale) == (f"<answer>{direct.gold_index}</answer>"
                                             f"<opinion>{direct.opinion_direction}</opinion>")
    for ex in (think, direct):
        parsed = parse_viewer(sft_target(ex, rationale), ex.n_options, ex.meta["layout"])
        assert parsed.format_ok and parsed.answer == ex.gold_index
