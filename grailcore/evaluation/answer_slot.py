"""The model's own choice distribution at the answer slot, per sampled completion.

What is computed, exactly. For a completion sampled at temperature T the *answer slot* is
the token position right after its first `<answer>` tag and any whitespace-only tokens the
model wrote there. The probability of option k is

    p(k) = sum over the candidates c of k of  p_T(c | prompt, completion up to the slot)

where p_T multiplies next-token probabilities under softmax(logits / T), and the
candidates of k are the token sequences that start writing k's number (as is, or after
one space) just far enough that no other option of the slate can follow: the digit alone
when no other option's number starts with it ('3' on a 4-option slate), else the number
and the first token of `</answer>` ('1' then '</' on a 12-option slate, where '1' also
starts 10, 11, 12). In the tokenizer's own tokenization. So on slates of up to 9 options
p(k) is the next-token probability of k's digit (plus ' ' then the digit), and what the
model writes after a committed option (`3</answer>`, `3 or 4`) does not move its mass.
No candidate starts another's (checked), so the events are disjoint and sum(p) <= 1; the
rest, 1 - sum(p), is *off-slate*: no number, a number that is no option's, other text or
spacing. The opinion slot is the same after `<opinion>`, with the words `increase`,
`decrease`, `no_change` (and the parser's spellings `no change`, `no-change`), cut where
they decide the direction but not before their first 3 characters ('incre', 'no_'):
'no' or 'in' alone could start other words.

Where a completion has no `<answer>` (it never answered, or was cut off) the slot is
*forced*: the layout's missing text (`</think>\n<answer>`, or `<answer>` in the direct
layout) is appended and read the same way; such samples are counted. A completion without
`<opinion>` gets a forced opinion slot after its closed answer, or, when its answer is not
closed, the mixture sum_k p(k) p(opinion | slot + `k</answer><opinion>`) over the options
it could name (the closing text appended as in a forced slot). By default a sampled
completion's mixture is estimated from one option K drawn with probability p(k) / S,
S = sum_k p(k): the estimate S p(opinion | K) is unbiased for the mixture and costs one
path's reads instead of one per option (`mixture="exact"` reads them all; a direct row,
whose distribution is one read, always does). The direct layout has no reasoning, so a
row's distribution is one read at prompt + `<answer>`.

Because the slot is a stopping time of the sampled sequence, the mean of these per-sample
distributions over a row's k samples is an unbiased (Rao-Blackwellised) estimate of the
model's marginal probability of each option, with far less variance than a histogram of
the k sampled answers. Engines provide the one primitive this needs
(`RolloutEngine.next_token_logprobs`); any callable with its signature works, e.g.
`functools.partial(trie_next_token_logprobs, policy)` on the trainer's HF policy.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from grailcore.data.schema import OPINION_DIRECTIONS

LAYOUTS = ("think", "direct")
EXACT, DIRECT, HISTOGRAM = "exact_answer_slot", "direct", "histogram_fallback"
"""The estimators of a row's choice distribution, as metrics name them."""
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
OPINION_OPEN, OPINION_CLOSE = "<opinion>", "</opinion>"
OPINION_SPELLINGS = {"increase": ("increase",), "decrease": ("decrease",),
                     "no_change": ("no_change", "no change", "no-change")}
"""What the strict parser reads as each direction (rewards/parsing.py)."""
PRUNE_BELOW = 1e-3
"""A candidate branch whose probability so far is below this is not read further (its
probability counts as 0, off-slate): each probability is exact to within this per
branch left out (a lower bound), and a vLLM scoring pass skips requests that each cost a
partial KV block's recompute. On the demo's models the cut moved no probability by more
than 2.4e-3 (against reads cut at 1e-6) and took a trained model's exact evaluation from
1.42x to 1.10x the sampling time (bench/RESULTS.md); pass `prune_below=1e-6` (or 0) for
tighter reads."""
OPINION_MIN_CHARS = 3
"""A direction's candidate writes at least this much of its word: 'no' alone (or a
tokenizer's 'in') could start other words, 'no_' / 'incre' cannot."""

