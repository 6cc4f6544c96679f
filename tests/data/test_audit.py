"""Tests of grailcore/data/audit.py: statistics against known values, each trivial rule on
hand-made datasets with a known answer, the real seed sample, synthetic data, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest

from grailcore.data import build_example, generate_study
from grailcore.data.audit import audit_examples, format_report, main, parse_option
from grailcore.data.audit_stats import chi2_sf, design_effect, wilson_interval
from grailcore.data.schema import Example

# A copy of the shared seed_prompts_sample.jsonl (6 real rows), so the test needs nothing outside the repo.
SEED_SAMPLE = str(Path(__file__).parent / "fixtures" / "audit_seed_prompts_sample.jsonl")


def option(title: str, rng: random.Random, channel: bool = True, duration: bool = True,
           views: int | None = None, comments: bool = True) -> str:
    """An option rendered like the seed prompts; channel/duration/comments can be left out."""
    meta = ", ".join(p for p in (f"Chan {title[-1]}" if channel else "",
                                 f"{rng.randint(60, 600)}s long" if duration else "") if p)
    head = f"{title} ({meta})" if meta else title
    views = rng.randint(1_000, 900_000) if views is None else views
    tail = f"views {views:,}, likes {rng.randint(1, 900):,}" + (", comments 40" if comments else "")
    return f"{head} — Engagement: {tail}"


def example(i: int, gold: int, texts: list[str], viewer: str | None = None, state: str = "",
            issue: str = "gun_control", study: str = "study1") -> Example:
    return Example(
        example_id=f"ex{i}", task="viewer",
        messages=({"role": "user", "content": "VIEWER ...\n\nOPTIONS\n..."},),
        gold_index=gold, n_options=len(texts), option_texts=tuple(texts), state_text=state,
        viewer_id=viewer, issue=issue, study=study,
    )


def plain_slate(rng: random.Random, n: int) -> list[str]:
    return [option(f"Video number {k}", rng) for k in range(n)]


def rule(report, name: str, group: str = "all"):
    g = next(g for g in report.groups if g.name == group)
    return next(r for r in g.rules if r.name == name)


def test_chi2_sf_matches_tabulated_critical_values():
    # 5% critical values of chi-square with df = 1..5.
    for df, critical in [(1, 3.841459), (2, 5.991465), (3, 7.814728), (4, 9.487729), (5, 11.070498)]:
        assert chi2_sf(critical, df) == pytest.approx(0.05, abs=1e-6)
    assert chi2_sf(10.0, 2) == pytest.approx(math.exp(-5.0))
    assert chi2_sf(0.0, 3) == 1.0


def test_wilson_interval_known_values():
    low, high = wilson_interval(0.5, 10, 1.959964)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    # All successes: the lower bound is n / (n + z^2), not 1 as a bootstrap would say.
    assert wilson_interval(1.0, 6, 1.959964)[0] == pytest.approx(6 / (6 + 1.959964 ** 2))


def test_design_effect_counts_repeated_viewers():
    credits = [1.0, 0.0] * 50
    assert design_effect(credits, [str(i) for i in range(100)]) == pytest.approx(1.0, abs=0.02)
    # Each viewer's 5 rows agree: the information is that of 20 rows, not 100.
    clustered = [float(i // 5 % 2) for i in range(100)]
    assert design_effect(clustered, [str(i // 5) for i in range(100)]) == pytest.approx(5.0, rel=0.1)


def test_parse_option_reads_signature_title_and_views():
    full = parse_option("3. Fast Food CEO (Waldorf Nation, 453s long) — Engagement: views 141,333, "
                        "likes 2,609, comments 40")
    assert full.title == "Fast Food CEO" and full.views == 141_333
    assert full.signature == ("channel", "comments", "duration", "likes", "views")
    bare = parse_option("How the NRA hijacks gun control debates — Engagement: views 1,183,266, likes 36,035")
    assert bare.signature == ("likes", "views") and bare.views == 1_183_266
    unknown = parse_option("T (channel unknown, length unknown) — Engagement: views unknown, likes 3, "
                           "comments unknown")
    assert unknown.signature == ("channel?", "comments?", "duration?", "likes", "views?")
    assert unknown.views is None


def test_always_last_gold_is_a_leak():
    rng = random.Random(0)
    report = audit_examples([example(i, 4, plain_slate(rng, 4)) for i in range(200)])
    assert report.verdict == "LEAK" and report.leak
    assert rule(report, "always_last").accuracy == 1.0
    assert rule(report, "always_first").accuracy == 0.0
    assert rule(report, "modal_position").fit == "n=4->4"
    assert report.best_margin == pytest.approx(0.75) and report.best_margin_ci[0] > 0.6
    assert rule(report, "odd_rendering").coverage == 0.0  # every option is rendered alike
    assert report.groups[0].positions[0].counts == (0, 0, 0, 200)
    assert report.groups[0].positions[0].p_value < 1e-20
    assert report.position_notes and "n_options=4" in report.position_notes[0]
    assert "LEAK" in format_report(report)


def test_uniformly_shuffled_gold_passes():
    rng = random.Random(1)
    examples = [example(i, rng.randint(1, n), plain_slate(rng, n), viewer=f"v{i // 4}")
                for i, n in enumerate(rng.choice((3, 4, 5)) for _ in range(3000))]
    report = audit_examples(examples)
    assert report.verdict == "OK" and not report.reasons and not report.position_notes
    assert rule(report, "odd_rendering").fit == "no slate has a uniquely rendered option"
    random_accuracy = report.groups[0].random_accuracy
    assert random_accuracy == pytest.approx(sum(1 / e.n_options for e in examples) / 3000)
    for r in report.groups[0].rules:
        assert abs(r.margin) < 0.03, r
        assert r.ci_low < random_accuracy < r.ci_high, r


def test_differently_rendered_gold_is_found_wherever_it_is():
    rng = random.Random(2)
    examples = []
    for i in range(300):
        texts = plain_slate(rng, 4)
        gold = rng.randint(1, 4)
        # The real flaw: the clicked video was appended without channel, duration or comments.
        texts[gold - 1] = option("Clicked video", rng, channel=False, duration=False, comments=False)
        examples.append(example(i, gold, texts))
    report = audit_examples(examples)
    odd = rule(report, "odd_rendering")
    assert (odd.accuracy, odd.coverage, odd.fit) == (1.0, 1.0, "fewest fields")
    assert report.verdict == "LEAK" and report.best_rule == "odd_rendering"
    assert abs(rule(report, "always_last").margin) < 0.1


def test_rendering_rule_needs_a_unique_signature_not_just_few_fields():
    rng = random.Random(12)
    examples = []
    for i in range(100):
        decoys = [option(f"Decoy {k}", rng, channel=False, duration=False) for k in range(2)]
        gold = option("Gold video", rng, duration=False)  # unique, but not the barest
        texts = decoys + [gold, option("Full video", rng)]
        rng.shuffle(texts)
        examples.append(example(i, texts.index(gold) + 1, texts))
    odd = rule(audit_examples(examples), "odd_rendering")
    assert (odd.accuracy, odd.coverage, odd.fit) == (1.0, 1.0, "fewest fields")


def test_rendering_rule_fits_its_direction_in_two_option_slates():
    rng = random.Random(3)
    examples = []
    for i in range(100):
        texts = [option("Other video", rng, channel=False, duration=False) for _ in range(2)]
        gold = rng.randint(1, 2)
        texts[gold - 1] = option("Richer video", rng)  # here the gold shows MORE fields
        examples.append(example(i, gold, texts))
    odd = rule(audit_examples(examples), "odd_rendering")
    assert (odd.accuracy, odd.fit) == (1.0, "most fields")


def test_most_viewed_rule_is_a_baseline_not_a_leak():
    rng = random.Random(4)
    examples = []
    for i in range(300):
        views = rng.sample(range(1_000, 1_000_000), 4)
        gold = rng.randint(1, 4)
        views[gold - 1] = 5_000_000
        examples.append(example(i, gold, [option(f"Video {k}", rng, views=v) for k, v in enumerate(views)]))
    report = audit_examples(examples)
    assert rule(report, "most_viewed").accuracy == 1.0
    assert report.verdict == "OK"  # popularity is a real signal in the study, not an artifact
    # A tie between two most viewed options earns half credit, as a random tie-break would.
    tied = [option("A video", rng, views=9), option("B video", rng, views=9), option("C video", rng, views=1)]
    assert rule(audit_examples([example(0, 1, tied)]), "most_viewed").accuracy == 0.5


def test_gold_already_in_the_viewer_state_is_a_leak():
    rng = random.Random(5)
    examples = []
    for i in range(200):
        texts = [option(f"Distinct title number {i}-{k}", rng) for k in range(4)]
        gold = rng.randint(1, 4)
        state = f"RECENTLY WATCHED\n1. Distinct title number {i}-{gold - 1} (watched 10s of 100s)"
        examples.append(example(i, gold, texts, state=state))
    report = audit_examples(examples)
    seen = rule(report, "seen_in_state")
    assert (seen.accuracy, seen.coverage) == (1.0, 1.0)
    assert report.leak and report.best_rule == "seen_in_state"


def test_fitted_position_is_scored_leave_one_out():
    rng = random.Random(6)
    # Fitted on all rows the mode (a tie) would look right half the time; left out, never.
    examples = [example(0, 1, plain_slate(rng, 2)), example(1, 2, plain_slate(rng, 2))]
    modal = rule(audit_examples(examples), "modal_position")
    assert modal.accuracy == 0.0 and modal.fit == "n=2->1/2"


def test_few_rows_are_no_verdict():
    rng = random.Random(7)
    # 5 of 5 two-option slates with the gold last happen by chance 1 time in 32: one 95%
    # interval would call it a leak, but the best of 6 hypotheses needs the corrected interval.
    report = audit_examples([example(i, 2, plain_slate(rng, 2)) for i in range(5)])
    assert report.verdict == "OK" and not report.leak and not report.reasons
    # 4 single rules + modal_position choosing between 2 positions; 0.1% family-wise.
    assert report.comparisons == 6 and report.verdict_confidence == pytest.approx(1 - 0.001 / 6)
    assert rule(report, "always_last").accuracy == 1.0 and report.best_margin_ci[0] < 0.05
    # 8 of 8 four-option slates happen 1 time in 65536: enough rows for a verdict.
    assert audit_examples([example(i, 4, plain_slate(rng, 4)) for i in range(8)]).leak


def test_a_real_margin_too_uncertain_for_a_leak_is_suspect():
    rng = random.Random(13)
    # 100 of 300 golds last, the rest spread over 1..3: always_last 0.333 vs random 0.25.
    golds = [4 if i % 3 == 0 else (i // 3) % 3 + 1 for i in range(300)]
    report = audit_examples([example(i, g, plain_slate(rng, 4)) for i, g in enumerate(golds)])
    assert report.verdict == "SUSPECT" and not report.leak
    assert rule(report, "always_last").margin == pytest.approx(1 / 3 - 1 / 4)
    assert report.best_margin_ci[0] < 0.05 < report.best_margin
    assert any("always_last" in reason for reason in report.reasons)


def test_chance_alone_rarely_makes_a_leak_and_seldom_a_suspect():
    # Golds uniformly random: a LEAK would stop a run on clean data. At the old 95%
    # family-wise level with modal_position counted once, 1.2% of 8-row sets were LEAKs
    # and 75% SUSPECT (a point margin over threshold alone is common luck).
    verdicts = {n: [] for n in (4, 8, 32)}
    for n, found in verdicts.items():
        for seed in range(300):
            rng = random.Random(1000 + seed)
            slates = [example(i, rng.randint(1, 4), plain_slate(rng, 4), viewer=f"v{i // 3}") for i in range(n)]
            found.append(audit_examples(slates).verdict)
    for n, found in verdicts.items():
        assert found.count("LEAK") == 0, n
        assert found.count("SUSPECT") < 0.2 * len(found), (n, found.count("SUSPECT"))


def test_repeated_rows_of_one_viewer_do_not_count_as_independent_evidence():
    rng = random.Random(11)
    # 6 viewers with 25 decisions each; 5 always pick the last option, 1 the first. As 150
    # independent rows always_last would be a leak; as 6 viewers it is no evidence at all.
    examples = [example(i, 2 if viewer < 5 else 1, plain_slate(rng, 2), viewer=f"v{viewer}")
                for viewer in range(6) for i in range(viewer * 25, viewer * 25 + 25)]
    last = rule(audit_examples(examples), "always_last")
    assert last.accuracy == pytest.approx(5 / 6) and last.design_effect > 10
    assert last.ci_high - last.ci_low > 0.4  # about 6 rows' worth of evidence, not 150
    assert audit_examples(examples).verdict == "OK"
    assert audit_examples(examples).groups[0].n_viewers == 6
    independent = [dataclasses.replace(e, viewer_id=None) for e in examples]
    assert audit_examples(independent).verdict == "LEAK"
    assert audit_examples(independent).groups[0].n_viewers == 0


def test_a_leak_confined_to_one_study_is_reported_for_that_study():
    rng = random.Random(8)
    gun = [example(i, 4, plain_slate(rng, 4), issue="gun_control", study="study1") for i in range(120)]
    wage = [example(1000 + i, rng.randint(1, 4), plain_slate(rng, 4), issue="minimum_wage", study="study2")
            for i in range(600)]
    report = audit_examples(gun + wage)
    assert [g.name for g in report.groups] == ["all", "gun_control/study1", "minimum_wage/study2"]
    assert report.leak and report.best_group == "gun_control/study1"
    assert rule(report, "always_last", "gun_control/study1").accuracy == 1.0
    assert rule(report, "always_last").accuracy < 0.45


def test_non_viewer_rows_are_counted_and_empty_input_raises():
    rng = random.Random(9)
    math_row = Example(example_id="m", task="math", messages=({"role": "user", "content": "1+1"},), answer="2")
    report = audit_examples([example(0, 1, plain_slate(rng, 3)), math_row])
    assert (report.n_examples, report.ignored) == (1, 1)
    with pytest.raises(ValueError, match="no viewer examples"):
        audit_examples([math_row])


def test_seed_sample_shows_the_gun_study_flaw_but_six_rows_cannot_prove_it():
    from grailcore.config import DataConfig
    from grailcore.data import load_examples

    loaded = load_examples(SEED_SAMPLE, DataConfig(train_path=SEED_SAMPLE))
    report = audit_examples(loaded.raw_examples)  # the rows as the file gave them
    gun = "gun_control/study1"
    assert rule(report, "always_last", gun).accuracy == 1.0
    odd = rule(report, "odd_rendering", gun)
    assert (odd.accuracy, odd.coverage) == (1.0, 1.0)
    # The wage studies render every option alike: the rendering rule has nothing to go on.
    assert rule(report, "odd_rendering", "minimum_wage/study2").coverage == 0.0
    # 3 gun rows: a +0.6 point margin that 3 rows and 34 hypotheses cannot tell from luck.
    assert report.verdict == "OK" and report.best_group == gun
    assert report.best_margin == pytest.approx(0.6) and report.best_margin_ci[0] < 0
    # As training shows them, no option is rendered differently.
    shown = audit_examples(loaded.examples)
    assert all(rule(shown, "odd_rendering", g.name).coverage == 0.0 for g in shown.groups)


def synthetic_examples(shuffle: bool, leak: bool = False) -> list[Example]:
    decisions = generate_study("gun_control", 1500, seed=0)
    if leak:  # recreate the original flaw: clicked video appended last, without channel/duration
        decisions = [_append_gold_bare(d) for d in decisions]
    return [build_example(d, shuffle_options=shuffle, seed=0) for d in decisions]


def _append_gold_bare(d):
    gold = dataclasses.replace(d.slate[d.gold_index - 1], channel=None, duration_s=None)
    others = [v for k, v in enumerate(d.slate, 1) if k != d.gold_index]
    return dataclasses.replace(d, slate=(*others, gold), gold_index=d.n_options, true_choice_probs=None)


def test_shuffled_synthetic_study_passes():
    report = audit_examples(synthetic_examples(shuffle=True))
    assert report.verdict == "OK", format_report(report)
    assert rule(report, "odd_rendering").coverage == 0.0
    assert all(abs(r.margin) < 0.05 for r in report.groups[0].rules if r.kind == "artifact")


def test_synthetic_study_with_the_original_flaw_is_flagged():
    report = audit_examples(synthetic_examples(shuffle=False, leak=True))
    assert report.leak
    assert rule(report, "always_last").accuracy == 1.0
    assert rule(report, "odd_rendering").accuracy == 1.0


def write_prerendered(path, golds_last: bool, n: int = 120) -> str:
    rng = random.Random(10)
    with open(path, "w") as f:
        for i in range(n):
            texts = plain_slate(rng, 3)
            gold = 3 if golds_last else rng.randint(1, 3)
            options = "\n".join(f"{k}. {t}" for k, t in enumerate(texts, 1))
            prompt = f"VIEWER someone\n\nOPTIONS\n{options}\n\nQUESTIONS\n1. Which option?"
            f.write(json.dumps({"prompt": prompt, "gold_index": gold, "n_options": 3,
                                "issue": "gun_control", "study": "study1"}) + "\n")
    return str(path)


def test_cli_strict_exit_code_and_json(tmp_path, capsys):
    leaky = write_prerendered(tmp_path / "leaky.jsonl", golds_last=True)
    assert main([leaky]) == 0
    assert main([leaky, "--strict", "--json", str(tmp_path / "r.json")]) == 1
    out = capsys.readouterr().out
    assert "Verdict: LEAK" in out and "--data.allow-leaks" in out
    written = json.loads((tmp_path / "r.json").read_text())
    # The file's own order leaks; shuffled as training shows it, it does not.
    assert written["verdicts"] == {"all": {"raw": "LEAK", "as trained": "OK"}}
    raw = next(a for a in written["audits"] if a["stage"] == "raw")
    assert raw["verdict"] == "LEAK" and raw["best_rule"] in ("always_last", "modal_position")
    assert main([leaky, "--strict", "--no-shuffle"]) == 1
    fair = write_prerendered(tmp_path / "fair.jsonl", golds_last=False)
    assert main([fair, "--strict"]) == 0
    assert main([SEED_SAMPLE, "--strict"]) == 0  # too few rows for a verdict
