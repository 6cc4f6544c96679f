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
    out += ["", f"Leak audit of these {r['data_audit']['n_rows']} rows as the model saw them "
                f"(`grailcore.data.audit`): {audit_line(r['data_audit'])}."]
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


def _order_section(r: dict) -> list[str]:
    block = r.get("order_robustness")
    if not block:
        return []
    out = ["", "## Order robustness", "",
           f"Every row scored in the shown order plus {block['n_permutations']} seeded permutations of its "
           "options (first sample). A model that reads the videos keeps its accuracy in every order and "
           "recalls the gold option equally at every position; a position-biased one does not."]
    if "note" in block:
        out += ["", block["note"] + "."]
    rows = [[f"accuracy across orders: {k.split('_')[1]}", fmt(block[k])]
            for k in ("accuracy_mean", "accuracy_std", "accuracy_min", "accuracy_max") if k in block]
    if "choice_consistency" in block:
        rows.append(["same video chosen in every order (share of rows)", fmt(block["choice_consistency"])])
    rows += [[f"recall at shown position {p} (gold there, answered right)", fmt(e)]
             for p, e in block["position_recall"].items()]
    rows += [["per-position recall spread: std", fmt(block["position_recall_std"])],
             ["per-position recall spread: max - min", fmt(block["position_recall_range"])],
             ["TV, chosen vs gold position distribution (all orders)", fmt(block["tv_chosen_vs_gold_position"])]]
    out += [""] + _table(["measure", "value [95% CI]"], rows)
    width = len(block["gold_position_distribution"])
    out += [""] + _table(["", *[str(p) for p in range(1, width)], "unparsed"],
                         [["chosen", *[f"{x:.3f}" for x in block["chosen_position_distribution"]]],
                          ["gold", *[f"{x:.3f}" for x in block["gold_position_distribution"]]]])
    return out


def _distance_rows(name: str, groups: dict, key=lambda v: v) -> list[list[str]]:
    rows = []
    for group, table in groups.items():
        if "unavailable" in table:
            rows.append([f"{name}: {group}", "-", table["unavailable"], ""])
            continue
        for label, value in table.items():
            v = key(value)
            rows.append([f"{name}: {group} = {label}", str(v["n_rows"]), fmt(v["tv"]), fmt(v["w1"])])
    return rows


def _population_section(r: dict) -> list[str]:
    block = r.get("population")
    if not block:
        return []
    choice = block["choice"]
    out = ["", "## Population fidelity", "",
           f"Aggregate choice shares over the {choice['category_note']}; categories "
           f"{', '.join(choice['labels'])}. TV counts the unparsed bin; W1 treats the categories as ordered, "
           "one unit apart, on the parsed mass.", ""]
    out += _table(["", *choice["labels"]], [["model", *[f"{x:.3f}" for x in choice["overall"]["model_shares"]]],
                                            ["human", *[f"{x:.3f}" for x in choice["overall"]["human_shares"]]]])
    rows = [["choice: all rows", str(choice["overall"]["n_rows"]), fmt(choice["overall"]["tv"]),
             fmt(choice["overall"]["w1"])]]
    rows += _distance_rows("choice", choice["groups"])
    out += [""] + _table(["group", "rows", "TV [95% CI]", "W1 [95% CI]"], rows)
    opinion = block["opinion"]
    if not opinion:
        return out + ["", "No gold opinion directions: opinion-change population fidelity not computed."]
    out += ["", f"Opinion-change shares ({', '.join(opinion['labels'])}); the pre-attitude predictor is the "
                f"majority direction per initial viewpoint, fitted on {opinion['pre_attitude_fitted_on']}.", ""]
    rows = [[f"opinion ({name}): all rows", str(v["n_rows"]), fmt(v["tv"]), fmt(v["w1"])]
            for name, v in opinion["overall"].items()]
    for name in opinion["overall"]:
        rows += _distance_rows(f"opinion ({name})", opinion["groups"], key=lambda v, name=name: v[name])
    return out + _table(["group", "rows", "TV [95% CI]", "W1 [95% CI]"], rows)


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
    lines += _order_section(r) + _population_section(r)
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def audit_line(audit: dict) -> str:
    """'OK' or 'LEAK: all: always_last accuracy 1.000 vs random 0.250 (...); ...'."""
    reasons = audit["rules_over_threshold"]
    return audit["verdict"] + (": " + "; ".join(reasons) if reasons else "")


def summary_table(r: dict) -> str:
    """The short console table: headline choice metrics, the leak audit of the rows, then every baseline."""
    rows = [(CHOICE_LABELS.get(k, k), fmt(v)) for k, v in r["choice"].items()]
    rows.append(("leak audit of these rows", audit_line(r["data_audit"])))
    order = r.get("order_robustness") or {}
    rows += [(f"order robustness: accuracy {k.split('_')[1]}", fmt(order[k]))
             for k in ("accuracy_mean", "accuracy_std", "accuracy_min", "accuracy_max") if k in order]
    if "position_recall_range" in order:
        rows.append(("per-position recall spread (max - min)", fmt(order["position_recall_range"])))
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
