"""Synthetic viewer study with KNOWN choice and opinion models, shaped after the PNAS
YouTube study: so learning can be measured against the Bayes-optimal predictor.

CLI: python -m grailcore.data.synth --issue gun_control --n 5000 --out DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from grailcore.data.schema import (
    ISSUES, OPINION_DIRECTIONS, Decision, Video, Viewer, WatchedVideo, decision_to_dict, opinion_direction,
)

SPLITS = ("train", "validation", "test")
STUDY_NAMES = {"gun_control": "synthetic_study1", "minimum_wage": "synthetic_study2"}
INTEREST_LEVELS = ("very interested in politics", "somewhat interested in politics",
                   "not very interested in politics", "not at all interested in politics")


@dataclass(frozen=True)
class ChoiceModel:
    """Multinomial logit over the slate: P(k) = softmax(U / temperature), with
    U_k = affinity * interest_scale * stance_k * lean + popularity * log10(views_k)
          + primacy * (1 - position_k / (n - 1)) + continuity * stance_k * stance(current),
    where lean = 2 * attitude - 1 is the viewer's current issue attitude on [-1, 1]."""

    affinity: float = 3.0
    popularity: float = 0.45
    primacy: float = 0.3
    """Mild primacy bias: the first option shown gets +primacy, the last +0."""
    continuity: float = 0.8
    """People keep watching what resembles the current video."""
    temperature: float = 1.0
    interest_scale: tuple[float, ...] = (1.4, 1.1, 0.8, 0.5)
    """Affinity multiplier per INTEREST_LEVELS entry: the politically interested sort harder."""


@dataclass(frozen=True)
class OpinionModel:
    """Mostly no change; a small shift toward the watched video's side with probability
    toward_base + toward_per_stance * |stance|, away from it with probability `away`."""

    toward_base: float = 0.05
    toward_per_stance: float = 0.2
    away: float = 0.04
    tolerance: float = 0.02
    """|after - before| <= tolerance is no_change (one scale: the attitude index in [0, 1])."""
    max_extra_shift: float = 0.06
    """A change moves the attitude by tolerance + U(0.005, max_extra_shift)."""


@dataclass(frozen=True)
class StudyParams:
    n_videos: int = 320
    steps: tuple[int, int] = (2, 6)
    """Decisions per session, inclusive range."""
    slate_sizes: tuple[int, ...] = (3, 4, 5)
    slate_size_weights: tuple[float, ...] = (0.15, 0.7, 0.15)
    designs: tuple[str, ...] = ("balanced", "slanted", "rabbit_hole")
    design_weights: tuple[float, ...] = (0.4, 0.4, 0.2)
    choice: ChoiceModel = field(default_factory=ChoiceModel)
    opinion: OpinionModel = field(default_factory=OpinionModel)


