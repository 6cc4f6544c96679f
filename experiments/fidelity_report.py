"""Results of experiments/fidelity_arms.py: read every evaluation's metrics.json, write
OUT/results.json and OUT/results.md (a table per temperature with 95% intervals, the
fidelity-vs-temperature plot, the commands, the machine, tokens trained per arm and a
verdict computed from the numbers, with paired differences between the arms it compares).
matplotlib for the plot; grailcore.evaluation.compare for the paired differences."""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Callable

# (column, header, path into metrics.json); each leaf is {value, lo, hi} or a number
COLUMNS = (
    ("acc", "accuracy (mean over k)", ("choice", "accuracy_sample_mean")),
    ("parsed", "parsed rate", ("choice", "parsed_rate")),
    ("nll", "NLL of human choice", ("fidelity", "nll", "model")),
    ("tv", "TV to true choice probs", ("fidelity", "tv_choice")),
    ("ece", "ECE", ("fidelity", "ece")),
    ("order_std", "accuracy std over orders", ("order_robustness", "accuracy_std")),
    ("recall_range", "position-recall range", ("order_robustness", "position_recall_range")),
    ("pop_tv", "population choice TV", ("population", "choice", "overall", "tv")),
    ("op_acc", "opinion accuracy", ("opinion", "accuracy")),
    ("op_tv", "opinion TV to true probs", ("opinion_fidelity", "tv_opinion_rows")),
)
TIE = 5e-4
"""Differences below this are reported as ties (the tables print 3 decimals)."""
REFERENCES = {"tv_floor": ("fidelity", "tv_choice_sampling_floor"), "nll_uniform": ("fidelity", "nll", "uniform"),
              "nll_true": ("fidelity", "nll", "true"), "bayes_accuracy": ("baselines", "bayes_optimal", "accuracy"),
              "random_accuracy": ("baselines", "random", "accuracy")}


def leaf(metrics: dict, path: tuple[str, ...]) -> dict | None:
    """{value, lo, hi} (None where missing or null); a bare number gets lo = hi = None."""
    node = metrics
    for key in path:
        if not isinstance(node, dict) or node.get(key) is None:
            return None
        node = node[key]
    if isinstance(node, (int, float)):
        return {"value": float(node), "lo": None, "hi": None}
    return node if isinstance(node, dict) and node.get("value") is not None else None


def cell(est: dict | None) -> str:
    if est is None:
        return "-"
    if est.get("lo") is None:
        return f"{est['value']:.3f}"
    return f"{est['value']:.3f} [{est['lo']:.3f}, {est['hi']:.3f}]"


def arm_of(label: str) -> str:
    return label.split("/")[0]


def collect(labels: list[str], temperatures: list[float], eval_dir: Callable[[str, float], Path]) -> dict:
    """{T: {label: {column: estimate}}} and the reference values of the first evaluation."""
    table: dict[str, dict] = {}
    references: dict = {}
    for t in temperatures:
        table[f"{t:g}"] = {}
        for label in labels:
            metrics = json.loads((eval_dir(label, t) / "metrics.json").read_text())
            table[f"{t:g}"][label] = {key: leaf(metrics, path) for key, _, path in COLUMNS}
            references = references or {**{k: leaf(metrics, p) for k, p in REFERENCES.items()},
                                        "rows": metrics["n_rows"], "bootstrap": metrics.get("bootstrap"),
                                        "samples_per_row": metrics["samples_per_row"],
                                        "estimator": metrics["fidelity"].get("estimator", "histogram_fallback")}
    return {"table": table, "references": references}


def best_temperatures(table: dict, metric: str) -> dict[str, tuple[str, float]]:
    """Per arm: the temperature with the lowest seed-mean `metric`, and that mean."""
    means: dict[str, dict[str, list[float]]] = {}
    for t, rows in table.items():
        for label, row in rows.items():
            if row[metric] is not None:
                means.setdefault(arm_of(label), {}).setdefault(t, []).append(row[metric]["value"])
    return {arm: min(((t, sum(v) / len(v)) for t, v in per_t.items()), key=lambda x: x[1])
            for arm, per_t in means.items()}


def overlap(a: dict | None, b: dict | None) -> bool | None:
    if a is None or b is None or a.get("lo") is None or b.get("lo") is None:
        return None
    return a["lo"] <= b["hi"] and b["lo"] <= a["hi"]


def intervals_overlap(table: dict, arm_a: str, t_a: str, arm_b: str, t_b: str, metric: str) -> bool | None:
    """Whether the 95% intervals of two arms overlap (any seed pair when there are several)."""
    pairs = [overlap(ra[metric], rb[metric]) for la, ra in table[t_a].items() if arm_of(la) == arm_a
             for lb, rb in table[t_b].items() if arm_of(lb) == arm_b]
    known = [p for p in pairs if p is not None]
    return any(known) if known else None


