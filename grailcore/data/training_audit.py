"""The leak audit a run makes before it loads a model: the trivial-rule checks of
`grailcore.data.audit` on the training and evaluation rows, both as the file gave them
(raw) and as training shows them (re-rendered, options shuffled). A LEAK in either
stops the run unless `data.allow_leaks` is set.

`audit_for_training` is pure; `check_training_data` logs, writes RUN_DIR/data_audit.json
and raises `DataLeakError`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from grailcore.config import DataConfig
from grailcore.data.audit import DEFAULT_THRESHOLD, AuditReport, audit_examples
from grailcore.data.loaders import LoadResult
from grailcore.data.schema import Example

log = logging.getLogger(__name__)
AUDIT_FILE = "data_audit.json"
RAW, AS_TRAINED = "raw", "as trained"
STAGE_MEANING = {RAW: "as the file gave them", AS_TRAINED: "as training shows them"}
OVERRIDE_FLAG = "--data.allow-leaks"


class DataLeakError(ValueError):
    """The data lets a rule that never looks at the viewer find the gold option."""


@dataclass(frozen=True)
class StageAudit:
    """The audit of one dataset ('train', 'eval') at one stage (RAW or AS_TRAINED)."""

    dataset: str
    stage: str
    report: AuditReport

    def rules(self) -> list[str]:
        """'group/rule' of each pair over threshold (those behind a LEAK or SUSPECT)."""
        return [f"{group}/{rule}" for group, rule in self.report.flagged]

    def short(self) -> str:
        """'LEAK (all/always_last, all/odd_rendering)' or 'OK'."""
        return self.report.verdict + (f" ({', '.join(self.rules())})" if self.rules() else "")

    def describe(self) -> str:
        """'LEAK: gun_control/study1: always_last accuracy 1.000 vs random 0.250 (..., n=200); ...',
        or for an OK whose best rule still clears the threshold at its point value, that rule."""
        r = self.report
        if r.reasons:
            return f"{r.verdict}: " + "; ".join(r.reasons)
        if r.best_margin > r.threshold:
            n = next(g.n_examples for g in r.groups if g.name == r.best_group)
            return (f"{r.verdict} (largest: {r.best_group}/{r.best_rule} {r.best_margin:+.3f} over random on "
                    f"{n} rows, too few to tell from chance)")
        return r.verdict


@dataclass(frozen=True)
class TrainingAudit:
    """Every audit a run made of its data, and whether a LEAK may pass."""

    audits: tuple[StageAudit, ...]
    allow_leaks: bool
    shuffle_options: bool
    dropped_fields: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """Per dataset: field -> rows whose re-rendering dropped it (only some options carried it)."""
    not_audited: Mapping[str, str] = field(default_factory=dict)
    """Per dataset without viewer rows (math): why it was not audited."""

    @property
    def leaks(self) -> list[StageAudit]:
        return [a for a in self.audits if a.report.leak]

    @property
    def stops(self) -> bool:
        """A LEAK was found and `data.allow_leaks` does not let it pass."""
        return bool(self.leaks) and not self.allow_leaks

    def find(self, dataset: str, stage: str) -> StageAudit | None:
        return next((a for a in self.audits if (a.dataset, a.stage) == (dataset, stage)), None)

    def verdicts(self) -> dict[str, dict[str, str]]:
        """{dataset: {stage: verdict}}, e.g. {'train': {'raw': 'LEAK', 'as trained': 'OK'}}."""
        out: dict[str, dict[str, str]] = {}
        for a in self.audits:
            out.setdefault(a.dataset, {})[a.stage] = a.report.verdict
        return out

    def lines(self) -> list[str]:
        """One line per dataset: its rows and both verdicts with the rules behind them."""
        out = []
        for dataset in dict.fromkeys(a.dataset for a in self.audits):
            raw, shown = self.find(dataset, RAW), self.find(dataset, AS_TRAINED)
            dropped = ", ".join(f"{name} in {n}" for name, n in self.dropped_fields.get(dataset, {}).items())
            out.append(f"{dataset} ({shown.report.n_examples} rows): raw {raw.describe()} | as trained "
                       f"{shown.describe()}" + (f" | re-rendering dropped {dropped} rows" if dropped else ""))
        out += [f"{dataset}: not audited ({why})" for dataset, why in self.not_audited.items()]
        return out

    def leak_message(self) -> str:
        """What leaked, where, whether re-rendering and shuffling removed it, and the way past."""
        lines = ["LEAK in the run's data: a trivial rule that never looks at the viewer finds the gold option."]
        for a in self.leaks:
            lines.append(f"  {a.dataset}, {a.stage} ({STAGE_MEANING[a.stage]}): " + "; ".join(a.report.reasons))
            if a.stage == RAW:
                lines.append(f"    {_after_rerendering(self.find(a.dataset, AS_TRAINED), self.shuffle_options)}")
        lines.append(
            "  A leak in the raw file means the data was built with the answer in it (e.g. the clicked video "
            "appended to the slate); re-rendering and shuffling hide the artifacts the audit knows, not "
            "necessarily all. Inspect it with `python -m grailcore.data.audit PATH`, fix the data, or pass "
            f"{OVERRIDE_FLAG} to train on it anyway (recorded in config.yaml and the run's summary).")
        return "\n".join(lines)

    def summary(self) -> dict:
        """The verdicts and the override, for a run's summary (dry_run.json)."""
        return {"verdicts": {dataset: {stage: self.find(dataset, stage).short() for stage in stages}
                             for dataset, stages in self.verdicts().items()},
                "allow_leaks": self.allow_leaks, "leak_overridden": bool(self.leaks) and self.allow_leaks,
                "file": AUDIT_FILE}

    def to_json(self) -> dict:
        return {
            "verdicts": self.verdicts(), "allow_leaks": self.allow_leaks,
            "leak_overridden": bool(self.leaks) and self.allow_leaks,
            "shuffle_options": self.shuffle_options, "dropped_fields": {k: dict(v) for k, v in
                                                                       self.dropped_fields.items()},
            "not_audited": dict(self.not_audited),
            "audits": [{"dataset": a.dataset, "stage": a.stage, **a.report.to_json()} for a in self.audits],
        }


