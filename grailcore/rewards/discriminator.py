"""GRAIL's discriminator D(state, action) -> P(the human made this choice), the learned
reward `gail`: trained on the policy's rollouts of training examples against the humans'
choices, it pays the policy r(D) for choices that look human, weighted by its entry in
rewards.weights like every other reward."""

from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
import torch.distributed as tdist
from torch import nn

from grailcore.config import Config, ConfigError, GailConfig
from grailcore.data.schema import Example
from grailcore.dist import DistInfo
from grailcore.model import resolve_model_path
from grailcore.rewards.gail import stats
from grailcore.rewards.gail.encoding import ActionTooLongError, check_actions_fit, encode_pairs
from grailcore.rewards.gail.objective import (TrainingRows, gail_reward, index_training_examples, training_rows,
                                              weighted_bce)
from grailcore.rewards.parsing import parse_viewer
from grailcore.rewards.registry import register_learned
from grailcore.types import RewardOutput

log = logging.getLogger(__name__)

SAVE_FORMAT = "grailcore-discriminator-v1"
_MICRO_ROWS = 16
"""Rows per encoder forward: bounds activation memory whatever the rollout batch size."""
_WEIGHT_DECAY = 0.01
"""AdamW's own default, written out so the optimizer has no hidden settings."""
_TRUNCATION_SAMPLE = 512
"""Training examples whose state truncation is measured and logged at build."""

__all__ = ["ActionTooLongError", "Discriminator", "SAVE_FORMAT", "build_discriminator", "gail_reward"]


def _world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