Scorer = Callable[[list[list[int]], list[list[int]], float], list[list[float]]]
"""`RolloutEngine.next_token_logprobs`: (sequences, token ids per sequence, temperature)
-> log p(token | sequence) per requested token."""


@dataclass(frozen=True)
class SampleSlots:
    """One completion's slot distributions (what a completions file stores)."""

    choice: tuple[float, ...]
    """p(option k), k = 1..n; 1 - sum is the off-slate mass."""
    opinion: tuple[float, float, float]
    """p(direction) in OPINION_DIRECTIONS order; 1 - sum is off-slate."""
    choice_slot: str
    """'sampled' (the completion wrote <answer>), 'forced' or 'direct'; 'skipped' (all zeros)
    where a slot reward's reader left an uncommitted completion unread (`rewards/likelihood.py`)."""
    opinion_slot: str
    """'sampled', 'forced' (appended after a closed answer), 'mixture' (over every option)
    or 'mixture_draw' (after one option drawn from p(k): an unbiased estimate of the mixture)."""


@dataclass(frozen=True)
class RowSlots:
    """A row's per-sample slot distributions and how they were made."""

    estimator: str
    """EXACT (one entry per sampled completion) or DIRECT (one entry: no sampling)."""
    temperature: float
    samples: tuple[SampleSlots, ...]

    def to_json(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "temperature": self.temperature,
                "choice": [list(s.choice) for s in self.samples], "opinion": [list(s.opinion) for s in self.samples],
                "choice_slot": [s.choice_slot for s in self.samples],
                "opinion_slot": [s.opinion_slot for s in self.samples]}

    @classmethod
    def from_json(cls, data: dict[str, Any], n_options: int, where: str) -> RowSlots:
        try:
            samples = tuple(SampleSlots(tuple(float(p) for p in c), tuple(float(p) for p in o), cs, os)
                            for c, o, cs, os in zip(data["choice"], data["opinion"], data["choice_slot"],
                                                    data["opinion_slot"], strict=True))
            row = cls(str(data["estimator"]), float(data["temperature"]), samples)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: field 'answer_slot' is malformed ({err!r}); it is written by "
                             "grailcore.eval / the trainer's evaluation, or leave it out to score the texts "
                             "with the histogram fallback") from None
        if row.estimator not in (EXACT, DIRECT) or not samples:
            raise ValueError(f"{where}: field 'answer_slot' has estimator {row.estimator!r} and "
                             f"{len(samples)} samples; expected {EXACT!r} or {DIRECT!r} and at least one")
        for s in samples:
            if len(s.choice) != n_options or len(s.opinion) != len(OPINION_DIRECTIONS):
                raise ValueError(f"{where}: field 'answer_slot' has {len(s.choice)} option probabilities for "
                                 f"{n_options} options (or {len(s.opinion)} opinion ones for 3)")
            if min(s.choice + s.opinion) < 0 or sum(s.choice) > 1 + 1e-6 or sum(s.opinion) > 1 + 1e-6:
                raise ValueError(f"{where}: field 'answer_slot' holds probabilities outside [0, 1] or summing "
                                 "above 1")
        return row


