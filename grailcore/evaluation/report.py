"""Write an evaluation to disk (metrics.json, report.md, PNGs) and render the short
console table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from grailcore.data.schema import OPINION_DIRECTIONS
from grailcore.evaluation import plots
from grailcore.evaluation.bootstrap import Estimate

CHOICE_LABELS = {
    "accuracy": "accuracy (strict parse, first sample)",
    "accuracy_sample_mean": "accuracy (mean over samples)",
    "parsed_rate": "parsed rate (valid option number)",
    "format_rate": "format rate (strict layout)",
    "original_accuracy": "accuracy, original system's rule",
    "original_parsed_rate": "parsed rate, original system's rule",
    "original_format_rate": "format rate, original system's rule",
}


def to_jsonable(obj: Any) -> Any:
    """Estimates become {value, lo, hi}; numpy values become Python ones; NaN (no interval,
    empty group) and inf (NLL of a zero probability, alpha = 0) become null: strict JSON."""
    if isinstance(obj, Estimate):
        return to_jsonable(obj.as_dict())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def fmt(x: Any) -> str:
    """'0.500 [0.333, 0.667]', or just the value without an interval."""
    if x is None:
        return "n/a"
    if isinstance(x, Estimate):
        if np.isnan(x.value):
            return "n/a"
        return f"{x.value:.3f}" if np.isnan(x.lo) else f"{x.value:.3f} [{x.lo:.3f}, {x.hi:.3f}]"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _baseline_rows(model_label: str, model: Estimate, table: dict) -> list[list[str]]:
    rows = [[f"**{model_label}**", fmt(model), "", ""]]
    for name, row in table.items():
        rows.append([name, fmt(row["accuracy"]), fmt(row["model_minus_baseline"]), row["description"]])
    return rows


def _choice_sections(r: dict) -> list[str]:
    out = ["## Next-video choice", ""]
    out += _table(["metric", "value [95% CI]"], [[CHOICE_LABELS.get(k, k), fmt(v)] for k, v in r["choice"].items()])
    out += ["", "## Accuracy vs baselines (same rows)", ""]
    out += _table(["predictor", "accuracy", "model - baseline", "how"],
                  _baseline_rows("model", r["choice"]["accuracy"], r["baselines"]))
    for name, groups in r["breakdowns"].items():
        out += ["", f"### By {name.replace('_', ' ')}", ""]
        out += _table([name, "rows", "accuracy", "parsed", "format", "original rule acc."],
                      [[g, str(v["n_rows"]), fmt(v["accuracy"]), fmt(v["parsed_rate"]), fmt(v["format_rate"]),
                        fmt(v["original_accuracy"])] for g, v in groups.items()])
    return out


def _opinion_sections(r: dict) -> list[str]:
    out = ["", "## Opinion direction", ""]
    out += _table(["metric", "value [95% CI]"], [[k, fmt(v)] for k, v in r["opinion"].items()])
    if "accuracy" not in r["opinion"]:
        return out + ["", "No gold `opinion_direction` on these rows: accuracy and fidelity not computed."]
    out += [""] + _table(["predictor", "accuracy", "model - baseline", "how"],
                         _baseline_rows("model", r["opinion"]["accuracy"], r["opinion_baselines"]))
    fid = r["opinion_fidelity"]
    labels = list(OPINION_DIRECTIONS) + ["none"]
    out += ["", f"Distribution TV to gold: model {fmt(fid['tv_model'])}, "
                f"always 'no_change' {fmt(fid['tv_always_no_change'])}.", ""]
    out += _table(["", *labels], [["model", *[f"{p:.3f}" for p in fid["model_distribution"]]],
                                  ["gold", *[f"{p:.3f}" for p in fid["gold_distribution"]]]])
    if "tv_opinion_rows" in fid:
        out += ["", f"Per-row TV to the true opinion probabilities: {fmt(fid['tv_opinion_rows'])}."]
    return out


def _fidelity_section(r: dict) -> list[str]:
    fid = r["fidelity"]
    out = ["", "## Distribution fidelity (choice)", "",
           f"Per-row choice probabilities from k = {fid['samples_per_row']} samples, additive smoothing "
           f"alpha = {fid['smoothing_alpha']}; {fid['unparsed_sample_share']:.1%} of samples unparsed "
           "(left out of the counts).", ""]
    rows = [["TV, chosen-position histogram vs gold (unparsed = extra bin)", fmt(fid["tv_position_histogram"])],
            ["ECE of the top-choice probability", fmt(fid["ece"])]]
    if "tv_choice" in fid:
        rows += [["TV to true choice probs (mean over rows)", fmt(fid["tv_choice"])],
                 ["same estimator on k true samples (floor)", fmt(fid["tv_choice_sampling_floor"])]]
    rows += [[f"NLL of the human choice: {name}", fmt(est)] for name, est in fid["nll"].items()]
    out += _table(["measure", "value [95% CI]"], rows)
    out += ["", f"Position prior fitted on {fid['position_prior_fitted_on']}.", "",
            "Reliability bins:", ""]
    out += _table(["bin", "rows", "mean confidence", "accuracy"],
                  [[f"{b['lo']:.1f}-{b['hi']:.1f}", f"{b['count']:g}", f"{b['confidence']:.3f}",
                    f"{b['accuracy']:.3f}"] for b in fid["reliability"]])
    if fid["samples_per_row"] == 1:
        out += ["", "k = 1: each row's estimate rests on one sample, so confidence is the same on every "
                    "row of a slate size; sample k > 1 for meaningful fidelity and calibration."]
    return out


def describe_intervals(boot: dict | None) -> str:
    if boot is None:
        return "none (n_boot = 0)"
    return (f"{boot['confidence']:.0%} percentile bootstrap, {boot['n_boot']} replicates over "
            f"{boot['n_clusters']} {boot['unit']} clusters; {boot['note']}")


def render_markdown(r: dict, meta: dict[str, Any], images: list[Path]) -> str:
    lines = ["# Viewer evaluation", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [f"- rows: {r['n_rows']}, samples per row: {r['samples_per_row']}, synthetic: {r['synthetic']}",
              f"- intervals: {describe_intervals(r['bootstrap'])}", ""]
    lines += _choice_sections(r) + _opinion_sections(r) + _fidelity_section(r)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def summary_table(r: dict) -> str:
    """The short console table: headline choice metrics, then every baseline."""
    rows = [(CHOICE_LABELS.get(k, k), fmt(v)) for k, v in r["choice"].items()]
    rows += [(f"baseline: {name}", fmt(row["accuracy"])) for name, row in r["baselines"].items()]
    rows += [(f"opinion {k}", fmt(v)) for k, v in r["opinion"].items()]
    width = max(len(a) for a, _ in rows)
    head = f"{'metric':<{width}}  value [95% CI]   ({r['n_rows']} rows, k={r['samples_per_row']})"
    return "\n".join([head, "-" * len(head)] + [f"{a:<{width}}  {b}" for a, b in rows])


def write_report(results: dict, out_dir: str | Path, meta: dict[str, Any]) -> dict[str, Path]:
    """Write metrics.json, report.md and the PNGs into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = plots.write_plots(results, out)
    metrics_path = out / "metrics.json"
    metrics_path.write_text(json.dumps({"meta": meta, **to_jsonable(results)}, indent=2, allow_nan=False))
    report_path = out / "report.md"
    report_path.write_text(render_markdown(results, meta, images))
    return {"metrics": metrics_path, "report": report_path, **{p.stem: p for p in images}}