class Discriminator(nn.Module):
    """HF encoder (mean-pooled) + MLP head -> logit of P(human) for (action, state) text.

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
        self.rank = tdist.get_rank() if _world_size() > 1 else 0
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
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1))
        with torch.no_grad():
            self.head[0].weight.normal_(0.0, hidden ** -0.5, generator=torch.Generator().manual_seed(seed))
            self.head[0].bias.zero_()
            # Zero output layer: D = 0.5 everywhere at the start, so the first steps add
            # the same GAIL reward to every completion instead of random-init noise.
            self.head[2].weight.zero_()
            self.head[2].bias.zero_()
        self.to(self.device)
        self._broadcast_from_rank0()
        self.frozen = gail.frozen_path is not None
        if self.frozen:
            self._load_weights_file(gail.frozen_path)
            self.requires_grad_(False)
        self._trainable = [p for p in self.parameters() if p.requires_grad]
        self.optimizer = None if self.frozen else torch.optim.AdamW(
            self._trainable, lr=gail.lr, weight_decay=_WEIGHT_DECAY)
        self.replay: list[tuple[str, int]] = []
        """Past policy negatives as (example_id, option), the same on every rank, oldest first."""
        self.updates = 0
        """D optimizer steps taken."""
        self.observed = 0
        """Training update() calls (seeds the replay draw: a resumed run draws the same)."""
        self.stats = stats.StepStats()
        self._check_training_inputs()

    # ---- model ---------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """[B] logits of P(human) from [B, T] token ids."""
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # [B, H]
        return self.head(pooled).squeeze(-1)

    def encode(self, examples: Sequence[Example], answers: Sequence[int]) -> dict[str, torch.Tensor]:
        """Token tensors of (chosen option text, state text) pairs, ACTION FIRST, so
        truncation at gail.max_tokens can only cut the state's tail; counts truncations."""
        actions = [ex.option_texts[a - 1] for ex, a in zip(examples, answers)]
        where = [f"example {ex.example_id!r} option {a}" for ex, a in zip(examples, answers)]
        batch, truncated = encode_pairs(self.tokenizer, actions, [ex.state_text for ex in examples],
                                        self.gail.max_tokens, where)
        self.stats.add("inputs", len(truncated))
        self.stats.add("truncated", sum(truncated))
        return {k: v.to(self.device) for k, v in batch.items()}

    @torch.no_grad()
    def logits(self, examples: Sequence[Example], answers: Sequence[int]) -> torch.Tensor:
        """[N] D logits of (example, 1-based option) pairs, eval mode (no dropout)."""
        was_training = self.training
        self.eval()
        try:
            batch = self.encode(examples, answers)
            rows = batch["input_ids"].shape[0]
            return torch.cat([self(**{k: v[i:i + _MICRO_ROWS] for k, v in batch.items()}).float().cpu()
                              for i in range(0, rows, _MICRO_ROWS)])
        finally:
            self.train(was_training)

    # ---- reward ----------------------------------------------------------------------------

    def score(self, examples: Sequence[Example], completions: Sequence[str]) -> torch.Tensor:
        """[N] unweighted GAIL reward r(D) of each completion; 0 without a parsable answer
        (and for non-viewer examples)."""
        keys: dict[tuple[str, int], int] = {}
        pairs: list[tuple[Example, int]] = []
        slots: list[tuple[int, int]] = []  # (completion index, distinct pair index)
        for i, (ex, text) in enumerate(zip(examples, completions, strict=True)):
            answer = _parsed_answer(ex, text)
            if answer is None:
                continue
            key = (ex.example_id, answer)
            if key not in keys:  # a group often repeats a choice: one D forward per distinct input
                keys[key] = len(pairs)
                pairs.append((ex, answer))
            slots.append((i, keys[key]))
        out = torch.zeros(len(completions), dtype=torch.float32)  # [N]
        if pairs:
            values = gail_reward(self.logits(*zip(*pairs)), self.gail.reward, self.gail.reward_clip)
            index, pair = torch.tensor(slots).unbind(1)
            out[index] = values[pair]
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
        slots_total, negatives_total = self._sum_over_ranks([rows.slots, rows.negatives])
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
        batch = self.encode(rows.examples, rows.answers) if rows.answers else None
        for step in range(self.gail.disc_steps):
            loss, logits = self._update(batch, weight, target)
            self.stats.add("loss_sum", loss)
            # The step's loss is the sum of the ranks' parts: count each step once.
            self.stats.add("loss_n", 1 if self.rank == 0 else 0)
            if step == 0:  # scores before D has trained on this batch: an honest accuracy
                self.stats.record_scores(logits, rows)

    def _update(self, batch: dict[str, torch.Tensor] | None, weight: torch.Tensor,
                target: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One AdamW step on the gradient of the whole step's loss (summed over ranks);
        returns (this rank's part of the loss, its logits [R]). A rank with no rows still
        joins the gradient sum."""
        self.train()
        self.optimizer.zero_grad(set_to_none=True)
        logits, loss_value = [], 0.0
        for i in range(0, len(weight) if batch else 0, _MICRO_ROWS):  # weighted sums: chunks add up
            chunk = slice(i, i + _MICRO_ROWS)
            part = self(**{k: v[chunk] for k, v in batch.items()}).float()
            loss = weighted_bce(part, target[chunk].to(part.device), weight[chunk].to(part.device))
            loss.backward()
            loss_value += float(loss.detach())
            logits.append(part.detach().cpu())
        self._sum_gradients()
        self.optimizer.step()
        self.updates += 1
        return loss_value, torch.cat(logits) if logits else torch.zeros(0)

    def _sum_gradients(self) -> None:
        """Sum the ranks' gradients: each rank's loss is its part of the step's loss (the
        weights hold the global 1/N), so every rank takes the same step and D stays identical."""
        if _world_size() == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._trainable]
        flat = torch.cat([g.reshape(-1) for g in grads])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        offset = 0
        for p in self._trainable:
            p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _sum_over_ranks(self, values: list[int]) -> list[int]:
        if _world_size() == 1:
            return values
        summed = torch.tensor(values, dtype=torch.int64, device=self.device)
        tdist.all_reduce(summed, op=tdist.ReduceOp.SUM)
        return summed.tolist()

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
        if _world_size() > 1:
            gathered = [None] * _world_size()
            tdist.all_gather_object(gathered, fresh)
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
        summed = self.stats.vector().to(self.device)
        if _world_size() > 1:
            tdist.all_reduce(summed, op=tdist.ReduceOp.SUM)
        self.stats.reset()
        return stats.summary(summed.cpu(), len(self.replay))

    def state_dict(self) -> dict:  # type: ignore[override]
        """Full training state as plain tensors/lists (CPU copies): weights, optimizer,
        replay buffer, counters. Identical on every rank, so rank 0's copy restores all."""
        return {
            "format": SAVE_FORMAT,
            "weights": _cpu_copy(super().state_dict()),
            "optimizer": None if self.optimizer is None else _cpu_copy(self.optimizer.state_dict()),
            "replay": [[example_id, answer] for example_id, answer in self.replay],
            "updates": self.updates,
            "observed": self.observed,
            "frozen": self.frozen,
        }

    def load_state_dict(self, state: dict) -> None:  # type: ignore[override]
        """Restore what `state_dict()` returned (on every rank)."""
        if state.get("format") != SAVE_FORMAT:
            raise ValueError(f"not a discriminator state (format {state.get('format')!r}, "
                             f"expected {SAVE_FORMAT!r})")
        if state["frozen"] != self.frozen:
            raise ValueError(f"discriminator state was saved with frozen={state['frozen']} but gail.frozen_path "
                             f"is {self.gail.frozen_path!r}; resume with the same gail settings")
        unknown = sorted({example_id for example_id, _ in state["replay"]} - set(self._train))
        if unknown:
            raise ValueError(f"discriminator state: {len(unknown)} replayed examples (e.g. {unknown[:3]}) are not "
                             "in this run's training data; resume with the same data settings")
        super().load_state_dict(state["weights"])
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.replay = [(str(i), int(a)) for i, a in state["replay"]]
        self.updates, self.observed = int(state["updates"]), int(state["observed"])

    def save(self, path: str | os.PathLike) -> None:
        """Write D's weights to `path` (atomic) for `gail.frozen_path`; call on one rank."""
        tmp = f"{path}.tmp"
        weights = _cpu_copy(super().state_dict())
        torch.save({"format": SAVE_FORMAT, "model": self.gail.model, "weights": weights}, tmp)
        os.replace(tmp, path)

    def _load_weights_file(self, path: str) -> None:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != SAVE_FORMAT:
            raise ValueError(f"gail.frozen_path={path!r} is not a file written by Discriminator.save")
        try:
            super().load_state_dict(saved["weights"])
        except RuntimeError as err:
            raise ValueError(f"gail.frozen_path={path!r} holds a discriminator on encoder {saved['model']!r}, "
                             f"which does not fit gail.model={self.gail.model!r}: {err}") from err

    def _broadcast_from_rank0(self) -> None:
        if _world_size() > 1:
            for tensor in [*self.parameters(), *self.buffers()]:
                tdist.broadcast(tensor.data, src=0)

    def _check_training_inputs(self) -> None:
        """Fail fast on an option text too long for gail.max_tokens; log how often a state is cut."""
        viewer = [ex for ex in self._train.values() if ex.task == "viewer"]
        options = sorted({text for ex in viewer for text in ex.option_texts})
        check_actions_fit(self.tokenizer, options, self.gail.max_tokens, ["a training option"] * len(options))
        sample = viewer[::max(1, len(viewer) // _TRUNCATION_SAMPLE)][:_TRUNCATION_SAMPLE]
        self.encode(sample, [ex.gold_index for ex in sample])
        rate = self.stats.values["truncated"] / len(sample)
        self.stats.reset()
        if self.rank == 0:
            log.info("gail: the state is cut at gail.max_tokens=%d in %.1f%% of %d sampled training inputs",
                     self.gail.max_tokens, 100 * rate, len(sample))


def _parsed_answer(example: Example, completion: str) -> int | None:
    """The completion's 1-based option, or None (unparsable, or not a viewer example)."""
    if example.task != "viewer" or not example.option_texts:
        return None
    return parse_viewer(completion, len(example.option_texts)).answer


def _cpu_copy(obj):
    """Deep copy with tensors detached on CPU: later training must not mutate a saved state."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _cpu_copy(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


@register_learned("gail", task="viewer")
def build_discriminator(cfg: Config, train_examples: Sequence[Example], dist: DistInfo | None = None,
                        weight: float = 1.0) -> Discriminator:
    """The trainer's discriminator: on `dist.device`, identical on every rank (rank 0's
    initial weights are broadcast), frozen when gail.frozen_path is set."""
    device = dist.device if dist is not None else torch.device("cpu")
    return Discriminator(cfg.gail, train_examples, device=device, seed=cfg.seed, weight=weight)