class SlotVocabulary:
    """A tokenizer's candidate token sequences and tag encodings, built once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = frozenset(tokenizer.all_special_ids)
        self._choices: dict[int, list[tuple[tuple[int, ...], ...]]] = {}
        self.opinions = distinguishing([[v for spelling in OPINION_SPELLINGS[d] for v in self.variants(spelling)]
                                        for d in OPINION_DIRECTIONS], "opinion words", self.decode, OPINION_MIN_CHARS)
        """[3] the candidates of each direction, OPINION_DIRECTIONS order."""

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def variants(self, label: str, closing: str = "") -> tuple[tuple[int, ...], ...]:
        """`label` and ` label`, each up to the token that starts `closing` (the longest a
        number candidate can be; `distinguishing` shortens them), or whole without one."""
        if not closing:
            return tuple(dict.fromkeys((self.encode(label), self.encode(" " + label))))
        out = []
        for text in (label, " " + label):
            ids = self.encode(text + closing)
            cut = next((j for j in range(1, len(ids) + 1) if len(self.decode(ids[:j])) > len(text)), None)
            if cut is None or not self.decode(ids[:cut]).startswith(text + closing[0]):
                raise ValueError(f"cannot tokenize {text + closing!r} into {text!r} then {closing!r}: "
                                 f"{[self.decode([i]) for i in ids]}")
            out.append(ids[:cut])
        return tuple(dict.fromkeys(out))

    def choices(self, n_options: int) -> list[tuple[tuple[int, ...], ...]]:
        """[n] the candidates of each option number on an n-option slate."""
        if n_options not in self._choices:
            self._choices[n_options] = distinguishing(
                [self.variants(str(k), ANSWER_CLOSE) for k in range(1, n_options + 1)], f"option numbers 1..{n_options}",
                self.decode)
        return self._choices[n_options]

    def strip_special(self, ids: Sequence[int]) -> tuple[int, ...]:
        """`ids` without trailing special tokens (the EOS a finished completion keeps)."""
        end = len(ids)
        while end and ids[end - 1] in self.special:
            end -= 1
        return tuple(ids[:end])

    def slot_after(self, ids: Sequence[int], tag: str) -> tuple[int, ...] | None:
        """The sampled tokens up to the slot after the first `tag` (plus whitespace-only
        tokens), or None without the tag. A token that straddles the tag's end is cut at
        the tag: the tag's rest is re-encoded."""
        text = self.decode(ids)
        at = text.find(tag)
        if at < 0:
            return None
        tag_end = at + len(tag)
        j = bisect.bisect_left(range(len(ids) + 1), tag_end, key=lambda m: len(self.decode(ids[:m])))
        covered = len(self.decode(ids[:j]))
        if covered > tag_end:  # the tag's last token also carries what follows it
            before = self.decode(ids[:j - 1])
            return tuple(ids[:j - 1]) + self.encode(text[len(before):tag_end])
        while j < len(ids) and ids[j] not in self.special and not self.decode(ids[j:j + 1]).strip():
            j += 1
        return tuple(ids[:j])


def distinguishing(variants: Sequence[Sequence[tuple[int, ...]]], what: str,
                   decode: Callable[[Sequence[int]], str], min_chars: int = 1) -> list[tuple[tuple[int, ...], ...]]:
    """Each label's candidates: its variants cut to their shortest prefix that writes at
    least `min_chars` non-space characters (or the whole variant) and starts no other
    label's variant (the reads that decide the label, and no more); a candidate that
    starts another of its own label absorbs it."""
    out = []
    for label, own in enumerate(variants):
        others = [w for j, ws in enumerate(variants) if j != label for w in ws]
        _check_prefix_free([*own, *others], what, own)

        def decides(v: tuple[int, ...], m: int) -> bool:
            written = len(decode(v[:m]).strip())
            return not any(w[:m] == v[:m] for w in others) and (written >= min_chars or m == len(v)) and written > 0

        cut = {v[:next(m for m in range(1, len(v) + 1) if decides(v, m))] for v in own}
        out.append(tuple(sorted(c for c in cut if not any(d != c and c[:len(d)] == d for d in cut))))
    _check_prefix_free([c for cs in out for c in cs], what)
    return out


def _check_prefix_free(sequences: list[tuple[int, ...]], what: str, among: Sequence = ()) -> None:
    """Disjoint events need that no candidate starts another (only pairs with one side in
    `among` when given: a label's own variants may start each other, they merge)."""
    for a in sequences:
        for b in sequences:
            if among and (a in among) == (b in among):
                continue
            if a is not b and len(a) <= len(b) and b[:len(a)] == a:
                raise ValueError(f"{what}: candidate tokens {a} start {b}; their probabilities would overlap")


def forced_suffix(layout: str, text: str) -> str:
    """What a completion without `<answer>` needs appended to reach the slot."""
    if layout == "direct":
        return ANSWER_OPEN
    return ("\n" if "</think>" in text else "</think>\n") + ANSWER_OPEN