# Title templates per issue: side (+1 pro-regulation / pro-increase, -1 against, 0 neutral)
# and tier ("mild" / "strong"); slots are filled from the issue's word lists.
_WORDS = {
    "gun_control": {
        "policy": "Universal Background Checks|an Assault Weapons Ban|Red Flag Laws|Stricter Gun Laws|"
                  "a Handgun Ban|Gun Licensing|Waiting Periods|Magazine Limits",
        "place": "Chicago|Texas|Florida|Australia|Virginia|California|Ohio|Colorado",
        "pro_voice": "Senator|Shooting Survivor|ER Doctor|Former Police Chief|Teacher|Mom",
        "anti_voice": "Sheriff|Gun Shop Owner|Navy SEAL|Hunter|Constitutional Lawyer|Range Officer",
        "topic": "Gun control|Gun laws|The gun debate",
        (1, "mild"): "Why America Needs {policy}|{pro_voice} Makes the Case for {policy}|"
                     "Most Americans Support {policy}. Why Doesn't Congress Act?|"
                     "What {place} Learned From {policy}|How {policy} Could Save Lives, Explained",
        (1, "strong"): "{pro_voice} SHUTS DOWN Gun Lobby Talking Points|The Gun Lobby Is Lying to You About {policy}|"
                       "Enough Is Enough: {pro_voice} Demands {policy} NOW|"
                       "Thoughts and Prayers Aren't Working - We Need {policy}",
        (-1, "mild"): "Why {policy} Won't Stop Criminals|{anti_voice} Explains What {policy} Would Really Do|"
                      "What the Data Says About Gun Crime in {place}|Would {policy} Actually Work? A Second Look|"
                      "{anti_voice} Answers Common Gun Control Arguments",
        (-1, "strong"): "{anti_voice} DESTROYS the Case for {policy}|They Want Your Guns: The Truth About {policy}|"
                        "Gun Control Advocates Say the Darndest Things|The Second Amendment Is Not Up for Debate|"
                        "Armed Citizen Stops Attacker in {place}",
        (0, "mild"): "{policy}: Both Sides of the Debate|Do We Need {policy}? Voters in {place} Weigh In|"
                     "{topic} in {place}, Explained|{pro_voice} and {anti_voice} Debate {policy}",
        "channels+": "Forward Nation News|The Justice Hour|Civic Pulse|Safe Streets Network|Progress Report Daily",
        "channels-": "Liberty Lens|Heartland Standard|Frontier Freedom TV|Patriot Range Talk|The Constitution Desk",
    },
    "minimum_wage": {
        "policy": "a $15 Minimum Wage|Raising the Minimum Wage|a Living Wage|a $20 Minimum Wage|"
                  "Indexing the Minimum Wage to Inflation|the Raise the Wage Act",
        "place": "Seattle|California|New York|Denmark|Florida|Arizona|Ohio|Texas",
        "pro_voice": "Economist|Fast Food Worker|Labor Organizer|Senator|Small Business Owner|Nurse",
        "anti_voice": "Economist|Restaurant Owner|Small Business Owner|Free-Market Professor|CEO|Franchise Owner",
        "topic": "The minimum wage|Wages|The wage debate",
        (1, "mild"): "Why We Need {policy}|{pro_voice} Makes the Case for {policy}|"
                     "{place}'s Minimum Wage Experiment Is Working|{policy} Won't Kill Jobs - Here's the Evidence|"
                     "What {policy} Would Mean for Working Families",
        (1, "strong"): "Nobody Can Live on $7.25: {pro_voice} Demands {policy}|"
                       "The 5 Biggest Myths About {policy}, Debunked|Corporate Greed Is Why We Need {policy}|"
                       "{pro_voice} SHUTS DOWN Minimum Wage Critics",
        (-1, "mild"): "What {policy} Would Do to Small Businesses|{anti_voice} on the Hidden Costs of {policy}|"
                      "What Happened to Jobs in {place} After the Wage Hike|Who Really Pays for {policy}?|"
                      "{anti_voice} Explains the Effects of the Minimum Wage",
        (-1, "strong"): "{policy} Will Destroy Jobs|{anti_voice} DESTROYS the Minimum Wage Argument|"
                        "Robots Will Replace Workers Thanks to {policy}|The Cruelty of {policy}",
        (0, "mild"): "{policy}: Both Sides of the Debate|Should We Raise the Minimum Wage? Voters in {place} Weigh In|"
                     "{topic} in {place}, Explained|{pro_voice} and {anti_voice} Debate {policy}",
        "channels+": "Working Families Channel|Forward Nation News|The Labor Beat|Main Street Progressive",
        "channels-": "Free Market Minute|Liberty Lens|The Enterprise Report|Prosperity Institute|Heartland Standard",
    },
}
_NEUTRAL_CHANNELS = "Policy Explained|The Daily Brief|Metro News 24|Open Forum".split("|")
_TITLE_SUFFIXES = ("", "", "", "", "", " | {channel}", " | {channel}", " (Full Segment)", " - Part 2")
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _title(rng: random.Random, words: dict, side: int, tier: str, channel: str) -> str:
    template = rng.choice(words[(side, tier if side else "mild")].split("|"))
    slots = {k: rng.choice(words[k].split("|")) for k in ("policy", "place", "pro_voice", "anti_voice", "topic")}
    text = template.format(**slots) + rng.choice(_TITLE_SUFFIXES).format(channel=channel)
    return text[0].upper() + text[1:]