Paired = Callable[[str, str, str, str], dict]
"""(label A, T of A, label B, T of B) -> {metric: Estimate of mean(A - B) over the same rows}."""


def _first_label(rows: dict, arm: str) -> str:
    return next(label for label in rows if arm_of(label) == arm)


def _difference_words(table: dict, arm_a: str, t_a: str, arm_b: str, t_b: str, metric: str,
                      paired: Paired | None) -> str:
    """The paired difference A - B with its interval when the completions are at hand, else
    whether the two per-model intervals overlap."""
    if paired is None:
        return _overlap_words(intervals_overlap(table, arm_a, t_a, arm_b, t_b, metric))
    label_a, label_b = _first_label(table[t_a], arm_a), _first_label(table[t_b], arm_b)
    d = paired(label_a, t_a, label_b, t_b)[metric]
    if d.lo != d.lo:  # nan: no bootstrap
        return f"paired difference {label_a} - {label_b} {d.value:+.3f} (no interval: n_boot = 0)"
    separated = d.hi < 0 or d.lo > 0
    return (f"paired difference {label_a} - {label_b} on the same rows {d.value:+.3f} "
            f"[{d.lo:+.3f}, {d.hi:+.3f}] (bootstrap over viewers): "
            + ("the interval excludes 0" if separated else "the interval includes 0, so these rows do not separate them"))


def _overlap_words(flag: bool | None) -> str:
    return {True: "their 95% intervals overlap, so these rows do not separate them",
            False: "their 95% intervals do not overlap",
            None: "no intervals were computed (n_boot = 0)"}[flag]


def _ranking(table: dict, metric: str, name: str, paired: Paired | None = None) -> list[str]:
    """Which arm is lowest on `metric` at its own best temperature, by how much, and GRAIL
    against temperature-tuned SFT."""
    best = best_temperatures(table, metric)
    if len(best) < 2:
        return []
    ranked = sorted(best.items(), key=lambda kv: kv[1][1])
    (win, (t_win, v_win)), (second, (t_2, v_2)) = ranked[0], ranked[1]
    tied = [arm for arm, (_, v) in ranked if v - v_win < TIE]
    lead = (f"**{win}** ({v_win:.3f} at T={t_win}), ahead of {second} ({v_2:.3f} at T={t_2}) by {v_2 - v_win:.3f}"
            if len(tied) == 1 else f"a tie between {', '.join(tied)} ({v_win:.3f})")
    lines = [f"Lowest {name} at each arm's best temperature: {lead}; "
             f"{_difference_words(table, win, t_win, second, t_2, metric, paired)}. "
             "All: " + ", ".join(f"{a} {v:.3f} (T={t})" for a, (t, v) in ranked) + "."]
    if "grail" in best and "sft" in best:
        (tg, vg), (ts, vs) = best["grail"], best["sft"]
        outcome = ("is lower" if vs - vg >= TIE else "ties with (so does not beat) temperature-tuned SFT" if abs(vg - vs) < TIE
                   else "**does not beat** temperature-tuned SFT")
        lines.append(f"GRAIL vs temperature-tuned SFT on {name}: GRAIL {vg:.3f} (T={tg}) vs SFT {vs:.3f} (T={ts}): "
                     f"GRAIL {outcome} (difference {vg - vs:+.3f}); "
                     f"{_difference_words(table, 'grail', tg, 'sft', ts, metric, paired)}.")
    return lines


def _gap_closed(table: dict, floor: dict | None) -> str | None:
    """How much of the warm start's TV above the sampling floor each arm removes."""
    best = best_temperatures(table, "tv")
    if "start" not in best or floor is None or best["start"][1] - floor["value"] <= 0:
        return None
    excess = best["start"][1] - floor["value"]
    parts = [f"{arm} {(excess - (v - floor['value'])) / excess:+.0%}" for arm, (_, v) in best.items() if arm != "start"]
    return ("Share of the warm start's TV above the sampling floor that each arm removes (each at its best "
            "temperature; negative = further from the humans): " + ", ".join(parts) + ".")


def _parse_warnings(table: dict, estimator: str) -> list[str]:
    """Choice distributions of rarely parsed samples are mostly the smoothing prior (histogram)
    or read at forced slots (exact)."""
    out = []
    for arm, (t, _) in best_temperatures(table, "tv").items():
        rates = [row["parsed"]["value"] for label, row in table[t].items() if arm_of(label) == arm and row["parsed"]]
        if rates and min(rates) < 0.5:
            out.append(f"{arm} parses only {min(rates):.0%} of its samples at T={t}: " + (
                "its choice distribution is mostly the smoothing prior, so its TV/NLL say little about its "
                "simulation." if estimator == "histogram_fallback" else
                "most of its answer slots are forced (read after appending `</think><answer>`), so its TV/NLL "
                "describe what it would answer if made to, more than what it writes."))
    return out