@dataclass(frozen=True)
class _Plan:
    """One sample's reads: the answer slot, and the opinion slot(s) with their weights."""

    answer: tuple[int, ...]
    choice_slot: str
    opinion: tuple[int, ...] | None
    """The opinion slot; None = the mixture over options (`mixture_paths`)."""
    opinion_slot: str
    mixture_paths: tuple[tuple[int, ...], ...] = ()
    """`k</answer><opinion>` per option k: the opinion is read after `answer` + each."""


def _plan(vocab: SlotVocabulary, prompt: Sequence[int], completion: Sequence[int], n_options: int,
          layout: str, direct: bool) -> _Plan:
    prompt, ids = tuple(prompt), vocab.strip_special(completion)
    text = vocab.decode(ids)
    head = vocab.slot_after(ids, ANSWER_OPEN)
    if head is None:
        answer, choice_slot = prompt + ids + vocab.encode(forced_suffix(layout, text)), "direct" if direct else "forced"
    else:
        answer, choice_slot = prompt + head, "sampled"
    opinion_head = vocab.slot_after(ids, OPINION_OPEN)
    if opinion_head is not None:
        return _Plan(answer, choice_slot, prompt + opinion_head, "sampled")
    if head is not None and ANSWER_CLOSE in text[text.find(ANSWER_OPEN):]:
        return _Plan(answer, choice_slot, prompt + ids + vocab.encode(OPINION_OPEN), "forced")
    paths = tuple(vocab.encode(f"{k}{ANSWER_CLOSE}{OPINION_OPEN}") for k in range(1, n_options + 1))
    return _Plan(answer, choice_slot, None, "mixture", paths)


def sequence_logprobs(score: Scorer, queries: Sequence[tuple[tuple[int, ...], Sequence[tuple[int, ...]]]],
                      temperature: float, weights: Sequence[float] | None = None,
                      prune_below: float = 0.0) -> list[list[float]]:
    """log p_T(candidate | prefix) for every (prefix, candidates) query, read depth by depth:
    one call of `score` per depth over the distinct trie nodes (each read once). A candidate
    whose probability so far, times its query's weight, is below `prune_below` is not read
    further and gets -inf: it could add at most `prune_below` to any probability."""
    weights = weights if weights is not None else [1.0] * len(queries)
    floor = np.log(prune_below) if prune_below > 0 else -np.inf
    logp = [[0.0] * len(cands) for _, cands in queries]
    alive = [(q, c) for q, (_, cands) in enumerate(queries) for c in range(len(cands))]
    depth = 0
    while alive:
        reads: dict[tuple[int, ...], dict[int, None]] = {}
        for q, c in alive:
            prefix, cand = queries[q][0], queries[q][1][c]
            reads.setdefault(prefix + cand[:depth], {})[cand[depth]] = None
        nodes = list(reads)
        values = score([list(n) for n in nodes], [list(reads[n]) for n in nodes], temperature)
        table = {(node, token): lp for node, lps in zip(nodes, values) for token, lp in zip(reads[node], lps)}
        survivors = []
        for q, c in alive:
            prefix, cand = queries[q][0], queries[q][1][c]
            logp[q][c] += table[(prefix + cand[:depth], cand[depth])]
            if depth + 1 < len(cand):
                if logp[q][c] + np.log(max(weights[q], 1e-300)) >= floor:
                    survivors.append((q, c))
                else:
                    logp[q][c] = -np.inf
        alive, depth = survivors, depth + 1
    return logp


def candidate_mass(logprobs: Sequence[float], groups: Sequence[Sequence[Any]]) -> tuple[float, ...]:
    """Probability of each group of candidates (logprobs flattened group by group)."""
    out, at = [], 0
    for group in groups:
        out.append(float(np.exp(logprobs[at:at + len(group)]).sum()))
        at += len(group)
    return tuple(out)


MIXTURES = ("draw", "exact")


