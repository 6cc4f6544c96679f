"""Markdown + PNG report of one or more training runs from their metrics.jsonl:
reward and accuracy curves, final eval against baselines, runs side by side (e.g.
GRPO vs GRAIL) and where step time goes.

    python -m grailcore.run_report runs/grpo_gun runs/grail_gun --out reports/gun
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless machines; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from grailcore.metrics_log import METRICS_FILE, read_metrics  # noqa: E402

REPORT_FILE = "report.md"
TIME_PHASES = ("time/generation", "time/scoring", "time/training", "time/weight_sync")
"""Phases of a step in loop order; time/step minus their sum is shown as 'other'."""
_REWARD_STATS = ("/std", "/errors")
"""Suffixes of per-reward statistics that are not reward curves themselves."""


@dataclass(frozen=True)
class Run:
    name: str
    path: Path
    train: list[dict]
    """Records of optimizer steps (they carry reward/total), in step order."""
    evals: list[dict]
    """Records of evaluations (they carry eval/* keys), in step order."""
    config: dict
    """The run's config.yaml as a dict ({} when absent)."""

    @property
    def algorithm(self) -> str:
        gail = self.config.get("gail") or {}
        return "GRAIL" if gail.get("enabled") else ("GRPO" if self.config else "?")

    def keys(self, prefix: str) -> list[str]:
        return sorted({k for r in self.train + self.evals for k in r if k.startswith(prefix)})


def load_run(path: str | Path, name: str | None = None) -> Run:
    """A run dir's metrics (and config when present); FileNotFoundError without metrics.jsonl."""
    path = Path(path)
    if not (path / METRICS_FILE).exists():
        raise FileNotFoundError(f"{path}: no {METRICS_FILE}; pass a run_dir of grailcore.train")
    records = sorted(read_metrics(path), key=lambda r: r.get("step", 0))
    config_file = path / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else {}
    return Run(name=name or path.name, path=path,
               train=[r for r in records if "reward/total" in r],
               evals=[r for r in records if any(k.startswith("eval/") for k in r)],
               config=config)


def series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that carry a finite `key`."""
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def _smooth(values: np.ndarray) -> np.ndarray:
    """Trailing mean over ~5% of the curve, so a noisy reward shows its trend."""
    window = max(1, len(values) // 20)
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out[i] = (cumsum[i + 1] - cumsum[lo]) / (i + 1 - lo)
    return out


def _colors(runs: Sequence[Run]) -> dict[str, str]:
    return {run.name: f"C{i % 10}" for i, run in enumerate(runs)}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: Sequence[Run], keys: Sequence[str], path: Path, title: str, evals: bool = False) -> Path | None:
    """One panel per key, every run overlaid (raw thin, smoothed bold); None when no run has any key."""
    keys = [k for k in keys if any(len(series(r.evals if evals else r.train, k)[0]) for r in runs)]
    if not keys:
        return None
    colors = _colors(runs)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for run in runs:
            steps, values = series(run.evals if evals else run.train, key)
            if not len(steps):
                continue
            if evals or len(values) < 20:
                ax.plot(steps, values, marker="o" if evals else None, color=colors[run.name], label=run.name)
            else:
                ax.plot(steps, values, color=colors[run.name], alpha=0.25, linewidth=0.8)
                ax.plot(steps, _smooth(values), color=colors[run.name], label=run.name)
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return _save(fig, path)


def _last(records: list[dict], key: str) -> float | None:
    steps, values = series(records, key)
    return float(values[-1]) if len(values) else None


def _is_opinion_baseline(name: str) -> bool:
    # Opinion baselines (majority_opinion, always_no_change, opinion_bayes_optimal) compare
    # with eval/opinion_accuracy; the rest with eval/accuracy (next-video choice).
    return "opinion" in name or "no_change" in name


def baseline_table(runs: Sequence[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """{'choice'|'opinion': {label: {run name: final value}}} for each run's models and baselines."""
    table: dict[str, dict[str, dict[str, float]]] = {"choice": {}, "opinion": {}}
    for run in runs:
        for kind, model_key in (("choice", "eval/accuracy"), ("opinion", "eval/opinion_accuracy")):
            value = _last(run.evals, model_key)
            if value is not None:
                table[kind].setdefault("model", {})[run.name] = value
        for key in run.keys("eval/baseline/"):
            name = key[len("eval/baseline/"):]
            value = _last(run.evals, key)
            if value is not None:
                kind = "opinion" if _is_opinion_baseline(name) else "choice"
                table[kind].setdefault(name, {})[run.name] = value
    return {kind: rows for kind, rows in table.items() if rows}


def plot_baselines(runs: Sequence[Run], path: Path) -> Path | None:
    """Final eval accuracy of each run beside the baselines (grouped bars per label)."""
    table = baseline_table(runs)
    if not table:
        return None
    colors = _colors(runs)
    fig, axes = plt.subplots(1, len(table), figsize=(7 * len(table), 4), squeeze=False)
    for ax, (kind, rows) in zip(axes.flat, table.items()):
        labels = list(rows)
        width = 0.8 / len(runs)
        for i, run in enumerate(runs):
            values = [rows[label].get(run.name, np.nan) for label in labels]
            ax.bar(np.arange(len(labels)) + i * width, values, width, color=colors[run.name], label=run.name)
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=30, ha="right")
        ax.set(ylim=(0, 1), ylabel="accuracy", title=f"{kind}: final eval vs baselines")
        ax.legend(fontsize=8)
    return _save(fig, path)


def time_breakdown(run: Run) -> dict[str, float]:
    """Mean seconds per step of each phase, 'other' = time/step minus the phases ({} without timings)."""
    phases = [*TIME_PHASES, *(k for k in run.keys("time/") if k not in TIME_PHASES and k != "time/step")]
    out = {}
    for key in phases:
        _, values = series(run.train, key)
        if len(values):
            # A phase missing on some steps (weight sync every N) counts 0 there.
            out[key[len("time/"):]] = float(values.sum()) / max(len(run.train), 1)
    _, total = series(run.train, "time/step")
    if len(total):
        out["other"] = max(0.0, float(total.mean()) - sum(out.values()))
    return out


def plot_step_time(runs: Sequence[Run], path: Path) -> Path | None:
    """Stacked bar of mean seconds per step by phase, one bar per run."""
    breakdowns = {run.name: time_breakdown(run) for run in runs}
    phases = list(dict.fromkeys(p for b in breakdowns.values() for p in b))
    if not phases:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(runs) + 3), 4))
    bottom = np.zeros(len(runs))
    for i, phase in enumerate(phases):
        values = np.array([breakdowns[run.name].get(phase, 0.0) for run in runs])
        ax.bar([run.name for run in runs], values, bottom=bottom, label=phase,
               color="lightgray" if phase == "other" else f"C{i % 10}")
        bottom += values
    ax.set(ylabel="seconds per step (mean)", title="Step time breakdown")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    return _save(fig, path)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _runs_table(runs: Sequence[Run]) -> list[str]:
    lines = ["| run | algorithm | model | steps | final reward/total | final eval/accuracy | path |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        model = (run.config.get("model") or {}).get("name_or_path", "?")
        steps = run.train[-1]["step"] if run.train else 0
        lines.append(f"| {run.name} | {run.algorithm} | {model} | {steps} | "
                     f"{_fmt(_last(run.train, 'reward/total'))} | {_fmt(_last(run.evals, 'eval/accuracy'))} | "
                     f"`{run.path}` |")
    return lines


def _baseline_lines(runs: Sequence[Run]) -> list[str]:
    lines = []
    for kind, rows in baseline_table(runs).items():
        lines += [f"**{kind}** (last evaluation of each run)", "",
                  "| | " + " | ".join(run.name for run in runs) + " |", "|---" * (len(runs) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(_fmt(rows[label].get(run.name)) for run in runs) + " |"
                  for label in rows]
        lines.append("")
    return lines


def _time_lines(runs: Sequence[Run]) -> list[str]:
    breakdowns = {run.name: time_breakdown(run) for run in runs}
    phases = list(dict.fromkeys(p for b in breakdowns.values() for p in b))
    lines = ["| phase | " + " | ".join(run.name for run in runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for phase in phases:
        cells = []
        for run in runs:
            b = breakdowns[run.name]
            total = sum(b.values())
            cells.append(f"{b[phase]:.2f}s ({100 * b[phase] / total:.0f}%)" if phase in b and total else "—")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return lines


def write_report(runs: Sequence[Run], out_dir: str | Path) -> Path:
    """Figures and report.md in out_dir; sections without data say so instead of vanishing."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reward_keys = sorted({k for run in runs for k in run.keys("reward/")
                          if not k.endswith(_REWARD_STATS) and k != "reward/total_std"})
    source_keys = [k for k in reward_keys if k.startswith("reward/total/")]
    per_reward = [k for k in reward_keys if k not in source_keys and k != "reward/total"]
    eval_keys = [k for k in ("eval/accuracy", "eval/accuracy_sample_mean", "eval/parsed_rate",
                             "eval/opinion_accuracy", "eval/reward/total")
                 if any(k in r for run in runs for r in run.evals)]
    eval_keys += sorted({k for run in runs for k in run.keys("eval/accuracy/")})  # per mixture source
    sections = [
        ("Reward", plot_curves(runs, ["reward/total"], out / "reward_total.png", "reward/total"),
         "no run logged reward/total"),
        ("Reward by component (unweighted)", plot_curves(runs, per_reward, out / "reward_components.png",
                                                         "per-reward means"), "no per-reward metrics"),
        ("Reward by data source", plot_curves(runs, source_keys, out / "reward_by_source.png",
                                              "reward/total per source"), "no per-source rewards (no mixture)"),
        ("Evaluation", plot_curves(runs, eval_keys, out / "eval_curves.png", "evaluation", evals=True),
         "no evaluation records"),
        ("Final evaluation vs baselines", plot_baselines(runs, out / "eval_vs_baselines.png"),
         "no eval/accuracy or eval/baseline/* metrics"),
        ("Step time", plot_step_time(runs, out / "step_time.png"), "no time/* metrics"),
    ]
    lines = [f"# Training report: {', '.join(run.name for run in runs)}", "", *_runs_table(runs), ""]
    for title, figure, missing in sections:
        lines += [f"## {title}", ""]
        lines += [f"![{title}]({figure.name})" if figure else f"_Not shown: {missing}._", ""]
        if title == "Final evaluation vs baselines" and figure:
            lines += _baseline_lines(runs)
        if title == "Step time" and figure:
            lines += ["Mean seconds per step and share of the step:", "", *_time_lines(runs), ""]
    report = out / REPORT_FILE
    report.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({
        run.name: {"path": str(run.path), "algorithm": run.algorithm, "steps": len(run.train),
                   "final_reward": _last(run.train, "reward/total"),
                   "final_eval_accuracy": _last(run.evals, "eval/accuracy"),
                   "step_time": time_breakdown(run)} for run in runs}, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m grailcore.run_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="run_dir(s) holding metrics.jsonl")
    parser.add_argument("--out", required=True, help="directory for report.md and the PNGs")
    parser.add_argument("--names", nargs="+", help="labels of the runs (default: directory names)")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.run_dirs):
        parser.error(f"--names gives {len(args.names)} labels for {len(args.run_dirs)} run dirs")
    names = args.names or _unique_names([Path(p) for p in args.run_dirs])
    if len(set(names)) != len(names):
        parser.error(f"--names must be distinct, got {names}")
    runs = [load_run(path, name) for path, name in zip(args.run_dirs, names)]
    report = write_report(runs, args.out)
    print(f"wrote {report}")
    return report


def _unique_names(paths: list[Path]) -> list[str]:
    """Directory names, or parent/name where two runs share a name."""
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


if __name__ == "__main__":
    main()
