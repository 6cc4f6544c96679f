"""Order robustness: permuting options, and accuracy spread / per-position recall of
position-biased vs content-following fake models."""

import numpy as np
import pytest

from grailcore.evaluation import evaluate, flatten
from grailcore.evaluation.answer_slot import EXACT, RowSlots, SampleSlots
from grailcore.evaluation.completions_io import EvalSamples
from grailcore.evaluation.evaluate import EvalOptions
from grailcore.evaluation.order import permute_example, permuted_copies, recover_permutation, row_permutations

from .order_helpers import always_first, follows_content, viewer_example

R = 6


def rows(n_rows: int = 40, n: int = 4):
    return [viewer_example(i, gold=i % n + 1, n=n) for i in range(n_rows)]


def run(model, examples, permutations=R, n_boot=200):
    copies = permuted_copies(examples, permutations, seed=0)
    permuted = [EvalSamples(copy, [model(ex) for ex in copy]) for copy in copies]
    return evaluate(examples, [model(ex) for ex in examples], options=EvalOptions(n_boot=n_boot), permuted=permuted)


def test_permute_example_moves_text_gold_probs_and_meta_together():
    ex = viewer_example(0, gold=2, n=3, stances=(-0.5, 0.0, 0.7), meta={"shown_order": (2, 0, 1)})
    ex = ex.replace(true_choice_probs=(0.2, 0.5, 0.3))
    moved = permute_example(ex, (2, 0, 1))  # new 1 = old 3, new 2 = old 1, new 3 = old 2
    assert moved.option_texts == (ex.option_texts[2], ex.option_texts[0], ex.option_texts[1])
    assert moved.gold_index == 3 and moved.option_texts[2] == ex.option_texts[1]
    assert moved.true_choice_probs == (0.3, 0.2, 0.5)
    assert moved.meta["option_stances"] == (0.7, -0.5, 0.0) and moved.meta["shown_order"] == (1, 2, 0)
    assert moved.meta["permutation"] == (2, 0, 1)
    assert f"OPTIONS\n1. {ex.option_texts[2]}\n2. {ex.option_texts[0]}\n3. {ex.option_texts[1]}\n\nQUESTIONS" \
        in moved.prompt
    assert moved.prompt.split("OPTIONS")[0] == ex.prompt.split("OPTIONS")[0]  # state untouched
    back = permute_example(moved, (1, 2, 0))  # the inverse order restores the original prompt
    assert back.prompt == ex.prompt and back.gold_index == ex.gold_index
    assert recover_permutation(ex, moved.replace(meta={})) == (2, 0, 1)  # by option texts


def test_permute_example_refuses_bad_input():
    ex = viewer_example(0, gold=1, n=3)
    with pytest.raises(ValueError, match="not a permutation"):
        permute_example(ex, (0, 0, 1))
    with pytest.raises(ValueError, match="OPTIONS"):
        permute_example(ex.replace(messages=({"role": "user", "content": "no block"},)), (1, 0, 2))
    with pytest.raises(ValueError, match="option_texts"):
        permute_example(ex.replace(option_texts=()), (1, 0, 2))


def test_permutations_are_seeded_per_row():
    assert row_permutations("a", 5, 3, seed=0) == row_permutations("a", 5, 3, seed=0)
    assert row_permutations("a", 5, 3, seed=0) != row_permutations("a", 5, 3, seed=1)
    assert all(sorted(p) == list(range(5)) for p in row_permutations("b", 5, 10, 0))


def test_position_biased_fake_shows_spread_and_recall_skew():
    block = run(always_first, rows())["order_robustness"]
    assert block["n_orders"] == R + 1
    acc = np.array(block["accuracy_by_order"])
    assert block["accuracy_std"].value == pytest.approx(acc.std()) and block["accuracy_std"].value > 0.03
    assert block["accuracy_max"].value - block["accuracy_min"].value > 0.1
    recall = {p: est.value for p, est in block["position_recall"].items()}
    assert recall == {"1": 1.0, "2": 0.0, "3": 0.0, "4": 0.0}
    assert block["position_recall_range"].value == 1.0
    assert block["chosen_position_distribution"][:4] == [1.0, 0.0, 0.0, 0.0]
    assert block["tv_chosen_vs_gold_position"].value > 0.6  # gold spread near 1/4 each
    assert block["choice_consistency"].value < 0.2  # the chosen VIDEO changes with the order
    lo, hi = block["accuracy_std"].lo, block["accuracy_std"].hi
    assert np.isfinite(lo) and lo <= hi  # viewer-clustered interval