def make_catalog(issue: str, rng: random.Random, n_videos: int) -> tuple[Video, ...]:
    """Videos with a latent stance in [-1, 1]; the title's template and the channel reveal its side and tier."""
    words, videos, titles = _WORDS[issue], [], set()
    while len(videos) < n_videos:
        side = rng.choices((1, -1, 0), weights=(0.44, 0.44, 0.12))[0]
        tier = "strong" if rng.random() < 0.4 else "mild"
        magnitude = rng.uniform(0.55, 1.0) if tier == "strong" else rng.uniform(0.15, 0.55)
        stance = side * magnitude if side else rng.uniform(-0.15, 0.15)
        own = words[f"channels{'+' if side > 0 else '-'}"].split("|") if side else _NEUTRAL_CHANNELS
        channel = rng.choice(_NEUTRAL_CHANNELS if side and tier == "mild" and rng.random() < 0.15 else own)
        title = _title(rng, words, side, tier, channel)
        if title in titles:  # every option of a slate must be distinguishable by its text
            continue
        titles.add(title)
        views = int(10 ** min(7.0, max(2.5, rng.gauss(4.8, 0.9))))
        videos.append(Video(
            video_id="".join(rng.choice(_ID_CHARS) for _ in range(11)), title=title, channel=channel,
            duration_s=float(int(min(1800, max(45, rng.lognormvariate(math.log(320), 0.5))))),
            views=views, likes=int(views * rng.uniform(0.005, 0.04)), comments=int(views * rng.uniform(0.0005, 0.004)),
            stance=round(stance, 3)))
    return tuple(videos)


def _pick(rng: random.Random, options: tuple, weights: tuple) -> str:
    return rng.choices(options, weights=weights)[0]


def make_viewer(issue: str, rng: random.Random, viewer_id: str) -> tuple[Viewer, float, list[tuple[str, str]]]:
    """A viewer, their pre-treatment issue attitude in [0, 1] (1 = pro-regulation / pro-increase), survey pairs."""
    party = _pick(rng, ("Democrat", "Republican", "Independent"), (0.42, 0.36, 0.22))
    lean = max(-1.0, min(1.0, rng.gauss({"Democrat": 0.5, "Republican": -0.5}.get(party, 0.0), 0.35)))
    attitude = round(max(0.0, min(1.0, 0.5 + 0.4 * lean + rng.gauss(0, 0.12))), 2)
    stated = lean + rng.gauss(0, 0.25)
    ideology = ("Haven't thought much about it" if rng.random() < 0.1 else "Very liberal" if stated > 0.7
                else "Liberal" if stated > 0.25 else "Moderate" if stated > -0.25
                else "Conservative" if stated > -0.7 else "Very conservative")
    viewer = Viewer(
        viewer_id=viewer_id, age=rng.randint(18, 79), gender=rng.choice(("man", "woman")),
        race=_pick(rng, ("Caucasian/White (non-Hispanic)", "Black or African-American (non-Hispanic)",
                         "Hispanic or Latino", "Asian or Asian-American", "Multiracial"), (0.62, 0.13, 0.14, 0.07, 0.04)),
        party=party, ideology=ideology,
        income=rng.choice(("$20,000-$24,999", "$30,000-$39,999", "$50,000-$59,999", "$70,000-$79,999",
                           "$100,000-$119,999", "$150,000 or more")),
        education=_pick(rng, ("college-educated", "some college", "high-school educated"), (0.4, 0.3, 0.3)),
        youtube_frequency=rng.choice(("daily", "several times a week", "a few times a month", "occasionally")),
        political_interest=_pick(rng, INTEREST_LEVELS, (0.25, 0.35, 0.25, 0.15)))
    survey = [("party identification", party)]
    if party != "Independent":
        survey.append(("party lean", f"{rng.choice(('Strong', 'Not very strong'))} {party}"))
    survey += [("ideology", ideology), ("political interest", viewer.political_interest),
               ("watches YouTube {}", viewer.youtube_frequency)]
    return viewer, attitude, survey + _issue_survey(issue, rng, attitude)


