"""Results of experiments/learnability.py: every predictor scored on the same held-out rows
(viewer-bootstrap intervals, paired gaps to the Bayes-optimal model), per-epoch fine-tuning
curves, latent-variable probes, learning curves, plots and a verdict computed from the
numbers -> OUT/README.md, OUT/results.json, OUT/predictions_test.json."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from grailcore.evaluation.bootstrap import make_plan, statistic_estimate

import learnability as L
import learnability_heads as H
import learnability_rows as R

N_BOOT = 1000
NEAR = 0.8
"""'Near Bayes' = at least this share of the uniform -> Bayes NLL gap closed."""
PARTLY = 0.3


def cell(est: dict | None, digits: int = 3, signed: bool = False) -> str:
    if est is None:
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if est.get("lo") is None or np.isnan(est["lo"]):
        return fmt.format(est["value"])
    return f"{fmt.format(est['value'])} [{fmt.format(est['lo'])}, {fmt.format(est['hi'])}]"


def gap_closed(scores: dict[str, np.ndarray], uniform: dict[str, np.ndarray], bayes: dict[str, np.ndarray], plan) -> dict:
    """Share of the uniform -> Bayes NLL gap a predictor closes (ratio of weighted means, bootstrapped)."""
    def stat(w: np.ndarray) -> float:
        u, b, m = (float(w @ s["nll"]) for s in (uniform, bayes, scores))
        return (u - m) / (u - b)

    return statistic_estimate(stat, len(scores["nll"]), plan).as_dict()


def zero_shot(c: H.Cached) -> tuple[np.ndarray, np.ndarray]:
    """Untrained model, full fp32 forward: [N, 5] slate distribution and [N] off-slate mass."""
    probs, off = [], []
    for item, row in zip(c.items, c.rows):
        on = item["digit_logp"][: row.n_options].double()
        probs.append((on - torch.logsumexp(on, 0)).exp().numpy())
        off.append(float(1 - on.exp().sum()))
    return R.pad(probs), np.array(off)


def finetune_histories(run: Path) -> dict[str, list[dict]]:
    out = {}
    for state in sorted((run / "ft").glob("*/state.pt")):
        out[state.parent.name] = torch.load(state, weights_only=False)["history"]
    return out


def select_epoch(history: list[dict], val: H.Cached) -> dict:
    """The epoch with the lowest validation NLL (epoch 0 = untrained, through the bf16 cache)."""
    return min(history, key=lambda e: H.mean_nll(e["splits"]["validation"]["probs"], val))


def predictors(run: Path, rows: dict, val: H.Cached, test: H.Cached, params) -> tuple[dict, dict, dict]:
    """name -> test probs; name -> test off-slate mass; notes (selections) for the README."""
    probe = torch.load(run / "probe.pt", weights_only=False)
    readable = R.pad([R.readable_probs(r, params) for r in test.rows])
    zs_probs, zs_off = zero_shot(test)
    preds = {
        "uniform": R.uniform_probs(test.n_options),
        "rule: most viewed": R.rule_probs(R.most_viewed(test.rows), test.n_options),
        "rule: most viewed on the viewer's side": R.rule_probs(R.side_matches(test.rows), test.n_options),
        "oracle-feature logit (true latents, fitted)": probe["oracle_logit"]["probs"]["test"],
        "text-readable Bayes (approx.)": readable,
        "Bayes-optimal (true probs)": test.true,
        "zero-shot": zs_probs,
        f"probe, selected ({probe['best']['spec']})": probe["best"]["probs"]["test"],
    }
    for layer, fit in probe["best_per_layer"].items():
        preds[f"probe, layer {layer} ({fit['spec']})"] = fit["probs"]["test"]
    layer, fit = min(probe["structured"].items(), key=lambda kv: kv[1]["val_nll"])
    preds[f"latent-supervised probe, layer {layer} (val-selected)"] = fit["probs"]["test"]
    off = {"zero-shot": zs_off}
    notes = {"probe": probe, "readable": readable, "finetune": {}}
    for name, history in finetune_histories(run).items():
        chosen = select_epoch(history, val)
        label = f"fine-tuned {name}, epoch {chosen['epoch']} (val-selected)"
        preds[label] = chosen["splits"]["test"]["probs"]
        off[label] = chosen["splits"]["test"]["off_slate"]
        notes["finetune"][name] = {"history": history, "chosen": chosen["epoch"]}
    return preds, off, notes


RULES = ("rule: most viewed", "rule: most viewed on the viewer's side")


def score_table(preds: dict, off: dict, test: H.Cached, plan) -> dict:
    bayes = R.slate_scores(test.true, test.gold, test.true, test.n_options)
    uniform = R.slate_scores(preds["uniform"], test.gold, test.true, test.n_options)
    table = {}
    for name, probs in preds.items():
        scores = R.slate_scores(probs, test.gold, test.true, test.n_options)
        if name in RULES:  # a deterministic rule has no likelihood: accuracy only
            scores = {"accuracy": scores["accuracy"], "hit": scores["hit"]}
            table[name] = R.summarize_scores(scores, plan)
            continue
        table[name] = R.summarize_scores(scores, plan, bayes)
        table[name]["gap_closed"] = gap_closed(scores, uniform, bayes, plan)
        if name in off:
            table[name]["off_slate"] = R.summarize_scores({"off": off[name]}, plan)["off"]
    return table


def epoch_table(notes: dict, val: H.Cached, test: H.Cached) -> dict[str, list[dict]]:
    out = {}
    for name, info in notes["finetune"].items():
        out[name] = []
        for entry in info["history"]:
            row = {"epoch": entry["epoch"], "train_loss": entry["train_loss"], "seconds": entry["seconds"]}
            for split, c in (("validation", val), ("test", test)):
                got = entry["splits"][split]
                scores = R.slate_scores(got["probs"], c.gold, c.true, c.n_options)
                row[split] = {k: float(v.mean()) for k, v in scores.items()} | {"off_slate": float(got["off_slate"].mean())}
            out[name].append(row)
    return out


def plot_nll(table: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [n for n in table if "nll" in table[n]]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(names) + 1.2))
    for i, name in enumerate(names):
        e = table[name]["nll"]
        ax.errorbar(e["value"], i, xerr=[[e["value"] - e["lo"]], [e["hi"] - e["value"]]], fmt="o", color="C0")
    for ref, color in (("uniform", "grey"), ("Bayes-optimal (true probs)", "C2")):
        ax.axvline(table[ref]["nll"]["value"], color=color, ls="--", lw=1, label=ref)
    ax.set_yticks(range(len(names)), [n if len(n) < 60 else n[:57] + "..." for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("held-out NLL of the person's choice (test rows; 95% viewer bootstrap)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_epochs(epochs: dict, table: dict, path: Path) -> Path | None:
    if not epochs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for j, (name, rows) in enumerate(epochs.items()):
        x = [r["epoch"] for r in rows]
        for ax, metric in zip(axes, ("nll", "accuracy")):
            ax.plot(x, [r["test"][metric] for r in rows], "-o", color=f"C{j}", label=f"{name} test", ms=3)
            ax.plot(x, [r["validation"][metric] for r in rows], ":", color=f"C{j}", label=f"{name} validation")
    refs = {"uniform": "grey", "Bayes-optimal (true probs)": "C2", "text-readable Bayes (approx.)": "olive"}
    probe = next(n for n in table if n.startswith("probe, selected"))
    for ax, metric in zip(axes, ("nll", "accuracy")):
        for ref, color in refs.items():
            ax.axhline(table[ref][metric]["value"], color=color, ls="--", lw=1, label=f"{ref} (test)")
        ax.axhline(table[probe][metric]["value"], color="k", ls="-.", lw=1, label="probe, selected (test)")
        ax.set_xlabel("epoch (0 = untrained)")
        ax.set_ylabel({"nll": "NLL of the person's choice", "accuracy": "expected accuracy"}[metric])
    axes[1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latents(latent: dict, ceilings: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ceilings)
    layers = list(latent)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(layers)
    for j, layer in enumerate(layers):
        ax.bar(np.arange(len(names)) + j * width, [max(latent[layer][n]["test_r2"], -0.1) for n in names], width,
               label=f"layer {layer}")
    ax.scatter(np.arange(len(names)) + 0.4 - width / 2, [ceilings[n] for n in names], marker="_", s=400, color="k",
               label="what the text reveals")
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, fontsize=8)
    ax.set_ylabel("test R^2 of a linear probe")
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "?")
    flags = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in lscpu)
    return f"{model} ({flags or 'no avx512_bf16/amx'})"


def write_report(run: Path, out: Path, rows: dict, args) -> dict:
    params = R.VARIANTS[args.variant].params
    val, test = H.load_cached(run, rows["validation"]), H.load_cached(run, rows["test"])
    plan = make_plan(test.viewer_ids, N_BOOT, seed=0)
    preds, off, notes = predictors(run, rows, val, test, params)
    table = score_table(preds, off, test, plan)
    epochs = epoch_table(notes, val, test)
    probe = notes["probe"]
    ceilings = H.readable_ceilings(test, notes["readable"])
    out.mkdir(parents=True, exist_ok=True)
    images = {"nll": plot_nll(table, out / "test_nll.png"), "epochs": plot_epochs(epochs, table, out / "finetune_epochs.png"),
              "latents": plot_latents(probe["latent"], ceilings, out / "latent_probes.png")}
    result = {
        "setup": setup(args, rows, probe, val, test, plan),
        "test": table,
        "finetune_epochs": epochs,
        "probe_selection_top": probe["selection"][:15],
        "probe_best_per_layer": {str(k): {"spec": v["spec"], "val_nll": v["val_nll"]} for k, v in probe["best_per_layer"].items()},
        "latent_probes": {str(k): v for k, v in probe["latent"].items()},
        "text_readable_r2": ceilings,
        "oracle_logit": {k: probe["oracle_logit"][k] for k in ("l2", "weights", "val_nll")},
        "learning_curve": probe["curve"],
    }
    result["verdict"] = verdict(result)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float))
    (out / "predictions_test.json").write_text(json.dumps({
        "row_ids": [r.example.example_id for r in test.rows], "viewer_ids": test.viewer_ids,
        "gold": test.gold.tolist(), "n_options": test.n_options.tolist(),
        "probs": {name: np.round(p, 6).tolist() for name, p in preds.items()}}))
    (out / "README.md").write_text(markdown(result, images, args, kept_conclusion(out / "README.md")))
    return result


def setup(args, rows: dict, probe: dict, val: H.Cached, test: H.Cached, plan) -> dict:
    tokens = [it["n_tokens"] for it in test.items]
    return {
        "model": args.model, "study": f"synthetic:{args.issue}", "variant": args.variant, "n": args.n, "seed": args.seed,
        "rows": {"train": probe["train_rows"], "validation": len(val.rows), "test": len(test.rows)},
        "rows_in_study": {k: len(v) for k, v in rows.items()},
        "prompt_tokens_test": {"mean": float(np.mean(tokens)), "min": int(min(tokens)), "max": int(max(tokens))},
        "bootstrap": plan.describe(), "cpu": machine(), "python": sys.version.split()[0], "torch": torch.__version__,
    }


def verdict(result: dict) -> list[str]:
    t = result["test"]
    probe = next(n for n in t if n.startswith("probe, selected"))
    tuned = [n for n in t if n.startswith("fine-tuned")]
    best_llm = min([probe, *tuned], key=lambda n: t[n]["nll"]["value"])
    share = t[best_llm]["gap_closed"]
    words = ("near Bayes" if share["lo"] >= NEAR else "partly learnable" if share["value"] >= PARTLY
             else "not near Bayes")
    lines = [
        f"Best predictor built on {result['setup']['model']} ({best_llm}): test NLL {cell(t[best_llm]['nll'])} against Bayes "
        f"{t['Bayes-optimal (true probs)']['nll']['value']:.3f} and uniform {t['uniform']['nll']['value']:.3f}; "
        f"gap to Bayes {cell(t[best_llm]['nll_minus_bayes'], signed=True)} (paired); it closes "
        f"{100 * share['value']:.0f}% [{100 * share['lo']:.0f}%, {100 * share['hi']:.0f}%] of the uniform -> Bayes gap: "
        f"**{words}** (near = interval's low end >= {100 * NEAR:.0f}%).",
        f"Zero-shot (direct answer, untrained): NLL {cell(t['zero-shot']['nll'])}, expected accuracy "
        f"{cell(t['zero-shot']['accuracy'])}, closes {100 * t['zero-shot']['gap_closed']['value']:.0f}% of the gap.",
    ]
    for name in tuned:
        lines.append(f"{name}: NLL {cell(t[name]['nll'])}, accuracy {cell(t[name]['accuracy'])}, TV {cell(t[name]['tv'])}, "
                     f"closes {100 * t[name]['gap_closed']['value']:.0f}% of the gap.")
    structured = next(n for n in t if n.startswith("latent-supervised probe"))
    lines.append(f"With each latent read out linearly and combined in the choice model's form ({structured}): NLL "
                 f"{cell(t[structured]['nll'])}, {100 * t[structured]['gap_closed']['value']:.0f}% of the gap; the "
                 f"probe trained on choices alone: {100 * t[probe]['gap_closed']['value']:.0f}%.")
    lines.append(diagnosis(result))
    oracle = "oracle-feature logit (true latents, fitted)"
    lines.append(f"For scale, a correctly specified 6-parameter model on the true latents fitted on the same "
                 f"{result['setup']['rows']['train']} training rows: NLL {cell(t[oracle]['nll'])} "
                 f"({100 * t[oracle]['gap_closed']['value']:.0f}% of the gap); the text-readable Bayes model "
                 f"{cell(t['text-readable Bayes (approx.)']['nll'])}.")
    return lines


DEFINITIONS = [
    "What the rows are:",
    "- *uniform*: 1/n on every option. *rules* (accuracy only, no likelihood): the most-viewed option; the most-viewed "
    "option on the viewer's side (side from the stated initial viewpoint, option side = sign of its stance, which the "
    "title template and channel reveal).",
    "- *Bayes-optimal*: the known choice model's probabilities (it also knows the exact stances and the order the "
    "viewer saw, which the shuffled prompt hides). *text-readable Bayes (approx.)*: the same model averaged over what "
    "the text hides (each stance within its side's tier, the viewer's original order); the realistic ceiling.",
    "- *oracle-feature logit*: the choice model's own terms from the TRUE latents, 6 weights fitted on the same "
    "training rows: the ceiling a correctly specified model reaches with this much data.",
    "- *zero-shot*: the untrained model's next-token distribution after `<answer>`, renormalised over the slate digits.",
    "- *probe*: a conditional-logit head on frozen hidden states (option-line features and option x state "
    "interactions, see the spec: layer/pooling/state position/principal components/interaction rank/l2), fitted on the "
    "training rows' choices, selected on validation NLL.",
    "- *latent-supervised probe*: linear read-outs of stance, views, lean, interest and the current video's stance "
    "(trained on their known values, cross-fitted), combined in the choice model's form by a 4-weight conditional "
    "logit: whether the information is in the features at all, given help that choices alone do not give.",
    "- *fine-tuned*: direct-answer SFT of the top k layers, epoch chosen on validation NLL.",
]


COMPOSITES = ("stance_x_lean", "true_utility")
"""Option-by-viewer quantities: read from option-line features alone they show whether the model
already combines the option with the viewer at the option's own tokens."""


