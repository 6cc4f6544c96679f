"""Leak audit for viewer-choice data: can a rule that never looks at the viewer (slate
position, option rendering, popularity, already-seen titles) find the gold option?

`audit_examples` is pure; `python -m grailcore.data.audit PATH` loads any dataset and prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

from grailcore.data.audit_rules import RULES, Row, RuleFn, credit, parse_option
from grailcore.data.audit_stats import PositionTest, design_effect, position_tests, wilson_interval
from grailcore.data.schema import Example

DEFAULT_THRESHOLD = 0.05
"""A rule must beat random by more than this (absolute accuracy) to count as a leak."""
CONFIDENCE = 0.95
"""Of each rule's interval and the position tests; family-wise, of the evidence a SUSPECT needs."""
VERDICT_CONFIDENCE = 0.999
"""Family-wise confidence of a LEAK verdict (Bonferroni over the comparisons made). A LEAK
stops training, so chance must not cause one: at 95%, 2% of 4-row sets of uniformly random
golds (all in one position) were called a leak; at 99%, 0.1-0.3% of 6- to 32-row sets."""


@dataclass(frozen=True)
class RuleResult:
    """How one trivial rule scores on one group of examples."""

    name: str
    kind: str
    """'artifact' (decides the verdict) or 'content' (a baseline to beat)."""
    accuracy: float
    """Mean credit: 1 if the pick is gold, 1/k for a k-way tie, 1/n when the rule abstains."""
    ci_low: float
    ci_high: float
    """95% Wilson interval on the design-effect-adjusted number of rows."""
    margin: float
    """accuracy - random accuracy."""
    coverage: float
    """Share of rows where the rule made a real pick (not an abstention or all options)."""
    covered_accuracy: float | None
    """Accuracy on the covered rows only."""
    design_effect: float
    fit: str = ""
    """What a fitted rule chose on all rows (it is scored leave-one-out)."""


@dataclass(frozen=True)
class GroupAudit:
    name: str
    n_examples: int
    n_viewers: int
    """Distinct viewer ids; rows without one are treated as independent."""
    random_accuracy: float
    """mean(1/n_options): the expected accuracy of a uniform random pick."""
    positions: list[PositionTest]
    rules: list[RuleResult]


@dataclass(frozen=True)
class AuditReport:
    """Verdict 'LEAK': an artifact rule's margin over random has its lower confidence bound
    (family-wise VERDICT_CONFIDENCE) above `threshold`; 'SUSPECT': a rule beats random
    (family-wise CONFIDENCE) by a point margin above `threshold`, but too few rows to be
    sure of the margin; 'OK' otherwise."""

    source: str
    n_examples: int
    ignored: int
    """Rows without a viewer choice (e.g. math), not audited."""
    threshold: float
    verdict: str
    comparisons: int
    """Hypotheses tested: one per (group, artifact rule), modal_position counting one per
    position it could pick; the verdict's interval is Bonferroni-corrected for them."""
    verdict_confidence: float
    best_group: str
    best_rule: str
    best_margin: float
    best_margin_ci: tuple[float, float]
    reasons: list[str]
    """One line per (group, artifact rule) over threshold: point margin above it and beating
    random family-wise (the pairs behind a LEAK or SUSPECT verdict; none when OK)."""
    flagged: list[tuple[str, str]]
    """(group, rule) of each line of `reasons`, in the same order."""
    position_notes: list[str]
    """Slate sizes whose gold positions differ from uniform (chi-square, Bonferroni 5%):
    a position prior a model can learn, even when no rule clears the threshold."""
    groups: list[GroupAudit]

    @property
    def leak(self) -> bool:
        return self.verdict == "LEAK"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _to_rows(examples: Sequence[Example]) -> list[Row]:
    rows = []
    for ex in examples:
        if ex.task != "viewer" or ex.gold_index is None or not ex.n_options:
            continue
        # Without one text per option the text rules abstain (it shows as lower coverage).
        texts = ex.option_texts if len(ex.option_texts) == ex.n_options else ()
        state = ex.state_text or ex.prompt.split("\nOPTIONS", 1)[0]
        rows.append(Row(ex.gold_index, ex.n_options, tuple(parse_option(t) for t in texts),
                         state, ex.viewer_id or ex.example_id, ex.viewer_id is not None,
                         f"{ex.issue or '-'}/{ex.study or '-'}"))
    return rows


def _score_rule(rows: Sequence[Row], name: str, kind: str, rule: RuleFn, random: float) -> RuleResult:
    picks, fit = rule(rows)
    credits = [credit(r, p) for r, p in zip(rows, picks)]
    covered = [c for r, p, c in zip(rows, picks, credits) if p and len(p) < r.n]
    accuracy = sum(credits) / len(credits)
    deff = design_effect(credits, [r.cluster for r in rows])
    z = NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
    low, high = wilson_interval(accuracy, len(rows) / deff, z)
    return RuleResult(
        name=name, kind=kind, accuracy=accuracy, ci_low=low, ci_high=high,
        margin=accuracy - random, coverage=len(covered) / len(rows),
        covered_accuracy=sum(covered) / len(covered) if covered else None,
        design_effect=deff, fit=fit,
    )