def verdict(table: dict, references: dict, matched: str, paired: Paired | None = None) -> list[str]:
    """Plain sentences computed from `table` (and the paired differences); nothing here is fixed in advance."""
    lines = _ranking(table, "tv", "TV to the true choice probabilities", paired)
    lines += _ranking(table, "nll", "NLL of the human's choice", paired)
    floor, uniform, true = (references.get(k) for k in ("tv_floor", "nll_uniform", "nll_true"))
    gap = _gap_closed(table, floor)
    lines += [gap] if gap else []
    if uniform and true:
        floor_words = (f"with k={references['samples_per_row']} samples a row, even the true model's TV would be "
                       f"about {floor['value']:.3f} (the histogram's sampling floor); " if floor else
                       f"choice distributions by {references.get('estimator')} (no sampling floor: a model answering "
                       "from the truth scores TV 0); ")
        lines.append(f"For scale: {floor_words}NLL is {uniform['value']:.3f} for a "
                     f"uniform guess and {true['value']:.3f} for the true probabilities.")
    acc = {label: row["acc"] for label, row in table.get(matched, {}).items() if row["acc"] is not None}
    if acc:
        top = max(acc, key=lambda k: acc[k]["value"])
        bayes = references.get("bayes_accuracy")
        lines.append(f"Next-video accuracy at the matched temperature T={matched}: highest {top} "
                     f"{cell(acc[top])}" + (f" (Bayes-optimal {bayes['value']:.3f})" if bayes else "") + ".")
    lines += _parse_warnings(table, references.get("estimator", "histogram_fallback"))
    lines.append("Caveat: each arm's best temperature is picked on the same rows it is reported on, which "
                 "flatters every arm alike; the tables' intervals are per model, the differences above "
                 + ("paired (one viewer bootstrap over the same rows, seed-0 models)." if paired else
                    "compare per-model intervals (no completions were at hand for paired ones)."))
    return lines


def training_compute(run_dirs: dict[str, Path]) -> dict[str, dict]:
    """Steps, completion (target) tokens trained and learning rate of each arm, from its own run dir."""
    out = {}
    for label, run in run_dirs.items():
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        lr = re.search(r"^optim:\n  lr: (\S+)$", (run / "config.yaml").read_text(), re.MULTILINE)
        if arm_of(label) == "sft":
            steps = [r for r in records if "tokens/target" in r]
            row = {"completion_tokens": int(sum(r["tokens/target"] for r in steps)), "steps": len(steps)}
        else:
            summary = json.loads((run / "summary.json").read_text())
            row = {"completion_tokens": summary["completion_tokens"], "steps": summary["steps"]}
        out[label] = {**row, "lr": lr.group(1) if lr else "?"}
    return out