def diagnosis(result: dict) -> str:
    """Which latent the features carry (best test R^2 over layers vs what the text reveals)."""
    latent, ceiling = result["latent_probes"], result["text_readable_r2"]
    parts, weak = {}, []
    for name, top in ceiling.items():
        layer, best = max(((k, v[name]["test_r2"]) for k, v in latent.items()), key=lambda kv: kv[1])
        parts[name] = f"{name} {best:.2f} (layer {layer}; text {top:.2f})"
        if best < 0.5 * top and name not in COMPOSITES:
            weak.append(name)
    single = "; ".join(v for k, v in parts.items() if k not in COMPOSITES)
    composite = "; ".join(v for k, v in parts.items() if k in COMPOSITES)
    missing = (f"Read poorly (below half of what the text reveals): {', '.join(weak)}." if weak
               else "Every single latent is read at least half as well as the text reveals it.")
    return (f"Linear read-out of each latent, best layer (test R^2): {single}. {missing} From the option's own "
            f"line alone, the option-by-viewer terms: {composite}.")


LAYOUTS = {
    "full": "grailcore's `build_example` (options shuffled, history 12) with a direct-answer system prompt",
    "compact": "`learnability_rows.compact_example` (viewer's party, ideology, interest and support score; the current "
               "video; each option's title, channel and views; options shuffled as grailcore shuffles them) with a "
               "one-line direct-answer system prompt",
    "compact_match": "the compact prompt with each option's match to the viewer's views (option stance x the "
                     "viewer's lean, -1..1, two decimals) at the end of its line",
}