def _audit_group(name: str, rows: Sequence[Row]) -> GroupAudit:
    random = sum(1.0 / r.n for r in rows) / len(rows)
    golds: dict[int, list[int]] = defaultdict(list)
    for r in rows:
        golds[r.n].append(r.gold)
    return GroupAudit(
        name=name, n_examples=len(rows), n_viewers=len({r.cluster for r in rows if r.has_viewer}),
        random_accuracy=random, positions=position_tests(golds),
        rules=[_score_rule(rows, rule_name, kind, rule, random) for rule_name, kind, rule in RULES],
    )


def _group_rows(examples: Sequence[Example]) -> dict[str, list[Row]]:
    """All rows, plus one group per issue/study when there are several: a leak confined to
    one study (the gun study's appended gold) is diluted in the pooled numbers."""
    rows = _to_rows(examples)
    groups: dict[str, list[Row]] = {"all": rows}
    if len({r.group for r in rows}) > 1:
        for r in sorted(rows, key=lambda r: r.group):
            groups.setdefault(r.group, []).append(r)
    return groups


def audit_examples(
    examples: Sequence[Example], threshold: float = DEFAULT_THRESHOLD, source: str = ""
) -> AuditReport:
    """Score every trivial rule on all viewer examples and on each issue/study group, and
    decide whether an artifact rule beats random by more than `threshold`."""
    grouped = _group_rows(examples)
    n_examples = len(grouped["all"])
    if n_examples == 0:
        raise ValueError(f"{source or 'audit'}: no viewer examples with a gold option to audit")
    groups = [_audit_group(name, rows) for name, rows in grouped.items()]
    tested = [(g, r) for g in groups for r in g.rules if r.kind == "artifact"]
    # Bonferroni: the best of many (group, rule) pairs beats random by luck alone.
    comparisons = sum(_hypotheses(g, r) for g, r in tested)
    level = 1 - (1 - VERDICT_CONFIDENCE) / comparisons
    z = NormalDist().inv_cdf(0.5 + level / 2)

    def margin_ci(g: GroupAudit, r: RuleResult) -> tuple[float, float]:
        low, high = wilson_interval(r.accuracy, g.n_examples / r.design_effect, z)
        return low - g.random_accuracy, high - g.random_accuracy

    leaking = [(g, r) for g, r in tested if margin_ci(g, r)[0] > threshold]
    # A point margin above threshold alone is common luck in small sets (over half of 32-row
    # sets of random golds): a SUSPECT also needs the rule to beat random, family-wise.
    z_suspect = NormalDist().inv_cdf(1 - (1 - CONFIDENCE) / comparisons / 2)
    suspect = sorted(((g, r) for g, r in tested if r.margin > threshold and wilson_interval(
        r.accuracy, g.n_examples / r.design_effect, z_suspect)[0] > g.random_accuracy), key=lambda p: -p[1].margin)
    if leaking:
        verdict, (best_g, best_r) = "LEAK", max(leaking, key=lambda p: margin_ci(*p)[0])
    else:
        verdict = "SUSPECT" if suspect else "OK"
        best_g, best_r = max(tested, key=lambda p: p[1].margin)
    reasons = [
        f"{g.name}: {r.name} accuracy {r.accuracy:.3f} vs random {g.random_accuracy:.3f} "
        f"(margin {r.margin:+.3f}, {level:.2%} CI [{margin_ci(g, r)[0]:+.3f}, {margin_ci(g, r)[1]:+.3f}]"
        f", n={g.n_examples})"
        for g, r in suspect
    ]
    return AuditReport(
        source=source, n_examples=n_examples, ignored=len(examples) - n_examples,
        threshold=threshold, verdict=verdict, comparisons=comparisons, verdict_confidence=level,
        best_group=best_g.name, best_rule=best_r.name, best_margin=best_r.margin,
        best_margin_ci=margin_ci(best_g, best_r), reasons=reasons, flagged=[(g.name, r.name) for g, r in suspect],
        position_notes=_position_notes(groups[0].positions), groups=groups,
    )


def _hypotheses(group: GroupAudit, rule: RuleResult) -> int:
    """modal_position picks the best of up to n positions: n hypotheses (the largest slate's)."""
    return max(t.n_options for t in group.positions) if rule.name == "modal_position" else 1


def _position_notes(tests: Sequence[PositionTest]) -> list[str]:
    return [f"gold positions for n_options={t.n_options} are not uniform: counts {list(t.counts)}, "
            f"chi2={t.chi2:.1f}, p={t.p_value:.2g}" for t in tests if t.p_value < (1 - CONFIDENCE) / len(tests)]