def _issue_survey(issue: str, rng: random.Random, attitude: float) -> list[tuple[str, str]]:
    strength = abs(attitude - 0.5) * 2 + rng.gauss(0, 0.2)
    importance = ("very important" if strength > 0.7 else "somewhat important" if strength > 0.4
                  else "not too important" if strength > 0.15 else "not at all important")
    score = f"{round(attitude * 100)}%"
    if issue == "gun_control":
        enthusiast = rng.random() < 0.7 * (1 - attitude)
        return [("gun policy importance", importance), ("gun regulation support score", score),
                ("{} as enthusiastic about guns", "identifies" if enthusiast else "does not identify")]
    target = min(("$7.25", "$10", "$12", "$15", "$20"), key=lambda t: abs(float(t[1:]) - (7 + 13 * attitude)))
    return [("minimum wage importance", importance), ("preferred minimum wage target", target),
            ("minimum wage support score", score)]


def initial_viewpoint(issue: str, attitude: float) -> str:
    if issue == "gun_control":
        return ("Supports a handgun ban" if attitude >= 0.8 else "Supports stricter gun laws" if attitude >= 0.5
                else "Opposes stricter gun laws")
    return "Supports a $15 minimum wage" if attitude >= 0.5 else "Opposes a $15 minimum wage"


def choice_probs(model: ChoiceModel, slate: tuple[Video, ...], attitude: float, interest: str,
                 current: Video) -> tuple[float, ...]:
    """The known choice model (see ChoiceModel) for the slate in the order the viewer saw it."""
    lean, n = 2 * attitude - 1, len(slate)
    scale = model.interest_scale[INTEREST_LEVELS.index(interest)]
    utilities = [
        model.affinity * scale * v.stance * lean + model.popularity * math.log10(v.views)
        + model.primacy * (1 - pos / (n - 1) if n > 1 else 1.0) + model.continuity * v.stance * current.stance
        for pos, v in enumerate(slate)
    ]
    top = max(utilities)
    weights = [math.exp((u - top) / model.temperature) for u in utilities]
    return tuple(w / sum(weights) for w in weights)


def opinion_probs_given(model: OpinionModel, stance: float, attitude: float) -> tuple[float, float, float]:
    """P(increase, decrease, no_change) after watching a video of `stance`; impossible moves go to no_change."""
    toward = model.toward_base + model.toward_per_stance * abs(stance)
    increase, decrease = (toward, model.away) if stance >= 0 else (model.away, toward)
    min_shift = model.tolerance + 0.005
    increase = increase if attitude + min_shift <= 1 else 0.0
    decrease = decrease if attitude - min_shift >= 0 else 0.0
    return increase, decrease, 1 - increase - decrease


def _shift(rng: random.Random, model: OpinionModel, attitude: float, direction: str) -> float:
    if direction == "no_change":
        return round(min(1.0, max(0.0, attitude + rng.uniform(-0.9, 0.9) * model.tolerance)), 4)
    room = 1 - attitude if direction == "increase" else attitude
    low = model.tolerance + 0.005
    size = rng.uniform(low, max(low, min(model.tolerance + model.max_extra_shift, room)))
    return round(attitude + size if direction == "increase" else attitude - size, 4)