CONCLUSION = ("<!-- conclusion -->", "<!-- /conclusion -->")
"""A hand-written block between these markers in an existing README.md (the comparison across
studies, which one run of this report cannot compute) is kept when the report is rewritten."""


def kept_conclusion(readme: Path) -> list[str]:
    text = readme.read_text() if readme.exists() else ""
    start, end = text.find(CONCLUSION[0]), text.find(CONCLUSION[1])
    return [text[start:end + len(CONCLUSION[1])], ""] if 0 <= start < end else []


def markdown(result: dict, images: dict, args, conclusion: list[str] = ()) -> str:
    s, t = result["setup"], result["test"]
    cmd = (f"python experiments/learnability.py all --run {args.run} --out {args.out}"
           + (f" --variant {args.variant}" if args.variant != "default" else "")
           + (f" --train-rows {args.train_rows}" if args.train_rows else "")
           + (f" --val-rows {args.val_rows}" if args.val_rows else "")
           + (f" --test-rows {args.test_rows}" if args.test_rows else "")
           + (f" --finetune {args.finetune}" if args.finetune else " --finetune ''"))
    lines = [
        f"# Learnability check: can `{s['model']}` learn the synthetic choice? (issue #21, item 4)", "",
        f"Study `{s['study']}` ({s['n']} decisions, seed {s['seed']}, variant `{s['variant']}`), split by viewer as "
        f"grailcore's loader does ({s['rows_in_study']}). Rows used: {s['rows']} (train and validation rows "
        f"are a seeded sample of whole viewers; the test rows are all of the test split). Variant: "
        f"{R.VARIANTS[s['variant']].note}. Prompts: {LAYOUTS[R.VARIANTS[s['variant']].layout]}, chat template, then "
        f"the assistant prefix `{L.ANSWER_PREFIX}`: the next token is the option digit; {s['prompt_tokens_test']['mean']:.0f} "
        f"tokens a row on average. Model `{s['model']}` in fp32 on {s['cpu']}.", "",
        *conclusion, "## Verdict", "", *[f"- {line}" for line in result["verdict"]], "",
        "## Held-out scores (test rows)", "",
        f"NLL of the person's choice; expected accuracy = the true probability of the predictor's top option (the "
        f"Bayes row is the expected argmax accuracy); TV to the true choice probabilities; gaps to Bayes paired on the "
        f"same rows. 95% intervals: {s['bootstrap']['n_boot']} bootstrap replicates over "
        f"{s['bootstrap']['n_clusters']} {s['bootstrap']['unit']}s.", "",
        "| predictor | NLL | NLL - Bayes | share of uniform->Bayes gap | expected accuracy | TV to truth | off-slate mass |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in t.items():
        lines.append(f"| {name} | {cell(row.get('nll'))} | {cell(row.get('nll_minus_bayes'), signed=True)} | "
                     f"{cell(row.get('gap_closed'), 2)} | {cell(row.get('accuracy'))} | {cell(row.get('tv'))} | "
                     f"{cell(row.get('off_slate'))} |")
    lines += ["", *DEFINITIONS]
    if images.get("nll"):
        lines += ["", f"![test NLL]({images['nll'].name})"]
    lines += ["", "## Fine-tuning per epoch", "",
              "Direct-answer SFT of the top k layers (+ final norm) on the person's answer digit, from the cached "
              "stream entering layer L-k (bf16; the frozen bottom is never re-run). Epoch 0 = untrained, evaluated "
              "through the same cache.", "",
              "| run | epoch | train loss | val NLL | test NLL | test accuracy | test TV | test off-slate | s/epoch |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, rows in result["finetune_epochs"].items():
        for r in rows:
            loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
            lines.append(f"| {name} | {r['epoch']} | {loss} | {r['validation']['nll']:.3f} | {r['test']['nll']:.3f} | "
                         f"{r['test']['accuracy']:.3f} | {r['test']['tv']:.3f} | {r['test']['off_slate']:.3f} | "
                         f"{r['seconds']:.0f} |")
    if images.get("epochs"):
        lines += ["", f"![fine-tuning curves]({images['epochs'].name})"]
    lines += ["", "## Where the signal is lost: linear probes of each latent variable", "",
              "Ridge probes (l2 and features chosen on validation) from option-line features (option latents) or "
              "state features (viewer latents); test R^2. 'text' = what the prompt text reveals (stance: only the "
              "side and tier through title template and channel; lean: the stated pre-treatment support score).", "",
              "| latent | " + " | ".join(f"layer {k}" for k in result["latent_probes"]) + " | text |",
              "|---|" + "---|" * (len(result["latent_probes"]) + 1)]
    for name, ceiling in result["text_readable_r2"].items():
        vals = " | ".join(f"{result['latent_probes'][k][name]['test_r2']:.3f}" for k in result["latent_probes"])
        lines.append(f"| {name} | {vals} | {ceiling:.3f} |")
    if images.get("latents"):
        lines += ["", f"![latent probes]({images['latents'].name})"]
    lines += ["", "## Learning curve (test NLL vs training rows)", "",
              "| train rows | probe (selected spec, l2 re-chosen) | oracle-feature logit |", "|---|---|---|"]
    for r in result["learning_curve"]:
        lines.append(f"| {r['train_rows']} | {r['probe_test_nll']:.3f} | {r['oracle_logit_test_nll']:.3f} |")
    lines += ["", "## Probe selection (validation NLL, best 15)", "", "| spec | val NLL |", "|---|---|"]
    lines += [f"| {r['spec']} | {r['val_nll']:.4f} |" for r in result["probe_selection_top"]]
    lines += ["", "## Reproduce", "", "```bash", "export PYTHONPATH=$PWD", cmd, "```", "",
              "Stages (`extract`, `probe`, `finetune`, `report`) can run one at a time; each caches under `--run` "
              "and resumes. Raw numbers: `results.json`; per-row test probabilities of every predictor: "
              "`predictions_test.json`.", ""]
    return "\n".join(lines)