_VERDICT_MEANING = {
    "LEAK": "an artifact rule beats random by more than the threshold, even at the lower "
            "confidence bound: a model can score without modelling the viewer",
    "SUSPECT": "an artifact rule beats random, by more than the threshold at its point value, but "
               "there are too few rows to be sure of the margin: audit more rows",
    "OK": "no artifact rule beats random by more than the threshold",
}


def _format_group(g: GroupAudit) -> list[str]:
    viewers = f"{g.n_viewers} viewers" if g.n_viewers else "no viewer ids (rows taken as independent)"
    lines = [f"[{g.name}] {g.n_examples} examples, {viewers}, "
             f"random accuracy mean(1/n_options) = {g.random_accuracy:.3f}",
             "  gold position vs uniform:"]
    for t in g.positions:
        rough = f"  (expected {t.min_expected:.1f} < 5 per cell: rough)" if t.min_expected < 5 else ""
        lines.append(f"    n_options={t.n_options:<2} rows={t.rows:<6} counts={list(t.counts)}  "
                     f"chi2={t.chi2:.2f} df={t.df} p={t.p_value:.3g}{rough}")
    lines.append(f"  {'rule':<15} {'kind':<9} {'acc':>6}  {'95% CI':<15} {'margin':>7} "
                 f"{'cover':>6} {'acc|cov':>7} {'deff':>5}  fit")
    for r in g.rules:
        covered = f"{r.covered_accuracy:.3f}" if r.covered_accuracy is not None else "-"
        lines.append(f"  {r.name:<15} {r.kind:<9} {r.accuracy:6.3f}  [{r.ci_low:.3f}, {r.ci_high:.3f}] "
                     f"{r.margin:+7.3f} {r.coverage:6.2f} {covered:>7} {r.design_effect:5.2f}  {r.fit}")
    return lines


def format_report(report: AuditReport) -> str:
    """The printed audit: verdict first, then one table per group."""
    lines = [
        f"Leak audit of {report.source or 'examples'}: {report.n_examples} viewer examples"
        f" ({report.ignored} other rows ignored)",
        f"Verdict: {report.verdict} - {_VERDICT_MEANING[report.verdict]}.",
        f"  Rule: LEAK when the lower bound of an artifact rule's margin over random exceeds "
        f"{report.threshold:.3f}; intervals are Wilson at {report.verdict_confidence:.2%} "
        f"(Bonferroni over {report.comparisons} group x rule hypotheses); SUSPECT when a rule beats "
        f"random at {CONFIDENCE:.0%} family-wise by a point margin over the threshold.",
        f"  Best artifact rule: {report.best_group} {report.best_rule}, margin "
        f"{report.best_margin:+.3f} CI [{report.best_margin_ci[0]:+.3f}, {report.best_margin_ci[1]:+.3f}]",
    ]
    lines += [f"  over threshold: {reason}" for reason in report.reasons]
    lines += [f"  note: {note}" for note in report.position_notes]
    lines.append("  Fitted rules are scored leave-one-out; abstentions and k-way ties earn the "
                 "random credit; most_viewed is a content baseline (popularity can be a real "
                 "signal), reported but not part of the verdict.")
    for g in report.groups:
        lines += [""] + _format_group(g)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m grailcore.data.audit",
        description="Check whether trivial rules (slate position, option rendering, already-seen titles, "
                    "popularity) find the gold option of a viewer dataset, in the rows as the file gave them "
                    "(raw) and as training shows them (re-rendered, options shuffled): the check a training "
                    "run makes before it loads a model.")
    parser.add_argument("path", help="any dataset load_examples reads, or synthetic:<issue>")
    parser.add_argument("--split", default="train")
    parser.add_argument("--strict", action="store_true", help="exit 1 when either verdict is LEAK")
    parser.add_argument("--json", metavar="OUT", help="also write both reports as JSON")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="absolute margin over random accuracy that counts as a leak")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="as trained with data.shuffle_options=False (options in stored order)")
    args = parser.parse_args(argv)

    # Imported here so the pure audit does not pull in the loaders' dependencies.
    from grailcore.config import DataConfig
    from grailcore.data.loaders import load_examples
    from grailcore.data.training_audit import audit_for_training

    data_cfg = DataConfig(train_path=args.path, shuffle_options=not args.no_shuffle)
    loaded = load_examples(args.path, data_cfg, split=args.split)
    audit = audit_for_training({loaded.split or args.split: loaded}, data_cfg, threshold=args.threshold)
    for a in audit.audits:
        print(format_report(a.report) + "\n")
    print("Summary:\n" + "\n".join(f"  {line}" for line in audit.lines()))
    if audit.leaks:
        print(audit.leak_message())
    if loaded.skipped:
        print(f"\nloader skipped {loaded.skipped} rows: " + "; ".join(loaded.skip_reasons[:5]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(audit.to_json(), f, indent=2)
    return 1 if args.strict and audit.leaks else 0


if __name__ == "__main__":
    sys.exit(main())