def slot_distributions(score: Scorer, vocab: SlotVocabulary, prompts: Sequence[Sequence[int]],
                       completions: Sequence[Sequence[Sequence[int]]], n_options: Sequence[int],
                       layouts: Sequence[str], temperature: float,
                       prune_below: float | None = None, mixture: str = "draw", seed: int = 0) -> list[RowSlots]:
    """Per row, the slot distributions of each of its completions (token ids, as sampled
    after `prompts[i]`, in layout `layouts[i]`). A 'direct' row given no completions
    reads its one direct slot (estimator DIRECT). Reads go to `score` depth by depth,
    first the answer and opinion slots, then the opinion mixtures weighted by p(k)
    (`sequence_logprobs`, branches below `prune_below`, default PRUNE_BELOW, not followed).
    `mixture`: 'draw' estimates a sampled completion's mixture after one option drawn
    from p(k) (a generator seeded with `seed`, draws in row order); 'exact' reads every
    option's path."""
    if mixture not in MIXTURES:
        raise ValueError(f"mixture must be one of {MIXTURES}, got {mixture!r}")
    cut = PRUNE_BELOW if prune_below is None else prune_below
    rng = np.random.default_rng(seed)
    plans = []
    for prompt, rows, n, layout in zip(prompts, completions, n_options, layouts, strict=True):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        direct = layout == "direct" and not rows
        plans.append([_plan(vocab, prompt, c, n, layout, direct) for c in (rows or [()])])
    flat_opinions = tuple(v for vs in vocab.opinions for v in vs)
    queries = []
    for plans_of_row, n in zip(plans, n_options):
        flat_choices = tuple(v for vs in vocab.choices(n) for v in vs)
        for plan in plans_of_row:
            queries.append((plan.answer, flat_choices))
            queries.append((plan.opinion, flat_opinions) if plan.opinion is not None else (plan.answer, ()))
    first = iter(sequence_logprobs(score, queries, temperature, prune_below=cut))
    reads = [(candidate_mass(next(first), vocab.choices(n)), next(first))
             for plans_of_row, n in zip(plans, n_options) for _ in plans_of_row]
    mixtures, weights = [], []  # opinion after each option k a mixture reads, weighted by p(k)
    drawn = []  # per mixture sample: its slot kind and the (option index, weight) of each path read
    for plan, (choice, _) in zip((p for row in plans for p in row), reads):
        if not plan.mixture_paths:
            continue
        probs = np.array(choice[:len(plan.mixture_paths)])
        if mixture == "exact" or plan.choice_slot == "direct":
            kind, paths = "mixture", tuple(enumerate(probs))
        else:  # S p(opinion | K) with K ~ p(k) / S has mean sum_k p(k) p(opinion | k)
            total = float(probs.sum())
            kind, paths = "mixture_draw", ((int(rng.choice(len(probs), p=probs / total)), total),) if total > 0 else ()
        drawn.append((kind, paths))
        mixtures.extend((plan.answer + plan.mixture_paths[k], flat_opinions) for k, _ in paths)
        weights.extend(w for _, w in paths)
    second = iter(sequence_logprobs(score, mixtures, temperature, weights, cut))
    paths_of = iter(drawn)
    per_sample = iter(reads)
    out = []
    for plans_of_row in plans:
        samples = []
        for plan in plans_of_row:
            choice, opinion_logp = next(per_sample)
            slot_kind = plan.opinion_slot
            if plan.opinion is not None:
                opinion = np.array(candidate_mass(opinion_logp, vocab.opinions))
            else:  # weighted by p(k); the rest of the closing text is appended, as in a forced slot
                slot_kind, paths = next(paths_of)
                opinion = sum((w * np.array(candidate_mass(next(second), vocab.opinions)) for _, w in paths),
                              np.zeros(len(vocab.opinions)))
            samples.append(SampleSlots(choice, tuple(float(p) for p in opinion), plan.choice_slot, slot_kind))
        estimator = DIRECT if plans_of_row[0].choice_slot == "direct" else EXACT
        out.append(RowSlots(estimator, float(temperature), tuple(samples)))
    return out
