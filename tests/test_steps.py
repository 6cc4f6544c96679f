"""The steps (grailcore/steps.py): SFT targets in both answer layouts."""

from grailcore.config import DataConfig
from grailcore.data.loaders import load_examples
from grailcore.rewards.parsing import parse_viewer
from grailcore.steps import sft_target


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
