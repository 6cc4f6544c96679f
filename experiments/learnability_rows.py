"""The rows of experiments/learnability.py (issue #21, item 4): the synthetic study's decisions
rendered as grailcore renders them (or a compact variant), with the latent variables the known
choice model uses; the per-row scores; and the references every model is compared with
(uniform, rules, Bayes-optimal, what a reader of the prompt text can know)."""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass
from itertools import permutations

import numpy as np

from grailcore.data.prompt import build_example
from grailcore.data.schema import Decision, Example
from grailcore.data.synth import INTEREST_LEVELS, ChoiceModel, StudyParams, generate_study, split_by_viewer


# ----------------------------------------------------------------------------- prompts and rows

DIRECT_SYSTEM_PROMPT = (
    "You simulate a survey participant on a YouTube-like platform. From the viewer's profile, "
    "what they are watching now, what they watched before and the recommended options, predict "
    "which option they will watch next. Answer with the option number only, in this format:\n"
    "<answer>k</answer>"
)


@dataclass(frozen=True)
class Row:
    """One decision as the model sees it (options in the SHOWN order) and its known latents."""

    example: Example
    split: str
    gold: int  # 0-based shown position of the person's choice
    true_probs: np.ndarray  # [n] the known choice model's probabilities, shown order
    stance: np.ndarray  # [n] latent stance of each shown option in [-1, 1]
    log_views: np.ndarray  # [n] log10(views)
    lean: float  # 2 * attitude - 1 at the decision (the choice model's lean)
    interest: int  # index into INTEREST_LEVELS
    current_stance: float  # stance of the video being watched

    @property
    def n_options(self) -> int:
        return len(self.stance)

    @property
    def viewer_id(self) -> str:
        return self.example.viewer_id


COMPACT_SYSTEM_PROMPT = ("Predict which option the viewer watches next. Answer with the option number only, "
                         "in this format: <answer>k</answer>")


@dataclass(frozen=True)
class Variant:
    """A study (None = grailcore's default StudyParams) and a prompt layout: 'full' is
    grailcore's build_example; 'compact' keeps only what the choice model reads."""

    params: StudyParams | None
    layout: str
    note: str


SHARP = StudyParams(choice=dataclasses.replace(ChoiceModel(), temperature=0.5))


VARIANTS = {
    "default": Variant(None, "full", "grailcore's default study and prompt"),
    "compact": Variant(None, "compact", "the default study; a short prompt with only the viewer's politics, "
                                        "the current video and each option's title, channel and views"),
    "sharp": Variant(SHARP, "full", "the choice model at temperature 0.5 (sharper, still stochastic)"),
    "compact_sharp": Variant(SHARP, "compact", "both"),
    "compact_match": Variant(None, "compact_match",
                             "the default study; the compact prompt with each option's match to the viewer's "
                             "views (option stance x viewer lean, -1..1) written on its line"),
}


def compact_example(decision: Decision, example: Example, match: bool = False) -> Example:
    """`example` re-rendered short: party, ideology, interest and the stated support score; the
    current video; each option's title, channel and views (same shown order and gold); with
    `match`, also each option's stance x the viewer's lean, the choice model's option-by-viewer
    term, which no layer of the model reads off an option's line in the default prompt."""
    viewer = decision.viewer
    score = next((value for label, value in decision.survey if "support score" in label), "unknown")
    state = (f"VIEWER {viewer.party}, {(viewer.ideology or 'unknown').lower()}, {viewer.political_interest}, "
             f"{decision.issue.replace('_', ' ')} support score {score}\n"
             f"WATCHING {decision.current.title} ({decision.current.channel})")
    lean = 2 * decision.opinion_before - 1
    options = tuple(f"{decision.slate[i].title} ({decision.slate[i].channel}) - {decision.slate[i].views:,} views"
                    + (f" - match with the viewer's views {decision.slate[i].stance * lean:+.2f}" if match else "")
                    for i in example.meta["shown_order"])
    lines = "\n".join(f"{k}. {text}" for k, text in enumerate(options, 1))
    prompt = f"{state}\n\nOPTIONS\n{lines}\n\nWhich option number will the viewer watch next?"
    return example.replace(messages=({"role": "system", "content": COMPACT_SYSTEM_PROMPT},
                                     {"role": "user", "content": prompt}),
                           option_texts=options, state_text=state)