def test_content_following_fake_has_no_spread():
    block = run(follows_content, rows())["order_robustness"]
    assert block["accuracy_std"].value == 0.0 and block["accuracy_min"].value == block["accuracy_max"].value == 1.0
    assert all(est.value == 1.0 for est in block["position_recall"].values())
    assert block["position_recall_range"].value == 0.0 and block["position_recall_std"].value == 0.0
    assert block["tv_chosen_vs_gold_position"].value == pytest.approx(0.0)
    assert block["choice_consistency"].value == 1.0


def test_without_permutations_recall_is_from_the_shown_order():
    block = run(always_first, rows(), permutations=0, n_boot=0)["order_robustness"]
    assert block["n_orders"] == 1 and "accuracy_std" not in block and "--permutations" in block["note"]
    assert block["position_recall"]["1"].value == 1.0 and block["position_recall"]["3"].value == 0.0


def test_flatten_names():
    flat = flatten(run(always_first, rows(8), permutations=2, n_boot=0), prefix="")
    for name in ("order/accuracy_mean", "order/accuracy_std", "order/accuracy_min", "order/accuracy_max",
                 "order/position_recall/1", "order/position_recall_range", "order/position_recall_std",
                 "order/tv_chosen_vs_gold_position", "order/choice_consistency", "order/n_orders"):
        assert name in flat, name
    assert flat["order/n_orders"] == 3.0


def test_cli_rescores_permuted_completion_files(tmp_path):
    from grailcore.eval import main
    from grailcore.evaluation.completions_io import EvalSamples, write_completions
    from grailcore.evaluation.run import permuted_path

    examples = [viewer_example(i, gold=i % 3 + 1, n=3) for i in range(6)]
    path = write_completions(tmp_path / "completions.jsonl", EvalSamples(examples, [always_first(ex) for ex in examples]))
    for r, copy in enumerate(permuted_copies(examples, 2), 1):
        write_completions(permuted_path(path, r), EvalSamples(copy, [always_first(ex) for ex in copy]))
    out = str(tmp_path / "out")
    results = main(["--completions", str(path), "--out", out, "--n-boot", "0", "--permutations", "2"])
    block = results["order_robustness"]
    assert block["n_orders"] == 3 and block["position_recall"]["1"].value == 1.0
    assert block["position_recall"]["2"].value == 0.0
    assert "choice_consistency" in block  # permutations recovered from the option texts in the files
    with pytest.raises(FileNotFoundError, match="_perm3"):
        main(["--completions", str(path), "--out", out, "--n-boot", "0", "--permutations", "3"])


def test_with_slot_distributions_accuracy_is_p_gold_and_orders_compare_distributions():
    """A fake whose answer-slot distribution follows the videos (0.7 on the gold video) vs one
    that follows positions (0.7 on position 1): the first moves nothing across orders."""
    examples = [viewer_example(i, gold=1 + i % 3, n=3) for i in range(12)]
    copies = permuted_copies(examples, 2, seed=0)

    def draws(rows, by_content: bool) -> EvalSamples:
        slots = []
        for ex in rows:
            p = [0.15] * 3
            p[(ex.gold_index - 1) if by_content else 0] = 0.7
            slots.append(RowSlots(EXACT, 1.0, (SampleSlots(tuple(p), (0.0, 0.0, 1.0), "sampled", "sampled"),)))
        return EvalSamples(rows, [always_first(ex) for ex in rows], slots)

    for by_content in (True, False):
        shown = draws(examples, by_content)
        block = evaluate(examples, shown.texts, options=EvalOptions(n_boot=0), slots=shown.slots,
                         permuted=[draws(c, by_content) for c in copies])["order_robustness"]
        assert block["accuracy_kind"].startswith("p(gold)")
        if by_content:
            assert block["accuracy_by_order"] == pytest.approx([0.7] * 3)
            assert block["choice_tv_across_orders"].value == pytest.approx(0.0)
        else:
            assert block["choice_tv_across_orders"].value > 0.2