def _slate(rng: random.Random, pools: dict[int, list[Video]], design: str, side: int, step: int,
           n: int, seen: set[str]) -> tuple[Video, ...]:
    """Options as the platform showed them: balanced halves, or n-1 on the arm's side + 1 other
    (rabbit_hole: the same-side options get more extreme with every step)."""
    fresh = {s: [v for v in pool if v.video_id not in seen] for s, pool in pools.items()}
    if design == "balanced":
        picks = rng.sample(fresh[1], n // 2) + rng.sample(fresh[-1], n // 2) + rng.sample(fresh[0], n % 2)
    else:
        same = fresh[side]
        if design == "rabbit_hole":
            extreme = [v for v in same if abs(v.stance) >= min(0.15 + 0.2 * step, 0.75)]
            same = extreme if len(extreme) >= n - 1 else same
        picks = rng.sample(same, n - 1) + rng.sample(fresh[-side], 1)
    rng.shuffle(picks)
    return tuple(picks)


def _session(params: StudyParams, issue: str, rng: random.Random, pools: dict[int, list[Video]],
             viewer_index: int, n_steps: int) -> list[Decision]:
    viewer_id = f"{issue}-v{viewer_index:05d}"
    viewer, attitude, survey = make_viewer(issue, rng, viewer_id)
    design = _pick(rng, params.designs, params.design_weights)
    side = rng.choice((1, -1))  # the arm's slant is randomised, as in the experiment
    current = rng.choice(pools[side] if design != "balanced" else pools[1] + pools[-1])
    history: list[WatchedVideo] = []
    viewpoint, decisions = initial_viewpoint(issue, attitude), []
    for step in range(n_steps):
        n = int(_pick(rng, params.slate_sizes, params.slate_size_weights))
        seen = {current.video_id} | {h.video.video_id for h in history}
        slate = _slate(rng, pools, design, side, step, n, seen)
        probs = choice_probs(params.choice, slate, attitude, viewer.political_interest, current)
        gold = rng.choices(range(n), weights=probs)[0]
        conditional = [opinion_probs_given(params.opinion, v.stance, attitude) for v in slate]
        marginal = tuple(sum(p * c[j] for p, c in zip(probs, conditional)) for j in range(3))
        after = _shift(rng, params.opinion, attitude, rng.choices(OPINION_DIRECTIONS, weights=conditional[gold])[0])
        decisions.append(Decision(
            row_id=f"{viewer_id}-s{step}", viewer=viewer, issue=issue, study=STUDY_NAMES[issue],
            session_id=f"{viewer_id}-session", step=step, initial_viewpoint=viewpoint, current=current,
            history=tuple(history), survey=tuple(survey), slate=slate, gold_index=gold + 1,
            opinion_before=attitude, opinion_after=after,
            opinion_direction=opinion_direction(attitude, after, params.opinion.tolerance),
            slate_design=design, true_choice_probs=probs, true_opinion_probs=marginal))
        # The current video is finished (or abandoned) before the click; its watch time enters
        # the history only from the next decision on.
        liked = max(0.0, current.stance * (2 * attitude - 1))
        fraction = 1.0 if rng.random() < 0.25 else min(1.0, max(0.03, rng.gauss(0.4 + 0.5 * liked, 0.25)))
        history.append(WatchedVideo(current, float(round(fraction * current.duration_s))))
        current, attitude = slate[gold], after
    return decisions


def generate_study(issue: str, n: int, seed: int = 0, params: StudyParams | None = None) -> list[Decision]:
    """`n` decisions of sessions of several sequential decisions per viewer; same arguments -> same study."""
    if issue not in ISSUES:
        raise ValueError(f"unknown issue {issue!r}; choose one of {ISSUES}")
    params = params or StudyParams()
    rng = random.Random(f"grailcore-synth:{issue}:{seed}")  # str seeds hash with sha512: stable across runs
    catalog = make_catalog(issue, rng, params.n_videos)
    pools = {s: [v for v in catalog if (v.stance > 0.15 if s > 0 else v.stance < -0.15 if s < 0 else
                                         abs(v.stance) <= 0.15)] for s in (1, -1, 0)}
    needed = max(params.slate_sizes) + params.steps[1] + 1  # a session never re-offers a watched video
    if min(len(pool) for pool in pools.values()) < needed:
        raise ValueError(f"StudyParams.n_videos={params.n_videos} leaves a stance pool with fewer than "
                         f"{needed} videos (sizes {[len(p) for p in pools.values()]}); raise n_videos")
    decisions: list[Decision] = []
    viewer_index = 0
    while len(decisions) < n:
        n_steps = min(rng.randint(*params.steps), n - len(decisions))
        decisions += _session(params, issue, rng, pools, viewer_index, n_steps)
        viewer_index += 1
    return decisions


def split_by_viewer(decisions: list[Decision], seed: int = 0,
                    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, list[Decision]]:
    """train/validation/test by viewer: a viewer's rows are not independent, so none is shared across splits."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    viewers = sorted({d.viewer.viewer_id for d in decisions})
    random.Random(f"grailcore-split:{seed}").shuffle(viewers)
    cut1 = round(fractions[0] * len(viewers))
    cut2 = cut1 + round(fractions[1] * len(viewers))
    split_of = {v: SPLITS[0] if i < cut1 else SPLITS[1] if i < cut2 else SPLITS[2] for i, v in enumerate(viewers)}
    splits: dict[str, list[Decision]] = {s: [] for s in SPLITS}
    for d in decisions:
        splits[split_of[d.viewer.viewer_id]].append(d)
    return splits


def summarize(decisions: list[Decision]) -> dict:
    """Counts and the accuracies of the Bayes-optimal predictor (which knows the true probabilities)."""
    if not decisions:
        return {"decisions": 0, "viewers": 0}
    by_size: dict[int, list[float]] = defaultdict(list)
    for d in decisions:
        by_size[d.n_options].append(max(d.true_choice_probs))
    rows = len(decisions)
    return {
        "decisions": rows,
        "viewers": len({d.viewer.viewer_id for d in decisions}),
        "bayes_optimal_accuracy": sum(max(d.true_choice_probs) for d in decisions) / rows,
        "bayes_optimal_accuracy_by_n_options": {n: sum(v) / len(v) for n, v in sorted(by_size.items())},
        "uniform_accuracy": sum(1 / d.n_options for d in decisions) / rows,
        "bayes_optimal_opinion_accuracy": sum(max(d.true_opinion_probs) for d in decisions) / rows,
        "opinion_directions": dict(sorted(Counter(d.opinion_direction for d in decisions).items())),
        "slate_designs": dict(sorted(Counter(d.slate_design for d in decisions).items())),
        "n_options": dict(sorted(Counter(d.n_options for d in decisions).items())),
    }


def write_study(out_dir: str, issue: str, n: int, seed: int = 0, params: StudyParams | None = None) -> dict:
    """Write out_dir/{train,validation,test}.jsonl and out_dir/study.json; returns the study.json content."""
    params = params or StudyParams()
    splits = split_by_viewer(generate_study(issue, n, seed, params), seed)
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in splits.items():
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as fh:
            for d in rows:
                fh.write(json.dumps(decision_to_dict(d), ensure_ascii=False) + "\n")
    study = {
        "issue": issue, "study": STUDY_NAMES[issue], "n": n, "seed": seed,
        "params": dataclasses.asdict(params),
        "note": "bayes_optimal_accuracy assumes options are shown in the order the viewer saw them; "
                "shuffled prompts hide the primacy term, so the reachable accuracy is slightly lower.",
        "splits": {name: summarize(rows) for name, rows in splits.items()},
    }
    with open(os.path.join(out_dir, "study.json"), "w", encoding="utf-8") as fh:
        json.dump(study, fh, indent=2, sort_keys=True)
    return study


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grailcore.data.synth", description=__doc__)
    parser.add_argument("--issue", required=True, choices=ISSUES)
    parser.add_argument("--n", type=int, default=5000, help="decisions to generate (all splits)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    study = write_study(args.out, args.issue, args.n, args.seed)
    for name, s in study["splits"].items():
        print(f"{name:>10}: {s['decisions']:5d} decisions, {s['viewers']:4d} viewers, "
              f"bayes-optimal accuracy {s.get('bayes_optimal_accuracy', 0):.3f} "
              f"(uniform {s.get('uniform_accuracy', 0):.3f}), "
              f"opinion bayes-optimal {s.get('bayes_optimal_opinion_accuracy', 0):.3f}")
    print(f"wrote {args.out}/{{train,validation,test}}.jsonl and study.json")


if __name__ == "__main__":
    main()
