"""GRAIL's slate-aware discriminator D(state, slate, chosen option) -> P(a person made this
choice), the learned reward `gail`: trained on the policy's rollouts of training examples
against people's choices, it pays the policy r(D) for choices that look human, weighted by
its entry in rewards.weights like every other reward."""

from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

import torch
from torch import nn

from grailcore import dist as gdist
from grailcore.config import Config, ConfigError, GailConfig
from grailcore.data.schema import Example
from grailcore.dist import DistInfo
from grailcore.model import resolve_model_path
from grailcore.rewards.gail import stats
from grailcore.rewards.gail.ranks import broadcast_from_rank0, cpu_copy, sum_gradients, sum_over_ranks, world_size
from grailcore.rewards.gail.encoding import ActionTooLongError, check_actions_fit, encode_pairs, slate_chunks
from grailcore.rewards.gail.objective import (TrainingRows, gail_reward, index_training_examples, reward_floor,
                                              training_rows, weighted_bce)
from grailcore.rewards.parsing import parse_viewer
from grailcore.rewards.registry import register_learned
from grailcore.rewards.viewer import committed_answer
from grailcore.types import RewardOutput

log = logging.getLogger(__name__)

SAVE_FORMAT = "grailcore-discriminator-v3"
"""v3: the head also reads where each option was shown (v2 saw the slate's texts without
their order, v1 the chosen option without its alternatives)."""
MAX_SHOWN_OPTIONS = 32
"""Positions the head reads (one-hot): slates up to this many options."""
_MICRO_ROWS = 16
"""(option, state) pairs per encoder forward (whole slates, at least one): bounds activation
memory whatever the rollout batch size."""
_WEIGHT_DECAY = 0.01
"""AdamW's own default, written out so the optimizer has no hidden settings."""
_TRUNCATION_SAMPLE = 512
"""Training examples whose state truncation is measured and logged at build."""

__all__ = ["ActionTooLongError", "Discriminator", "SAVE_FORMAT", "build_discriminator", "gail_reward"]