def make_row(decision: Decision, split: str, seed: int, system_prompt: str, layout: str = "full") -> Row:
    """Render `decision` exactly as grailcore's synthetic loader does, with `system_prompt`
    (layout 'compact': see compact_example)."""
    example = build_example(decision, max_history=12, show_ids=False, shuffle_options=True, seed=seed,
                            system_prompt=system_prompt, source=f"synthetic:{decision.issue}")
    if layout.startswith("compact"):
        example = compact_example(decision, example, match=layout == "compact_match")
    order = example.meta["shown_order"]
    slate = [decision.slate[i] for i in order]
    return Row(
        example=example, split=split, gold=example.gold_index - 1,
        true_probs=np.asarray(example.true_choice_probs, dtype=np.float64),
        stance=np.array([v.stance for v in slate]), log_views=np.log10([v.views for v in slate]),
        lean=2 * decision.opinion_before - 1, interest=INTEREST_LEVELS.index(decision.viewer.political_interest),
        current_stance=decision.current.stance)


def study_rows(issue: str = "gun_control", n: int = 3000, seed: int = 0, variant: str = "default") -> dict[str, list[Row]]:
    """train / validation / test rows, split by viewer with the loader's seed (the default
    variant gives the rows of `load_examples('synthetic:<issue>', DataConfig(synthetic_n=n, seed=seed), split)`)."""
    chosen = VARIANTS[variant]
    splits = split_by_viewer(generate_study(issue, n, seed, chosen.params), seed)
    return {name: [make_row(d, name, seed, DIRECT_SYSTEM_PROMPT, chosen.layout) for d in rows]
            for name, rows in splits.items()}


def extraction_order(rows: list[Row], limit: int | None, seed: int) -> list[Row]:
    """Rows of one split in a seeded viewer-shuffled order (whole viewers together), cut to
    `limit` rows: any prefix is a viewer sample, so a capped run extends a smaller one."""
    viewers = sorted({r.viewer_id for r in rows})
    random.Random(f"learnability:{seed}").shuffle(viewers)
    rank = {v: i for i, v in enumerate(viewers)}
    ordered = sorted(rows, key=lambda r: (rank[r.viewer_id], r.example.example_id))
    return ordered if limit is None else ordered[:limit]


# ----------------------------------------------------------------------------- scores

def pad(values: list[np.ndarray], width: int = 5, fill: float = 0.0) -> np.ndarray:
    """Ragged per-row vectors -> [N, width]."""
    out = np.full((len(values), width), fill, dtype=np.float64)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out