def plot(table: dict, references: dict, path: Path) -> Path | None:
    """TV, NLL and accuracy against temperature, one line per model (bars: 95% intervals)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted(table, key=float)
    labels = list(table[temps[0]])
    colours = {"start": "tab:gray", "sft": "tab:blue", "grpo": "tab:orange", "grail": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (metric, title) in zip(axes, (("tv", "TV to true choice probs (lower = more human)"),
                                          ("nll", "NLL of the human choice (lower is better)"),
                                          ("acc", "next-video accuracy (mean over k)"))):
        for n, label in enumerate(labels):
            pts = [(float(t) + 0.008 * (n - len(labels) / 2), table[t][label][metric]) for t in temps if table[t][label][metric] is not None]
            if not pts:
                continue
            xs, ests = [p[0] for p in pts], [p[1] for p in pts]
            ys = [e["value"] for e in ests]
            err = [[y - (e["lo"] if e["lo"] is not None else y) for y, e in zip(ys, ests)],
                   [(e["hi"] if e["hi"] is not None else y) - y for y, e in zip(ys, ests)]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label, color=colours.get(arm_of(label)),
                        alpha=0.9 if label.endswith("s0") or label == "start" else 0.5)
        for key, style in (("tv_floor", "sampling floor") if metric == "tv" else (None, None),
                           ("nll_uniform", "uniform") if metric == "nll" else (None, None),
                           ("nll_true", "true probs") if metric == "nll" else (None, None)):
            if key and references.get(key):
                ax.axhline(references[key]["value"], ls="--", color="black", lw=0.8)
                ax.annotate(style, (float(temps[0]), references[key]["value"]), fontsize=8)
        ax.set(title=title, xlabel="sampling temperature")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(args: argparse.Namespace, result: dict, image: Path | None) -> str:
    refs, info = result["references"], result["machine"]
    lines = ["# Fidelity of three training arms (issues #13, #7)", "",
             f"Warm start `{args.start}`; arms {', '.join(args.arms)}; seeds {args.seeds}; {args.steps} optimizer "
             f"steps each; GRPO/GRAIL {args.prompts_per_step} prompts x {args.group_size} completions a step, SFT "
             f"{args.prompts_per_step * args.group_size} human-choice targets a step.",
             f"Scored on {refs['rows']} `{args.split}` rows (viewers never trained on), k={refs['samples_per_row']} "
             f"samples a row, temperatures {', '.join(result['table'])}; {args.permutations} option permutations "
             f"at the matched T={args.matched_temperature:g}. Intervals: "
             + (f"{refs['bootstrap']['confidence']:.0%} bootstrap over {refs['bootstrap']['n_clusters']} "
                f"{refs['bootstrap']['unit']} clusters, {refs['bootstrap']['n_boot']} replicates."
                if refs.get("bootstrap") else "none (n_boot 0)."),
             "", "## Verdict", "", *[f"- {s}" for s in result["verdict"]], ""]
    ref_text = ", ".join(f"{k} {cell(v)}" for k, v in refs.items() if isinstance(v, dict) and "value" in v)
    for t, rows in result["table"].items():
        lines += [f"## T = {t}" + (" (matched)" if float(t) == args.matched_temperature else ""), "",
                  "| model | " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(cell(row[k]) for k, _, _ in COLUMNS) + " |" for label, row in rows.items()]
        lines.append("")
    lines += [f"References on these rows: {ref_text}.", "",
              "Order spread (accuracy std over the shown order + R permutations) exists only at the matched "
              "temperature; the position-recall range (max - min recall over shown positions) at every one.", ""]
    if image:
        lines += ["## Fidelity vs temperature", "", f"![fidelity vs temperature]({image.name})", ""]
    lines += ["## Compute per arm", "", "| arm | steps | completion tokens trained | lr | wall minutes |",
              "|---|---|---|---|---|"]
    minutes = {r["name"]: r.get("seconds") for r in result["runs"]}
    for label, c in result["compute"].items():
        wall = minutes.get(label)
        lines.append(f"| {label} | {c['steps']} | {c['completion_tokens']} | {c['lr']} | "
                     f"{f'{wall / 60:.1f}' if wall else 'earlier run'} |")
    lines += ["", "Each arm trains the same number of completions a step; SFT's are the short gold targets "
              "while GRPO/GRAIL sample up to rollout.max_completion_tokens, and SFT forwards P x G distinct prompts "
              "a step where GRPO/GRAIL forward P prompts once each (prefix sharing) plus generation. Each arm keeps "
              "its preset's learning rate (`--sft-lr` sets SFT's).", "",
              "## Commands", "", "```bash", ".venv/bin/python experiments/fidelity_arms.py " + shlex.join(result["argv"]), ""]
    lines += [r["command"] + ("   # reused: " + r["skipped"] if "skipped" in r else "") for r in result["runs"]]
    lines += ["```", "", "## Machine", ""] + [f"- {k}: {v}" for k, v in info.items()]
    return "\n".join(lines) + "\n"


def write_results(args: argparse.Namespace, out: Path, info: dict, runs: list[dict], argv: list[str],
                  eval_dir: Callable[[str, float], Path], labels: list[str], run_dirs: dict[str, Path]) -> dict:
    """Everything in OUT/results.json and OUT/results.md; prints the verdict."""
    collected = collect(labels, args.temperatures, eval_dir)
    matched = f"{args.matched_temperature:g}"

    def paired(label_a: str, t_a: str, label_b: str, t_b: str) -> dict:
        from grailcore.evaluation.compare import paired_differences

        dir_a, dir_b = eval_dir(label_a, float(t_a)), eval_dir(label_b, float(t_b))
        alpha = json.loads((dir_a / "metrics.json").read_text())["fidelity"].get("smoothing_alpha", 1.0)
        return paired_differences(dir_a / "completions.jsonl", dir_b / "completions.jsonl", alpha,
                                  n_boot=args.n_boot, seed=args.eval_seed)

    result = {"argv": argv, "options": vars(args), "machine": info, "runs": runs,
              "compute": training_compute(run_dirs), **collected,
              "verdict": verdict(collected["table"], collected["references"], matched, paired)}
    image = plot(result["table"], result["references"], out / "fidelity_vs_temperature.png")
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    (out / "results.md").write_text(_markdown(args, result, image))
    print("\n".join(["", "=== verdict ===", *result["verdict"], f"wrote {out / 'results.md'}, {out / 'results.json'}"]))
    return result