def _after_rerendering(shown: StageAudit | None, shuffled: bool) -> str:
    how = ("re-rendering and shuffling" if shuffled
           else "re-rendering (options NOT shuffled: data.shuffle_options=False)")
    if shown is None:
        return ""
    if shown.report.leak:
        return f"still a LEAK after {how}."
    return f"{how} removed it from the rows the model sees (as trained: {shown.report.verdict})."


def _viewer_rows(examples: Sequence[Example]) -> list[Example]:
    return [ex for ex in examples if ex.task == "viewer" and ex.gold_index is not None]


def _dropped(examples: Sequence[Example]) -> dict[str, int]:
    counts = Counter(name for ex in examples for name in ex.meta.get("dropped_fields", ()))
    return dict(sorted(counts.items()))


def audit_for_training(datasets: Mapping[str, LoadResult], data_cfg: DataConfig,
                       threshold: float = DEFAULT_THRESHOLD) -> TrainingAudit:
    """Audit each named dataset (e.g. {'train': ..., 'eval': ...}) raw and as trained."""
    audits, dropped, not_audited = [], {}, {}
    for name, result in datasets.items():
        shown = _viewer_rows(result.examples)
        if not shown:
            not_audited[name] = "no viewer rows with a gold option (the audit checks viewer choices)"
            continue
        raw = _viewer_rows(result.raw_examples) if result.raw_examples is not None else shown
        source = result.source or name
        for stage, rows in ((RAW, raw), (AS_TRAINED, shown)):
            audits.append(StageAudit(name, stage, audit_examples(rows, threshold, f"{source} [{name}, {stage}]")))
        if _dropped(shown):
            dropped[name] = _dropped(shown)
    return TrainingAudit(tuple(audits), data_cfg.allow_leaks, data_cfg.shuffle_options, dropped, not_audited)


def check_training_data(datasets: Mapping[str, LoadResult], data_cfg: DataConfig, run_dir: str | Path,
                        rank0: bool) -> TrainingAudit:
    """Audit the run's data before any model is loaded: log the verdicts (rank 0), write them
    to RUN_DIR/data_audit.json (rank 0) and raise DataLeakError on a LEAK unless
    `data.allow_leaks`. Every rank audits the same rows, so every rank stops alike."""
    audit = audit_for_training(datasets, data_cfg)
    if rank0:
        if not data_cfg.shuffle_options:
            log.warning("data.shuffle_options=False: options are shown in the order the data stores them, so a "
                        "gold-position bias in the data (e.g. the clicked video appended last) reaches training")
        for line in audit.lines():
            log.info("data audit: %s", line)
        for a in audit.audits:
            if a.stage == AS_TRAINED and a.report.verdict == "SUSPECT":
                log.warning("data audit: %s rows as trained are SUSPECT (%s); too few rows to be sure: "
                            "audit more with `python -m grailcore.data.audit`", a.dataset, "; ".join(a.report.reasons))
        write_audit(audit, run_dir)
        if audit.leaks and audit.allow_leaks:
            log.warning("data.allow_leaks=True: training despite the leak.\n%s", audit.leak_message())
    if audit.stops:
        raise DataLeakError(audit.leak_message() + f"\n  (verdicts also in {Path(run_dir) / AUDIT_FILE})")
    return audit


def write_audit(audit: TrainingAudit, run_dir: str | Path) -> Path:
    out = Path(run_dir) / AUDIT_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(audit.to_json(), indent=2))
    tmp.replace(out)
    return out
