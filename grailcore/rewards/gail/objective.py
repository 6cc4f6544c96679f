"""The discriminator's objective as pure functions: GAIL reward transforms of D's logit,
the weighted rows of one D update (human choices vs policy choices), and its loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F

from grailcore.config import ConfigError
from grailcore.data.schema import Example

REWARD_KINDS: tuple[str, ...] = ("d", "log_d", "neg_log_1m_d", "logit")


def gail_reward(logits: torch.Tensor, kind: str, clip: float) -> torch.Tensor:
    """[N] reward from [N] logits z of D = sigmoid(z), clipped to [-clip, clip].

    d: D;  log_d: log D (<= 0);  neg_log_1m_d: -log(1 - D) (>= 0);  logit: log D - log(1 - D) = z.
    Computed from z directly (logsigmoid/softplus), so saturated D gives finite values.
    """
    if kind == "d":
        reward = torch.sigmoid(logits)
    elif kind == "log_d":
        reward = F.logsigmoid(logits)
    elif kind == "neg_log_1m_d":
        reward = F.softplus(logits)
    elif kind == "logit":
        reward = logits
    else:
        raise ValueError(f"gail.reward must be one of {REWARD_KINDS}, got {kind!r}")
    return reward.clamp(-clip, clip)


def reward_floor(kind: str, clip: float) -> float:
    """The least reward `gail_reward(., kind, clip)` can pay any parsed choice: what a
    completion that dodges (no parsable answer, or a broken layout) gets instead.

    Rule: dodging earns the bottom of the learned reward's range, so for every logit a
    committed answer totals at least as much from this reward as not answering. (Paying 0
    made dodging the best move whenever D disliked every option: logit and log_d are
    negative there.) d and neg_log_1m_d are >= 0, so their floor is 0; log_d and logit
    reach -clip.
    """
    if kind not in REWARD_KINDS:
        raise ValueError(f"gail.reward must be one of {REWARD_KINDS}, got {kind!r}")
    return 0.0 if kind in ("d", "neg_log_1m_d") else -clip


@dataclass(frozen=True)
class TrainingRows:
    """The distinct (example, option) inputs of one D update and how often each occurred;
    count tensors are [R] float64.

    Loss = 0.5 * E_human[BCE(D, 1)] + 0.5 * E_policy[BCE(D, 0)], each expectation a mean
    over its own samples of the WHOLE step (all ranks: `loss_terms` takes the global
    counts). A row can be in both (a policy sample equal to the human's choice under
    negatives="all"); BCE is linear in the target, so such a row is one forward with
    weight w_e + w_p and target w_e / (w_e + w_p).
    """

    examples: list[Example]
    answers: list[int]
    """1-based options."""
    expert_count: torch.Tensor
    """Rollout slots and replayed negatives whose state had this row as the human's choice."""
    policy_count: torch.Tensor
    """Policy negatives of this row, fresh + replayed."""
    differing_count: torch.Tensor
    """Fresh policy samples of this row that differ from the human's choice (metrics)."""
    correct_count: torch.Tensor
    """Fresh policy samples of this row equal to the human's choice (metrics)."""
    fresh_expert_count: torch.Tensor
    """This step's rollout slots whose state had this row as the human's choice (metrics:
    D has not trained on them yet, unlike replayed states)."""
    slots: int
    """Positive slots: rollout slots (completions) plus replayed negatives (each brings its
    state's human choice)."""
    negatives: int
    """Policy samples in E_policy: fresh + replayed."""
    fresh_negatives: list[tuple[str, int]]
    """This step's policy negatives as (example_id, option), for the replay buffer."""

    def loss_terms(self, slots: int, negatives: int, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
        """([R] weights, [R] soft targets) given the step's total slots and negatives.
        Targets: human 1 - eps/2, policy eps/2, mixed by the row's two weights."""
        expert = 0.5 * self.expert_count / max(slots, 1)
        policy = 0.5 * self.policy_count / max(negatives, 1)
        high, low = 1 - label_smoothing / 2, label_smoothing / 2
        return (expert + policy).float(), ((expert * high + policy * low) / (expert + policy)).float()


def training_rows(examples: Sequence[Example], answers: Sequence[int | None],
                  replayed: Sequence[tuple[str, int]], index: Mapping[str, Example],
                  negatives: Literal["differing", "all"]) -> TrainingRows:
    """Rows of one D update from the rollout slots (examples[i], parsed answers[i]).

    Every slot contributes the human's choice for its state (so positives follow the
    states the policy visits). Policy samples: "differing" uses only choices that differ
    from the human's (D learns human vs not-human); "all" uses every parsed sample, the
    unbiased GAIL estimate, whose optimum is D = p_human / (p_human + p_policy) for
    each (state, option). Unparsable samples (None) are skipped. `replayed` adds past
    negatives, looked up in `index` (the training examples), each with its state's human
    choice as a positive slot (as off-policy GAIL draws an expert batch beside each replayed
    policy batch): without it D saw past policy choices again and again but past people's
    never. Measured once (tiny-bert, frozen encoder, replay 4x the fresh negatives, a policy
    that answers 3 half the time): the held-out P(human) gap between options shown first and
    third was 0.12 without the replayed people, 0.28 with them.
    """
    rows: dict[tuple[str, int], list] = {}  # key -> [example, expert, policy, differing, correct, fresh expert]

    def row(example: Example, answer: int) -> list:
        return rows.setdefault((example.example_id, answer), [example, 0, 0, 0, 0, 0])

    fresh: list[tuple[str, int]] = []
    for example, answer in zip(examples, answers, strict=True):
        expert = row(example, example.gold_index)
        expert[1] += 1
        expert[5] += 1
        if answer is None:
            continue
        differs = answer != example.gold_index
        row(example, answer)[3 if differs else 4] += 1
        if differs or negatives == "all":
            fresh.append((example.example_id, answer))
    for example_id, answer in [*fresh, *replayed]:
        row(index[example_id], answer)[2] += 1
    for example_id, _ in replayed:
        example = index[example_id]
        row(example, example.gold_index)[1] += 1
    values = list(rows.values())
    counts = torch.tensor([v[1:] for v in values], dtype=torch.float64).reshape(-1, 5)  # [R, 5]
    return TrainingRows(
        examples=[v[0] for v in values], answers=[key[1] for key in rows],
        expert_count=counts[:, 0], policy_count=counts[:, 1], differing_count=counts[:, 2],
        correct_count=counts[:, 3], fresh_expert_count=counts[:, 4],
        slots=len(examples) + len(replayed), negatives=len(fresh) + len(replayed),
        fresh_negatives=fresh,
    )


def weighted_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scalar sum_i w_i * BCE(logit_i, target_i); weights already hold the 1/N of each mean."""
    return (weights * F.binary_cross_entropy_with_logits(logits, targets, reduction="none")).sum()


def index_training_examples(examples: Sequence[Example]) -> dict[str, Example]:
    """example_id -> example, checking viewer examples carry one option text per option."""
    index: dict[str, Example] = {}
    for ex in examples:
        if ex.task == "viewer" and (ex.gold_index is None or len(ex.option_texts) != ex.n_options):
            raise ConfigError(
                f"rewards.names lists 'gail': viewer example {ex.example_id!r} (source {ex.source!r}) has gold_index="
                f"{ex.gold_index} and {len(ex.option_texts)} option texts for n_options={ex.n_options}; "
                "the discriminator needs the gold and every option's rendered text")
        if ex.example_id in index and index[ex.example_id] != ex:
            raise ConfigError(f"two different training examples share example_id {ex.example_id!r}; "
                              "the discriminator's guard and replay buffer need unique ids")
        index[ex.example_id] = ex
    if not any(ex.task == "viewer" for ex in index.values()):
        raise ConfigError("the 'gail' reward needs viewer examples in the training data (it judges option "
                          "choices); drop 'gail' from rewards.names for math-only runs")
    return index