class Discriminator(nn.Module):
    """Slate-aware conditional scorer: the logit of P(human) for option k of a slate is
    `head([p_k, o_k - mean_j o_j, onehot(k)])`: p_k the mean-pooled encoding of the pair
    (option k, state), o_k the mean over option k's own tokens of that encoding (read with
    the state), k the position the option was shown at.

    Every option of the slate is encoded in one pass and the head sees each option beside
    the slate's mean, so the score of a choice is relative to the alternatives the person
    had: the same option on the same viewer scores differently in another slate. The
    scores are not softmax-normalised over the slate: GAIL's optimum logit is the density
    ratio log p_human(k | state, slate) / p_policy(k | state, slate), whose exponentials do
    not sum to a constant over the slate, so a softmax would keep D from reaching it.

    A learned reward (grailcore.rewards.stack.LearnedReward): `score` pays, `update` learns.
    Owns its training state (AdamW, replay buffer of past policy negatives, counters), so
    `state_dict()` is the FULL training state, not only the weights. Identical on every
    rank. Collectives: construction, `update` and `metrics` run on every rank together.
    """

    def __init__(self, gail: GailConfig, train_examples: Sequence[Example], *,
                 device: torch.device | str = "cpu", seed: int = 0, weight: float = 1.0):
        super().__init__()
        # transformers is heavy: imported when a discriminator is built, not with grailcore.rewards.
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        self.gail, self.seed, self.device = gail, seed, torch.device(device)
        self.weight = weight
        """Its rewards.weights entry: only for the gail/reward_share metric (the stack weighs)."""
        self.rank = gdist.get_rank() if world_size() > 1 else 0
        self._train = index_training_examples(train_examples)
        path = resolve_model_path(gail.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        if hasattr(config, "attention_probs_dropout_prob"):
            # Attention dropout sends torch's SDPA to its math path, which keeps every
            # [heads, T, T] map for backward (memory quadratic in gail.max_tokens).
            config.attention_probs_dropout_prob = 0.0
        self.encoder = AutoModel.from_pretrained(path, config=config)
        positions = getattr(self.encoder.config, "max_position_embeddings", None)
        if positions is not None and gail.max_tokens > positions:
            raise ConfigError(f"gail.max_tokens={gail.max_tokens} exceeds the {positions} positions of "
                              f"encoder {gail.model!r}; lower gail.max_tokens")
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler.requires_grad_(False)  # mean pooling never uses it
        hidden = self.encoder.config.hidden_size
        # Input [p_k, o_k - slate mean of o, onehot(k)]: the pair itself, how the option stands
        # out in its slate, and where it was shown (see `forward`).
        width = 2 * hidden + MAX_SHOWN_OPTIONS
        self.head = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.head[0].weight.normal_(0.0, width ** -0.5, generator=torch.Generator().manual_seed(seed))
            self.head[0].bias.zero_()
            # Zero output layer: D = 0.5 everywhere at the start, so the first steps add
            # the same GAIL reward to every completion instead of random-init noise.
            self.head[2].weight.zero_()
            self.head[2].bias.zero_()
        self.to(self.device)
        broadcast_from_rank0([*self.parameters(), *self.buffers()])
        self.frozen = gail.frozen_path is not None
        if self.frozen:
            self._load_weights_file(gail.frozen_path)
            self.requires_grad_(False)
        if gail.freeze_encoder:
            self.encoder.requires_grad_(False)
            self.encoder.eval()  # no dropout: a kept feature is the one every later pass would compute
        # The pretrained encoder is fine-tuned at gail.lr (unless frozen); the fresh head (its
        # output layer starts at zero) at gail.head_lr: at the encoder's rate its logits moved
        # by about lr per step (Adam), too slowly to leave 0.5 within a CPU run.
        self._trainable = [p for p in self.parameters() if p.requires_grad]
        encoder = [p for p in self.encoder.parameters() if p.requires_grad]
        head = [p for p in self.head.parameters() if p.requires_grad]
        groups = [{"params": encoder, "lr": gail.lr}] if encoder else []
        self.optimizer = None if self.frozen else torch.optim.AdamW(
            [*groups, {"params": head, "lr": gail.head_lr}], weight_decay=_WEIGHT_DECAY)
        self._features: dict[tuple, torch.Tensor] = {}
        """gail.freeze_encoder: (example_id, state, option texts) -> the slate's [K, 2H] encoder
        features (see `features`)."""
        self.replay: list[tuple[str, int]] = []
        """Past policy negatives as (example_id, option), the same on every rank, oldest first."""
        self.updates = 0
        """D optimizer steps taken."""
        self.observed = 0
        """Training update() calls (seeds the replay draw: a resumed run draws the same)."""
        self.stats = stats.StepStats()
        self._check_training_inputs()

    # ---- model ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, slate_sizes: Sequence[int],
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[P] logits of P(human) for P = sum(slate_sizes) (option, state) pairs, [P, T]
        token ids laid out slate after slate (see `encode_slates`)."""
        return self.head_logits(self.features(input_ids, attention_mask, slate_sizes, token_type_ids), slate_sizes)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, slate_sizes: Sequence[int],
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[P, 2H] encoder features of each pair: [p_k, o_k - mean_j o_j] (class docstring)."""
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        pair = _mean_pool(hidden, attention_mask)  # [P, H]: the whole (option, state) pair
        # The option's own tokens (segment 0; they attend to the state), so options of one
        # slate differ by more than the state they share.
        option_mask = attention_mask if token_type_ids is None else attention_mask * (token_type_ids == 0)
        option = _mean_pool(hidden, option_mask)  # [P, H]
        sizes = list(slate_sizes)
        means = torch.stack([part.mean(0) for part in option.split(sizes)])  # [S, H]
        context = means.repeat_interleave(torch.tensor(sizes, device=option.device), dim=0)  # [P, H]
        return torch.cat([pair, option - context], dim=-1)

    def head_logits(self, features: torch.Tensor, slate_sizes: Sequence[int]) -> torch.Tensor:
        """[P] logits from [P, 2H] `features`, each pair also read with where it was shown."""
        sizes = list(slate_sizes)
        # The shown number is what the policy answers with: a policy that picks by position
        # (the demo's SFT warm start was right in 70% of the rows whose person picked the
        # option shown third, near 0% elsewhere) differs from people, who pick by content in
        # whatever order they saw; without the position D cannot see that (its optimum would
        # be the density ratio averaged over orders).
        if max(sizes) > MAX_SHOWN_OPTIONS:
            raise ValueError(f"a slate of {max(sizes)} options; the discriminator reads positions 1..{MAX_SHOWN_OPTIONS}")
        shown = torch.cat([torch.arange(n, device=features.device) for n in sizes])
        where = nn.functional.one_hot(shown, MAX_SHOWN_OPTIONS).to(features.dtype)  # [P, MAX]
        return self.head(torch.cat([features, where], dim=-1)).squeeze(-1)

    def encode_slates(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """Token tensors of every (option, state) pair of each example's slate, slate after
        slate, ACTION FIRST, so truncation at gail.max_tokens can only cut the state's tail;
        counts truncations."""
        actions = [text for ex in examples for text in ex.option_texts]
        states = [ex.state_text for ex in examples for _ in ex.option_texts]
        where = [f"example {ex.example_id!r} option {k}" for ex in examples for k in range(1, len(ex.option_texts) + 1)]
        batch, truncated = encode_pairs(self.tokenizer, actions, states, self.gail.max_tokens, where)
        self.stats.add("inputs", len(truncated))
        self.stats.add("truncated", sum(truncated))
        return {k: v.to(self.device) for k, v in batch.items()}

    def _slate_logits(self, examples: Sequence[Example]) -> Iterator[tuple[slice, list[torch.Tensor]]]:
        """Per chunk of whole slates (`_MICRO_ROWS` pairs): (its slice of `examples`, each
        slate's [K] logits, with grad when training)."""
        sizes = [len(ex.option_texts) for ex in examples]
        if self.gail.freeze_encoder:
            if examples:
                features = torch.cat([self._kept_features(ex) for ex in examples])
                yield slice(0, len(examples)), list(self.head_logits(features, sizes).float().split(sizes))
            return
        for chunk in slate_chunks(sizes, _MICRO_ROWS):
            batch = self.encode_slates(examples[chunk])
            yield chunk, list(self(**batch, slate_sizes=sizes[chunk]).float().split(sizes[chunk]))

    def _kept_features(self, example: Example) -> torch.Tensor:
        """gail.freeze_encoder: the example's [K, 2H] slate features, encoded (eval mode, no
        grad) the first time the example is seen and kept: the encoder never changes."""
        key = (example.example_id, example.state_text, example.option_texts)  # a re-ordered slate is another input
        kept = self._features.get(key)
        if kept is None:
            with torch.no_grad():
                batch = self.encode_slates([example])
                kept = self.features(**batch, slate_sizes=[len(example.option_texts)]).float()
            self._features[key] = kept
        return kept

    def train(self, mode: bool = True) -> "Discriminator":
        super().train(mode)
        if self.gail.freeze_encoder:
            self.encoder.eval()  # kept features were computed without dropout
        return self

    @torch.no_grad()
    def slate_logits(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """example_id -> [K] D logits of every option of its slate (eval mode, no dropout),
        one slate pass per distinct example."""
        was_training = self.training
        self.eval()
        try:
            distinct = list({ex.example_id: ex for ex in examples}.values())
            scored: dict[str, torch.Tensor] = {}
            for chunk, slates in self._slate_logits(distinct):
                scored.update((ex.example_id, z.cpu()) for ex, z in zip(distinct[chunk], slates))
            return scored
        finally:
            self.train(was_training)

    def logits(self, examples: Sequence[Example], answers: Sequence[int]) -> torch.Tensor:
        """[N] D logits of (example, 1-based option) pairs, each scored within its whole slate."""
        scored = self.slate_logits(examples)
        return torch.stack([scored[ex.example_id][a - 1] for ex, a in zip(examples, answers)]) \
            if examples else torch.zeros(0)

    # ---- reward ----------------------------------------------------------------------------

    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> torch.Tensor:
        """[N] unweighted GAIL reward r(D) of each completion. Only a committed answer in the
        layout is paid r(D) of its option; a viewer completion that dodges (no parsable
        answer, or a broken layout) gets `reward_floor`, the least r(D) can pay, or under
        gail.dodge="worst_option" r(D) of its slate's worst option: not answering never beats
        answering. Non-viewer examples get 0 (not this reward's task)."""
        out = torch.zeros(len(completions), dtype=torch.float32)  # [N]
        viewer = [(i, ex, committed_answer(ex, text))
                  for i, (ex, text) in enumerate(zip(examples, completions, strict=True)) if ex.task == "viewer"]
        worst = self.gail.dodge == "worst_option"
        # Only the slates that pay something are run: those with a committed answer (all under worst_option).
        slates = self.slate_logits([ex for _, ex, answer in viewer if worst or answer is not None])
        rewards = {key: gail_reward(z, self.gail.reward, self.gail.reward_clip) for key, z in slates.items()}
        floor = reward_floor(self.gail.reward, self.gail.reward_clip)
        for i, ex, answer in viewer:
            if answer is not None:
                out[i] = rewards[ex.example_id][answer - 1]
            else:
                out[i] = rewards[ex.example_id].min() if worst else floor
        return out

    # ---- training ----------------------------------------------------------------------------

    def update(self, examples: Sequence[Example], completions: Sequence[str], rewards: RewardOutput) -> None:
        """D's update for one trainer step: `gail.disc_steps` AdamW steps on the human's
        choices (positives) vs the policy's parsed choices (negatives, plus replay).
        `rewards` scored these completions (with this reward as 'gail'). Collective: every
        rank calls it once per step with its own rollouts."""
        self._check_training(examples)
        if "gail" not in rewards.per_reward:
            raise ValueError("update: the rewards have no 'gail' entry; score the rollouts with the "
                             "RewardStack that holds this discriminator")
        self.stats.record_reward_share(self.weight * rewards.per_reward["gail"], rewards.total)
        if self.frozen:
            self.stats.add("frozen_skips", 1)
            return
        slots = [(ex, _parsed_answer(ex, text)) for ex, text in zip(examples, completions, strict=True)
                 if ex.task == "viewer"]
        examples, answers = [ex for ex, _ in slots], [a for _, a in slots]
        replayed = self._draw_replay(examples, answers)
        rows = training_rows(examples, answers, replayed, self._train, self.gail.negatives)
        self.stats.add("unparsed", answers.count(None))
        self.stats.add("negatives", rows.negatives)
        self.stats.add("replayed", len(replayed))
        slots_total, negatives_total = sum_over_ranks([rows.slots, rows.negatives])
        if negatives_total == 0:
            # Positives alone would only teach D "everything is human"; wait for policy choices.
            self.stats.add("skipped_updates", 1)
        else:
            self._train_steps(rows, slots_total, negatives_total)
        self._extend_replay(rows.fresh_negatives)
        self.observed += 1

    def _train_steps(self, rows: TrainingRows, slots: int, negatives: int) -> None:
        """gail.disc_steps AdamW steps on this step's rows; every rank takes each step."""
        weight, target = rows.loss_terms(slots, negatives, self.gail.label_smoothing)
        for step in range(self.gail.disc_steps):
            loss, logits = self._update(rows, weight, target)
            self.stats.add("loss_sum", loss)
            # The step's loss is the sum of the ranks' parts: count each step once.
            self.stats.add("loss_n", 1 if self.rank == 0 else 0)
            if step == 0:  # scores before D has trained on this batch: an honest accuracy
                self.stats.record_scores(logits, rows)

    def _update(self, rows: TrainingRows, weight: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One AdamW step on the gradient of the whole step's loss (summed over ranks);
        returns (this rank's part of the loss, its logits [R]). Each distinct state's slate
        is encoded once per step; its rows read their option's logit. A rank with no rows
        still joins the gradient sum."""
        self.train()
        self.optimizer.zero_grad(set_to_none=True)
        by_example: dict[str, list[int]] = {}
        for r, ex in enumerate(rows.examples):
            by_example.setdefault(ex.example_id, []).append(r)
        distinct = [rows.examples[r[0]] for r in by_example.values()]
        logits, loss_value = torch.zeros(len(rows.answers)), 0.0
        for chunk, slates in self._slate_logits(distinct):  # weighted sums: chunks add up
            index = [r for ex in distinct[chunk] for r in by_example[ex.example_id]]
            part = torch.stack([z[rows.answers[r] - 1] for ex, z in zip(distinct[chunk], slates)
                                for r in by_example[ex.example_id]])  # [rows of this chunk]
            loss = weighted_bce(part, target[index].to(part.device), weight[index].to(part.device))
            loss.backward()
            loss_value += float(loss.detach())
            logits[index] = part.detach().cpu()
        sum_gradients(self._trainable)
        self.optimizer.step()
        self.updates += 1
        return loss_value, logits

    def _draw_replay(self, examples: Sequence[Example], answers: Sequence[int | None]) -> list[tuple[str, int]]:
        """round(replay_ratio * fresh negatives) past negatives, uniformly without
        replacement, seeded by (seed, rank, update count) so a resumed run draws the same."""
        if self.gail.replay_size == 0 or not self.replay:
            return []
        fresh = sum(a is not None and (self.gail.negatives == "all" or a != ex.gold_index)
                    for ex, a in zip(examples, answers))
        count = min(len(self.replay), round(self.gail.replay_ratio * fresh))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + self.observed)
        return [self.replay[i] for i in torch.randperm(len(self.replay), generator=generator)[:count].tolist()]

    def _extend_replay(self, fresh: list[tuple[str, int]]) -> None:
        """Append every rank's fresh negatives (rank order) and keep the newest replay_size."""
        if self.gail.replay_size == 0:
            return
        gathered = [fresh]
        if world_size() > 1:
            gathered = gdist.all_gather_object(fresh)
        self.replay.extend(item for part in gathered for item in part)
        del self.replay[:max(0, len(self.replay) - self.gail.replay_size)]

    def _check_training(self, examples: Sequence[Example]) -> None:
        """Raise unless every example is one of the training examples D was built with."""
        for ex in {id(ex): ex for ex in examples}.values():
            known = self._train.get(ex.example_id)
            if known is None or (known is not ex and known != ex):
                raise ValueError(
                    f"discriminator.update got example {ex.example_id!r} (source {ex.source!r}), which is "
                    "not one of the training examples it was built with: D must never train on "
                    "evaluation data. Call update only with the training step's rollouts.")

    # ---- metrics and state ----------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The gail/* metrics since the last call, summed over ranks (collective: every rank
        calls it, each step), then reset. See `stats.summary` for their meaning."""
        summed = gdist.all_reduce(self.stats.vector().cpu())
        self.stats.reset()
        return stats.summary(summed, len(self.replay))

    def state_dict(self) -> dict:  # type: ignore[override]
        """Full training state as plain tensors/lists (CPU copies): weights, optimizer,
        replay buffer, counters. Identical on every rank, so rank 0's copy restores all."""
        return {
            "format": SAVE_FORMAT,
            "weights": cpu_copy(super().state_dict()),
            "optimizer": None if self.optimizer is None else cpu_copy(self.optimizer.state_dict()),
            "replay": [[example_id, answer] for example_id, answer in self.replay],
            "updates": self.updates,
            "observed": self.observed,
            "frozen": self.frozen,
            "freeze_encoder": self.gail.freeze_encoder,
        }

    def load_state_dict(self, state: dict) -> None:  # type: ignore[override]
        """Restore what `state_dict()` returned (on every rank)."""
        if state.get("format") != SAVE_FORMAT:
            raise ValueError(f"not a discriminator state (format {state.get('format')!r}, "
                             f"expected {SAVE_FORMAT!r})")
        if state["frozen"] != self.frozen:
            raise ValueError(f"discriminator state was saved with frozen={state['frozen']} but gail.frozen_path "
                             f"is {self.gail.frozen_path!r}; resume with the same gail settings")
        if state.get("freeze_encoder", False) != self.gail.freeze_encoder:
            raise ValueError(f"discriminator state was saved with gail.freeze_encoder={state.get('freeze_encoder', False)}"
                             f" but this run has {self.gail.freeze_encoder}; resume with the same gail settings")
        unknown = sorted({example_id for example_id, _ in state["replay"]} - set(self._train))
        if unknown:
            raise ValueError(f"discriminator state: {len(unknown)} replayed examples (e.g. {unknown[:3]}) are not "
                             "in this run's training data; resume with the same data settings")
        super().load_state_dict(state["weights"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(_as_groups(state["optimizer"], self.optimizer))
        self.replay = [(str(i), int(a)) for i, a in state["replay"]]
        self.updates, self.observed = int(state["updates"]), int(state["observed"])

    def save(self, path: str | os.PathLike) -> None:
        """Write D's weights to `path` (atomic) for `gail.frozen_path`; call on one rank."""
        tmp = f"{path}.tmp"
        weights = cpu_copy(super().state_dict())
        torch.save({"format": SAVE_FORMAT, "model": self.gail.model, "weights": weights}, tmp)
        os.replace(tmp, path)

    def _load_weights_file(self, path: str) -> None:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != SAVE_FORMAT:
            raise ValueError(f"gail.frozen_path={path!r} is not a file written by Discriminator.save (format "
                             f"{SAVE_FORMAT}; a v1 or v2 file holds an earlier D trained on other inputs: train a new one)")
        try:
            super().load_state_dict(saved["weights"])
        except RuntimeError as err:
            raise ValueError(f"gail.frozen_path={path!r} holds a discriminator on encoder {saved['model']!r}, "
                             f"which does not fit gail.model={self.gail.model!r}: {err}") from err

    def _check_training_inputs(self) -> None:
        """Fail fast on an option text too long for gail.max_tokens; log how often a state is cut."""
        viewer = [ex for ex in self._train.values() if ex.task == "viewer"]
        options = sorted({text for ex in viewer for text in ex.option_texts})
        largest = max((len(ex.option_texts) for ex in viewer), default=0)
        if largest > MAX_SHOWN_OPTIONS:
            raise ConfigError(f"a training slate has {largest} options; the discriminator reads positions "
                              f"1..{MAX_SHOWN_OPTIONS} (MAX_SHOWN_OPTIONS in grailcore/rewards/discriminator.py)")
        check_actions_fit(self.tokenizer, options, self.gail.max_tokens, ["a training option"] * len(options))
        sample = viewer[::max(1, len(viewer) // _TRUNCATION_SAMPLE)][:_TRUNCATION_SAMPLE]
        self.encode_slates(sample)
        rate = self.stats.values["truncated"] / max(1.0, self.stats.values["inputs"])
        self.stats.reset()
        if self.rank == 0:
            log.info("gail: the state is cut at gail.max_tokens=%d in %.1f%% of the (option, state) inputs of "
                     "%d sampled training slates", self.gail.max_tokens, 100 * rate, len(sample))


def _parsed_answer(example: Example, completion: str) -> int | None:
    """The completion's 1-based option, or None (unparsable, or not a viewer example)."""
    if example.task != "viewer" or not example.option_texts:
        return None
    return parse_viewer(completion, len(example.option_texts)).answer


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, H] mean of [B, T, H] over the positions where [B, T] mask is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@register_learned("gail", task="viewer")
def build_discriminator(cfg: Config, train_examples: Sequence[Example], dist: DistInfo | None = None,
                        weight: float = 1.0) -> Discriminator:
    """The trainer's discriminator: on `dist.device`, identical on every rank (rank 0's
    initial weights are broadcast), frozen when gail.frozen_path is set."""
    device = dist.device if dist is not None else torch.device("cpu")
    return Discriminator(cfg.gail, train_examples, device=device, seed=cfg.seed, weight=weight)


def _as_groups(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state with this optimizer's parameter groups: a state saved before
    the head had its own learning rate holds one group over the same parameters in the same
    order (encoder, then head); it is split at the encoder's size, each part taking this
    optimizer's hyper-parameters."""
    groups = optimizer.state_dict()["param_groups"]
    if len(saved["param_groups"]) == len(groups) or len(saved["param_groups"]) != 1:
        return saved
    ids, out, at = saved["param_groups"][0]["params"], [], 0
    for group in groups:
        out.append({**group, "params": ids[at:at + len(group["params"])]})
        at += len(group["params"])
    if at != len(ids):
        raise ValueError(f"discriminator optimizer state holds {len(ids)} parameters, this discriminator {at}")
    return {**saved, "param_groups": out}