def slate_scores(probs: np.ndarray, gold: np.ndarray, true: np.ndarray, n_options: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row scores of a predicted slate distribution ([N, W], 0 beyond each row's n):
    nll = -log p(person's choice); accuracy = the true probability of the predictor's top
    option (ties split evenly), i.e. its expected accuracy against people who choose by the
    truth; hit = 1 when the top option is the person's choice (ties split); tv = TV to the truth."""
    valid = np.arange(probs.shape[1])[None, :] < n_options[:, None]
    p = np.where(valid, probs, -np.inf)
    top = np.isclose(p, p.max(axis=1, keepdims=True), rtol=0, atol=1e-12) & valid
    share = top / top.sum(axis=1, keepdims=True)
    rows = np.arange(len(gold))
    return {
        "nll": -np.log(np.maximum(probs[rows, gold], 1e-300)),
        "accuracy": (share * true).sum(axis=1),
        "hit": share[rows, gold],
        "tv": 0.5 * np.abs(np.where(valid, probs - true, 0)).sum(axis=1),
    }


def summarize_scores(scores: dict[str, np.ndarray], plan, reference: dict[str, np.ndarray] | None = None) -> dict:
    """Mean and viewer-bootstrap interval of every score (and of the paired gap to `reference`)."""
    from grailcore.evaluation.bootstrap import mean_estimate

    out = {name: mean_estimate(values, plan).as_dict() for name, values in scores.items()}
    if reference is not None:
        for name in ("nll", "accuracy", "tv"):
            out[f"{name}_minus_bayes"] = mean_estimate(scores[name] - reference[name], plan).as_dict()
    return out


# ----------------------------------------------------------------------------- references

def uniform_probs(n_options: np.ndarray, width: int = 5) -> np.ndarray:
    return (np.arange(width)[None, :] < n_options[:, None]) / n_options[:, None]


def rule_probs(choice: np.ndarray, n_options: np.ndarray, width: int = 5) -> np.ndarray:
    """A deterministic rule as a (degenerate) distribution: all mass on its option."""
    out = np.zeros((len(choice), width))
    out[np.arange(len(choice)), choice] = 1.0
    return out


def most_viewed(rows: list[Row]) -> np.ndarray:
    return np.array([int(np.argmax(r.log_views)) for r in rows])


def viewer_side(row: Row) -> int:
    """+1 / -1 from the viewer's initial viewpoint as the prompt states it ('Supports ...' / 'Opposes ...')."""
    return -1 if row.example.meta["initial_viewpoint"].startswith("Opposes") else 1


def option_side(stance: np.ndarray) -> np.ndarray:
    """+1 / -1 / 0 (neutral) as the catalog draws it: neutral videos have |stance| < 0.15."""
    return np.where(np.abs(stance) < 0.15, 0, np.sign(stance)).astype(int)


def side_matches(rows: list[Row]) -> np.ndarray:
    """The most-viewed option on the viewer's side (their stated viewpoint), else the most viewed."""
    out = []
    for r in rows:
        match = option_side(r.stance) == viewer_side(r)
        views = np.where(match, r.log_views, -np.inf) if match.any() else r.log_views
        out.append(int(np.argmax(views)))
    return np.array(out)


_TIERS = ((0.0, 0.15), (0.15, 0.55), (0.55, 1.0))
"""|stance| ranges the catalog draws neutral / mild / strong videos from (uniformly)."""


def readable_probs(row: Row, params: StudyParams | None, samples: int = 64, seed: int = 0) -> np.ndarray:
    """[n] the best a reader of the prompt can do (approx.): the known choice model averaged
    over what the text hides, i.e. each video's stance within its side's tier (uniform), and
    the order the viewer saw (the prompt shuffles it, hiding the primacy term); lean, interest
    and views are taken as readable exactly."""
    model = (params or StudyParams()).choice
    rng = np.random.default_rng(seed)
    n = row.n_options

    def draw(stance: np.ndarray) -> np.ndarray:  # [samples, len(stance)]
        mag = np.abs(stance)
        tier = np.searchsorted([0.15, 0.55], mag, side="right")
        lo, hi = np.array([_TIERS[t][0] for t in tier]), np.array([_TIERS[t][1] for t in tier])
        u = rng.uniform(lo, hi, size=(samples, len(stance)))
        sign = np.where(tier == 0, rng.choice([-1.0, 1.0], size=(samples, len(stance))), np.sign(stance))
        return u * sign

    stance, current = draw(row.stance), draw(np.array([row.current_stance]))  # [S, n], [S, 1]
    scale = model.interest_scale[row.interest]
    base = (model.affinity * scale * stance * row.lean + model.popularity * row.log_views[None]
            + model.continuity * stance * current)  # [S, n]
    orders = np.array(list(permutations(range(n))))  # [P, n] original position of each shown option
    primacy = model.primacy * (1 - orders / (n - 1)) if n > 1 else np.full((1, 1), model.primacy)
    utility = base[:, None, :] + primacy[None]  # [S, P, n]
    utility = utility / model.temperature
    utility -= utility.max(axis=-1, keepdims=True)
    probs = np.exp(utility)
    return (probs / probs.sum(-1, keepdims=True)).mean(axis=(0, 1))


def oracle_features(row: Row) -> np.ndarray:
    """[n, 6] the choice model's own terms minus primacy, from the TRUE latents: stance x lean
    per interest level, log10 views, stance x current stance."""
    n = row.n_options
    affinity = np.zeros((n, len(INTEREST_LEVELS)))
    affinity[:, row.interest] = row.stance * row.lean
    return np.column_stack([affinity, row.log_views, row.stance * row.current_stance])


def tier_mean(stance: np.ndarray) -> np.ndarray:
    """E[stance | side, tier]: what a reader who knows each title's side and tier can say."""
    mids = np.array([0.0, 0.35, 0.775])  # midpoints of the neutral / mild / strong |stance| ranges
    return np.sign(stance) * mids[np.searchsorted([0.15, 0.55], np.abs(stance), side="right")]


_SUPPORT = re.compile(r"support score (?:is )?(\d+)%")


def stated_support(example: Example) -> float:
    """The viewer's pre-treatment support score (0-1) as the prompt's survey states it."""
    match = _SUPPORT.search(example.prompt)
    if match is None:
        raise ValueError(f"{example.example_id}: no 'support score is N%' in the prompt")
    return int(match.group(1)) / 100
