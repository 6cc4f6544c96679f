"""GRAIL discriminator, the learned `gail` reward: action-first inputs, learning (also a
choice that depends on the slate), rewards through the RewardStack, eval-data guard, state,
frozen mode and 2-rank sync. tiny-bert everywhere except the truncation test (MiniLM)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
import torch.multiprocessing as mp

from grailcore.config import Config, ConfigError, GailConfig, RewardsConfig
from grailcore.data.schema import Example
from grailcore.rewards import RewardStack, available_rewards, register
from grailcore.rewards.discriminator import ActionTooLongError, Discriminator, build_discriminator, gail_reward
from grailcore.rewards.gail.objective import training_rows
from grailcore.rollout.collect import Rollouts, collect_rollouts
from grailcore.types import Completion, SamplingParams
from grailcore.validation import validate

LEFT = ("Why gun control saves lives", "The case for gun control now", "Gun control explained by a doctor")
RIGHT = ("Why gun rights protect everyone", "The case for gun rights now", "Gun rights explained by a sheriff")


def lean_examples(n: int, seed: int, prefix: str = "ex") -> list[Example]:
    """Viewers lean left or right; the human picks the one option of their lean (of 4)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lean = rng.choice(["left", "right"])
        same, other = (LEFT, RIGHT) if lean == "left" else (RIGHT, LEFT)
        options = [rng.choice(same), *rng.sample(other, 3)]
        rng.shuffle(options)
        gold = next(k for k, text in enumerate(options, 1) if text in same)
        state = f"VIEWER supports gun {'control' if lean == 'left' else 'rights'}."
        out.append(Example(example_id=f"{prefix}{i}", task="viewer",
                           messages=({"role": "user", "content": state},), gold_index=gold, n_options=4,
                           option_texts=tuple(options), state_text=state, source="test"))
    return out


def answer(k: int | None) -> str:
    return "no answer here" if k is None else f"<think>t</think><answer>{k}</answer><opinion>increase</opinion>"


RULE = "test_rule_one"
if RULE not in available_rewards():
    register(RULE)(lambda example, completion: 1.0)  # a stand-in rule reward: 1 for every completion


def stack(d: Discriminator, rule_weight: float = 1.0) -> RewardStack:
    """The rule reward and d's `gail` reward in one table, d weighted as d.weight."""
    return RewardStack(RewardsConfig(names=(RULE, "gail"), weights=(rule_weight, d.weight)), {"gail": d})


def rollouts(d: Discriminator, examples: list[Example], answers: list[int | None]) -> Rollouts:
    """Rollouts of one completion per (example, answer) slot, scored through the stack holding d."""
    texts = [answer(a) for a in answers]
    rewards = stack(d)(examples, texts)
    completions = [Completion(text=t, token_ids=(1,), logprobs=None, finish_reason="stop") for t in texts]
    return Rollouts(examples=examples, prompt_ids=[[1]] * len(examples), completions=completions,
                    rewards=rewards, resampled_groups=0, resample_attempts=0)


def observe(d: Discriminator, batch: Rollouts) -> None:
    """d.update on a step's rollouts, as the trainer calls it."""
    d.update(batch.examples, [c.text for c in batch.completions], batch.rewards)


def random_policy_rollouts(d, train, rng, prompts=8, group_size=4) -> Rollouts:
    chosen = [ex for ex in rng.sample(train, prompts) for _ in range(group_size)]
    return rollouts(d, chosen, [rng.randint(1, 4) for _ in chosen])


def make(train, seed=0, weight=1.0, **gail) -> Discriminator:
    gail = {"model": "tiny-bert", "max_tokens": 64, "lr": 1e-3, **gail}
    return Discriminator(GailConfig(**gail), train, seed=seed, weight=weight)


def weights(d: Discriminator) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in d.state_dict()["weights"].items()}


# ---- inputs ------------------------------------------------------------------------------


def test_action_first_truncation_never_cuts_the_action_minilm():
    action = "Navy SEAL explains what universal background checks would really do (Metro News, 269s long)"
    short = Example(example_id="s", task="viewer", messages=({"role": "user", "content": "q"},), gold_index=1,
                    n_options=1, option_texts=(action,), state_text="VIEWER 56-year-old man.")
    long = short.replace(example_id="l", state_text="RECENTLY WATCHED " + "a long video title, " * 200)
    d = Discriminator(GailConfig(model="minilm-l6", max_tokens=48), [short, long])
    d.metrics()
    batch = d.encode_slates([short, long])  # one option each: one pair per slate
    action_ids = d.tokenizer(action, add_special_tokens=False)["input_ids"]
    ids = batch["input_ids"]
    assert ids.shape[1] == 48  # the long pair is cut to the budget
    for row in ids.tolist():  # [CLS] then the WHOLE action then [SEP], in both rows
        assert row[1:1 + len(action_ids)] == action_ids
        assert row[1 + len(action_ids)] == d.tokenizer.sep_token_id
    assert d.tokenizer.decode(ids[1]).count("long video title") >= 1  # the state's head survives
    assert d.metrics()["gail/truncation_rate"] == pytest.approx(0.5)
    assert d.logits([short, long], [1, 1]).shape == (2,)
    with pytest.raises(ActionTooLongError, match="gail.max_tokens=48"):
        d.encode_slates([short.replace(option_texts=(action * 3,))])


# ---- objective ----------------------------------------------------------------------------


def test_reward_transforms_on_known_logits_and_clipping():
    z = torch.tensor([-10.0, -1.0, 0.0, 2.0, 10.0])
    sig = [1 / (1 + math.exp(-v)) for v in z.tolist()]
    expected = {
        "d": sig,
        "log_d": [max(math.log(p), -5.0) for p in sig],
        "neg_log_1m_d": [min(-math.log(1 - p), 5.0) for p in sig],
        "logit": [-5.0, -1.0, 0.0, 2.0, 5.0],
    }
    for kind, values in expected.items():
        assert gail_reward(z, kind, clip=5.0).tolist() == pytest.approx(values, abs=1e-6), kind
    assert gail_reward(z, "log_d", clip=5.0)[0] == -5.0 and gail_reward(z, "neg_log_1m_d", clip=5.0)[-1] == 5.0
    with pytest.raises(ValueError, match="gail.reward"):
        gail_reward(z, "exp", clip=5.0)


def test_training_rows_weighting_for_both_negative_modes():
    ex = lean_examples(1, seed=0)[0]
    gold, other = ex.gold_index, ex.gold_index % 4 + 1
    index = {ex.example_id: ex}
    slots, answers = [ex] * 4, [gold, other, None, other]
    rows = training_rows(slots, answers, [], index, "differing")
    by = dict(zip(rows.answers, range(len(rows.answers))))
    assert set(by) == {gold, other} and rows.slots == 4 and rows.negatives == 2
    weight, target = rows.loss_terms(rows.slots, rows.negatives, 0.0)
    assert weight[by[gold]] == 0.5 and target[by[gold]] == 1.0  # a correct sample is no negative
    assert weight[by[other]] == 0.5 and target[by[other]] == 0.0
    assert rows.correct_count[by[gold]] == 1 and rows.differing_count[by[other]] == 2
    assert rows.fresh_negatives == [(ex.example_id, other)] * 2
    # Normalised by the whole step's counts (here: another rank with as many of each).
    assert rows.loss_terms(8, 4, 0.0)[0].tolist() == [0.25, 0.25]
    everything = training_rows(slots, answers, [(ex.example_id, other)], index, "all")
    by = dict(zip(everything.answers, range(len(everything.answers))))
    assert everything.negatives == 4  # 3 parsed fresh + 1 replayed
    weight, target = everything.loss_terms(everything.slots, everything.negatives, 0.0)
    assert weight[by[other]] == pytest.approx(0.5 * 3 / 4) and target[by[other]] == 0.0
    # The correct sample is one row: weight w_e + w_p, target w_e / (w_e + w_p).
    assert weight[by[gold]] == pytest.approx(0.5 + 0.5 / 4)
    assert target[by[gold]] == pytest.approx(0.5 / 0.625)
    smoothed = everything.loss_terms(everything.slots, everything.negatives, 0.2)[1]
    assert smoothed[by[other]] == pytest.approx(0.1)
    assert smoothed[by[gold]] == pytest.approx((0.5 * 0.9 + 0.125 * 0.1) / 0.625)
    # A replayed negative of another state brings that state's human choice back with it.
    past = lean_examples(2, seed=9, prefix="past")[1]
    past_other = past.gold_index % 4 + 1
    replayed = training_rows(slots, answers, [(past.example_id, past_other)] * 2, {**index, past.example_id: past}, "all")
    assert replayed.slots == 4 + 2 and replayed.negatives == 3 + 2
    rows = {(ex.example_id, a): k for k, (ex, a) in enumerate(zip(replayed.examples, replayed.answers))}
    assert replayed.expert_count[rows[past.example_id, past.gold_index]] == 2
    assert replayed.fresh_expert_count[rows[past.example_id, past.gold_index]] == 0  # metrics: this step's only
    assert replayed.fresh_expert_count.sum() == 4 == replayed.expert_count.sum() - 2
    assert replayed.policy_count[rows[past.example_id, past_other]] == 2
    weight, target = replayed.loss_terms(replayed.slots, replayed.negatives, 0.0)
    assert weight[rows[past.example_id, past.gold_index]] == pytest.approx(0.5 * 2 / 6)
    assert weight.sum() == pytest.approx(1.0)  # still 0.5 E_human + 0.5 E_policy


# ---- learning ------------------------------------------------------------------------------


def heldout_accuracy(d: Discriminator, examples: list[Example]) -> float:
    """Share of (human choice, a different option) pairs D ranks the right way round."""
    others = [ex.gold_index % 4 + 1 for ex in examples]
    human, policy = d.logits(examples, [ex.gold_index for ex in examples]), d.logits(examples, others)
    return float((human > policy).double().mean())


def test_discriminator_learns_to_separate_human_from_random_choices():
    torch.manual_seed(0)
    train, heldout = lean_examples(64, seed=1), lean_examples(64, seed=2, prefix="held")
    # Smoothing bounds the logits: this data is separable, and unbounded logits make Adam wander.
    d, rng = make(train, lr=2e-3, disc_steps=3, label_smoothing=0.1), random.Random(0)
    assert heldout_accuracy(d, heldout) == 0.0  # logits all 0 at the start: no pair ranked right
    for _ in range(12):
        d.metrics()
        observe(d, random_policy_rollouts(d, train, rng))
    last = d.metrics()
    assert heldout_accuracy(d, heldout) >= 0.9
    # Only an interaction of state and action separates them: every viewer's human choice
    # and random choices use the same titles, just with the other lean's viewers.
    assert last["gail/p_human_expert"] > last["gail/p_human_policy"] + 0.2
    assert (last["gail/d_acc_expert"] + last["gail/d_acc_policy"]) / 2 > 0.75
    human = d.score(heldout, [answer(ex.gold_index) for ex in heldout])
    other = d.score(heldout, [answer(ex.gold_index % 4 + 1) for ex in heldout])
    assert human.mean() > other.mean() + 1.0  # the reward pays human-like choices more


RIGHT4 = (*RIGHT, "Why gun rights matter to hunters")


def left_if_offered_examples(n: int, seed: int, prefix: str = "slate") -> list[Example]:
    """The person picks a gun-control title when the slate offers one (1 or 2 of 4), and any
    title of an all gun-rights slate (half the slates). The same gun-rights title is thus
    never chosen beside a gun-control one and chosen 1 time in 4 without one: its GAIL
    ratio against a uniform chooser depends on its alternatives only, which a slate-blind
    D cannot see."""
    rng = random.Random(seed)
    state = "VIEWER supports gun control."
    out = []
    for i in range(n):
        left = rng.choice([0, 0, 1, 2])
        options = [*rng.sample(LEFT, left), *rng.sample(RIGHT4, 4 - left)]
        rng.shuffle(options)
        chosen = [k for k, text in enumerate(options, 1) if text in LEFT] or [1, 2, 3, 4]
        out.append(Example(example_id=f"{prefix}{i}", task="viewer", messages=({"role": "user", "content": state},),
                           gold_index=rng.choice(chosen), n_options=4, option_texts=tuple(options), state_text=state,
                           source="test"))
    return out


def test_slate_aware_d_pays_an_option_relative_to_its_alternatives():
    torch.manual_seed(0)
    train, heldout = left_if_offered_examples(64, seed=4), left_if_offered_examples(128, seed=5, prefix="held")
    d = make(train, lr=2e-3, disc_steps=3, label_smoothing=0.1, negatives="all")
    rng = random.Random(0)
    for _ in range(16):
        observe(d, random_policy_rollouts(d, train, rng))
    mixed = [ex for ex in heldout if any(text in LEFT for text in ex.option_texts)]
    others = [next(k for k, text in enumerate(ex.option_texts, 1) if text in RIGHT4) for ex in mixed]
    human = d.score(mixed, [answer(ex.gold_index) for ex in mixed])
    assert (human > d.score(mixed, [answer(k) for k in others])).double().mean() >= 0.9
    # The same title for the same viewer, only its alternatives differ: paid more where it
    # is as good a pick as any (no gun-control title offered) than beside a gun-control one.
    base = heldout[0]
    alone = base.replace(example_id="alone", option_texts=RIGHT4)
    beside = base.replace(example_id="beside", option_texts=(RIGHT4[0], LEFT[0], RIGHT4[1], RIGHT4[2]))
    alone_reward, beside_reward = d.score([alone, beside], [answer(1), answer(1)]).tolist()
    assert alone_reward > beside_reward + 1.0, (alone_reward, beside_reward)


def _position_habit(lr: float, head_lr: float, **gail) -> tuple[torch.Tensor, torch.Tensor, Discriminator]:
    """D trained on people (uniform positions) vs a policy that always answers 3; its scores
    of held-out titles shown third, and of the same titles moved to first place; and D."""
    torch.manual_seed(0)
    rng = random.Random(6)
    titles = (*LEFT, *RIGHT4)

    def examples(n, prefix):
        return [Example(example_id=f"{prefix}{i}", task="viewer", messages=({"role": "user", "content": "VIEWER"},),
                        gold_index=rng.randint(1, 4), n_options=4, option_texts=tuple(rng.sample(titles, 4)),
                        state_text="VIEWER watches gun videos.", source="test") for i in range(n)]

    train, heldout = examples(64, "pos"), examples(64, "held")
    d = make(train, lr=lr, head_lr=head_lr, **{"disc_steps": 3, "label_smoothing": 0.1, **gail})
    for _ in range(12):
        chosen = [ex for ex in rng.sample(train, 8) for _ in range(4)]
        observe(d, rollouts(d, chosen, [3] * len(chosen)))
    # The same title in the same slate, shown third or moved to first place: only its position differs.
    third = d.score(heldout, [answer(3)] * len(heldout))
    moved = [ex.replace(option_texts=(ex.option_texts[2], ex.option_texts[1], ex.option_texts[0], ex.option_texts[3]))
             for ex in heldout]
    return third, d.score(moved, [answer(1)] * len(moved)), d


def test_d_sees_where_an_option_was_shown_and_catches_a_position_habit():
    """People pick by content, in whatever order they were shown (here: any option, so their
    positions are uniform); the policy always answers 3. Content alone cannot tell the two
    apart (both pick a random title of the slate): only the shown number can, and D must
    learn to pay the position habit less (a D blind to the order stays at chance here)."""
    third, first, _ = _position_habit(lr=2e-3, head_lr=2e-3)
    assert (third < first).double().mean() >= 0.9
    assert first.mean() > third.mean() + 0.25  # a blind D: equal up to float noise


def test_the_head_learns_at_its_own_rate_where_the_encoders_rate_leaves_d_at_chance():
    """The encoder fine-tuned at a pretrained model's rate (1e-4): with the head at that rate
    too D barely leaves 0.5 in the steps of a CPU run (as in the demo's GRAIL arms); at
    gail.head_lr (default 3e-3) it catches the position habit in the same steps."""
    slow_third, slow_first, _ = _position_habit(lr=1e-4, head_lr=1e-4)
    third, first, _ = _position_habit(lr=1e-4, head_lr=GailConfig().head_lr)
    assert (third < first).double().mean() >= 0.9 and first.mean() > third.mean() + 0.25
    assert slow_first.mean() - slow_third.mean() < 0.5 * (first.mean() - third.mean())


def test_a_frozen_encoder_encodes_each_slate_once_and_its_head_still_catches_a_position_habit():
    """gail.freeze_encoder: the encoder never changes and runs once per distinct slate (its
    features are kept), the head alone learns, and it still sees where an option was shown."""
    pairs = []
    pretrained = weights(make(lean_examples(4, seed=0)))
    with pytest.MonkeyPatch.context() as patch:
        forward = Discriminator.features
        patch.setattr(Discriminator, "features",
                      lambda self, input_ids, *a, **k: pairs.append(len(input_ids)) or forward(self, input_ids, *a, **k))
        third, first, d = _position_habit(lr=2e-3, head_lr=3e-3, freeze_encoder=True)
    assert (third < first).double().mean() >= 0.9 and first.mean() > third.mean() + 0.25
    encoder = {k: v for k, v in weights(d).items() if k.startswith("encoder.")}
    assert encoder and all(torch.equal(v, pretrained[k]) for k, v in encoder.items())
    assert not torch.equal(weights(d)["head.2.weight"], pretrained["head.2.weight"])
    # one encoder pass per distinct (example, slate): the training slates D saw, then 64
    # held-out ones and the same 64 re-ordered (another input); 12 steps x 3 D steps re-read them
    assert len(pairs) == len(d._features) and set(pairs) == {4}
    assert 64 + 64 < len(pairs) <= 64 + 64 + 64
    assert d.optimizer is not None and len(d.optimizer.param_groups) == 1  # the head's


# ---- rewards -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_examples():
    return lean_examples(16, seed=3)


def test_stack_adds_the_weighted_gail_reward_and_dodging_gets_the_floor(train_examples):
    d = make(train_examples, reward="logit", weight=0.5, reward_clip=1.5)
    with torch.no_grad():
        d.head[2].bias.fill_(2.0)  # D logit = 2 for every input (output weights are zero at init)
    exs = train_examples[:4]
    texts = [answer(1), answer(None), "<answer>9</answer>", answer(3)]
    out = stack(d)(exs, texts)
    # clipped 2 -> 1.5; no committed answer -> the floor of logit's range, -clip
    assert out.per_reward["gail"].tolist() == [1.5, -1.5, -1.5, 1.5]
    assert out.total.tolist() == [1.75, 0.25, 0.25, 1.75]
    assert out.per_reward[RULE].tolist() == [1.0] * 4 and out.errors["gail"] == 0
    rules_only = stack(d)(exs, texts, learned=False)  # evaluation: the discriminator is not run
    assert set(rules_only.per_reward) == {RULE} and rules_only.total.tolist() == [1.0] * 4
    d_kind = make(train_examples, reward="d", weight=1.0)
    assert stack(d_kind)(exs, texts).per_reward["gail"].tolist() == [0.5, 0.0, 0.0, 0.5]  # d's floor is 0
    math_ex = Example(example_id="m", task="math", messages=({"role": "user", "content": "1+1"},), answer="2")
    assert d.score([math_ex], ["<answer>2</answer>"]).tolist() == [0.0]  # not its task: no floor either
    with pytest.raises(ValueError, match="twice"):
        RewardStack(RewardsConfig(names=("gail", "gail"), weights=(1.0, 1.0)), {"gail": d})


def test_dodge_worst_option_pays_a_dodge_its_slates_least_human_option(train_examples):
    """gail.dodge="worst_option": a dodge gets r(D) of its own slate's worst option (never more
    than any committed answer to that prompt), not the bottom of r(D)'s range."""
    d = make(train_examples, reward="logit", reward_clip=5.0, dodge="worst_option")
    hidden = d.encoder.config.hidden_size
    with torch.no_grad():  # logit = GELU(c_k) for the option shown at k: set by position alone
        d.head[0].weight.zero_()
        d.head[0].bias.zero_()
        d.head[0].weight[0, 2 * hidden:2 * hidden + 4] = torch.tensor([1.0, 3.0, 2.0, 4.0])
        d.head[2].weight[0, 0] = 1.0
    by_position = torch.nn.functional.gelu(torch.tensor([1.0, 3.0, 2.0, 4.0])).tolist()
    exs = train_examples[:2]
    texts = [answer(2), answer(None), "<answer>9</answer>", answer(4)]
    scores = d.score([exs[0], exs[0], exs[1], exs[1]], texts)
    assert scores.tolist() == pytest.approx([by_position[1], by_position[0], by_position[0], by_position[3]], abs=1e-5)
    floor = make(train_examples, reward="logit", reward_clip=5.0)
    floor.load_state_dict(d.state_dict())
    assert floor.score([exs[0], exs[0]], texts[:2]).tolist() == pytest.approx([by_position[1], -5.0], abs=1e-5)


def test_a_direct_layout_answer_is_paid_and_a_think_block_under_it_is_a_dodge(train_examples):
    """D reads a completion in its example's own layout (data.layout): under 'direct' an
    answer without <think> is committed, and one with a <think> block breaks the layout."""
    d = make(train_examples, reward="logit", reward_clip=1.5)
    with torch.no_grad():
        d.head[2].bias.fill_(2.0)  # D logit = 2 for every input: a committed answer is paid 1.5
    direct = [dataclasses.replace(ex, meta={**ex.meta, "layout": "direct"}) for ex in train_examples[:2]]
    texts = ["<answer>2</answer><opinion>increase</opinion>", answer(2)]
    assert d.score(direct, texts).tolist() == [1.5, -1.5]
    assert d.score(train_examples[:2], texts).tolist() == [-1.5, 1.5]  # the think layout: the reverse


class FixedEngine:
    """A rollout engine whose group g answers option g % 4 + 1 (no model needed)."""

    def generate(self, prompt_ids, params):
        return [[Completion(text=answer(g % 4 + 1), token_ids=(1,), logprobs=None, finish_reason="stop")
                 for g in range(params.n)] for _ in prompt_ids]


def test_trainer_seam_collect_rollouts_then_update(train_examples):
    """The trainer's path: the reward stack (rule + D) -> collect_rollouts -> update -> metrics."""
    d = make(train_examples, reward="d", weight=2.0)
    scorer = RewardStack(RewardsConfig(names=("option_accuracy", "gail"), weights=(1.0, 2.0)), {"gail": d})
    prompts = train_examples[:2]
    out = collect_rollouts(FixedEngine(), prompts, [[1]] * 2, SamplingParams(n=4), scorer)
    right = torch.tensor([float(g % 4 + 1 == ex.gold_index) for ex in prompts for g in range(4)])
    assert out.rewards.per_reward["option_accuracy"].tolist() == right.tolist()
    assert out.rewards.total.tolist() == (right + 2.0 * 0.5).tolist()  # D = 0.5 before any update
    observe(d, out)
    m = d.metrics()
    assert d.updates == 1 and m["gail/negatives"] == 6 and m["gail/unparsed"] == 0  # 2 of 8 right
    assert m["gail/reward_share"] == pytest.approx(8.0 / (8.0 + 2.0))  # |gail| 8 x 1.0, |rule| 2
    assert m["gail/p_human_correct"] == 0.5 and m["gail/d_acc_expert"] == 0.0  # scored before the step


def test_update_refuses_examples_it_was_not_built_with(train_examples):
    d = make(train_examples)
    evaluation = lean_examples(2, seed=9, prefix="eval")
    with pytest.raises(ValueError, match="never train on evaluation data"):
        observe(d, rollouts(d, [train_examples[0], evaluation[0]], [1, 1]))
    same_id = train_examples[1].replace(state_text="another viewer")
    with pytest.raises(ValueError, match="not one of the training examples"):
        observe(d, rollouts(d, [same_id], [1]))
    observe(d, rollouts(d, train_examples[:2], [1, 2]))  # training examples pass


def test_no_update_without_any_policy_choice(train_examples):
    d = make(train_examples)
    before = weights(d)
    observe(d, rollouts(d, train_examples[:4], [None] * 4))  # positives alone teach nothing
    assert all(torch.equal(before[k], v) for k, v in weights(d).items())
    m = d.metrics()
    assert m["gail/skipped_updates"] == 1 and m["gail/unparsed"] == 4 and d.updates == 0
    observe(d, rollouts(d, train_examples[:4], [None, 1, 2, 3]))
    assert d.updates == 1 and d.metrics()["gail/skipped_updates"] == 0


def test_build_rejects_non_viewer_data_and_bad_settings(train_examples):
    math_ex = Example(example_id="m", task="math", messages=({"role": "user", "content": "1+1"},), answer="2")
    with pytest.raises(ConfigError, match="viewer examples"):
        make([math_ex])
    with pytest.raises(ConfigError, match="gail.reward_clip"):  # checked before anything is built
        validate(Config(gail=GailConfig(reward_clip=0.0)))
    with pytest.raises(ConfigError, match="positions"):
        make(train_examples, max_tokens=4096)


# ---- state ---------------------------------------------------------------------------------


def test_state_dict_round_trip_restores_outputs_optimizer_and_replay(train_examples, tmp_path):
    rng = random.Random(1)
    d = make(train_examples, replay_size=12, replay_ratio=0.5, disc_steps=2)
    for _ in range(3):
        observe(d, random_policy_rollouts(d, train_examples, rng, prompts=4))
    assert len(d.replay) == 12 and d.metrics()["gail/replayed"] > 0
    torch.save(d.state_dict(), tmp_path / "d.pt")
    state = torch.load(tmp_path / "d.pt", weights_only=True)  # plain tensors/lists only
    restored = make(train_examples, replay_size=12, replay_ratio=0.5, disc_steps=2)
    assert not torch.equal(restored.logits(train_examples, [1] * 16), d.logits(train_examples, [1] * 16))
    restored.load_state_dict(state)
    probe = [ex.gold_index for ex in train_examples]
    assert torch.equal(restored.logits(train_examples, probe), d.logits(train_examples, probe))
    assert restored.replay == d.replay and restored.updates == d.updates == 6
    for a, b in zip(d.optimizer.state.values(), restored.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # The same next step from both ends bit-identical: weights, moments, step count and
    # replay draw were all restored (dropout RNG reset to the same seed for both).
    batch = random_policy_rollouts(d, train_examples, rng, prompts=4)
    for model in (d, restored):
        torch.manual_seed(7)
        observe(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(weights(d).values(), weights(restored).values()))


def test_a_frozen_encoders_state_round_trips_and_refuses_a_run_that_trains_its_encoder(train_examples):
    rng = random.Random(4)
    d = make(train_examples, freeze_encoder=True, disc_steps=2, replay_size=8)
    for _ in range(2):
        observe(d, random_policy_rollouts(d, train_examples, rng, prompts=4))
    state = d.state_dict()
    restored = make(train_examples, freeze_encoder=True, disc_steps=2, replay_size=8)
    restored.load_state_dict(state)
    batch = random_policy_rollouts(d, train_examples, rng, prompts=4)
    for model in (d, restored):  # kept features are recomputed by the restored D: the same next step
        observe(model, batch)
    assert all(torch.equal(a, b) for a, b in zip(weights(d).values(), weights(restored).values()))
    with pytest.raises(ValueError, match="gail.freeze_encoder=True but this run has False"):
        make(train_examples, disc_steps=2, replay_size=8).load_state_dict(state)


def test_an_optimizer_state_of_one_group_loads_into_the_encoder_and_head_groups(train_examples):
    """Checkpoints written before gail.head_lr hold one AdamW group (encoder, then head)."""
    rng = random.Random(3)
    d = make(train_examples, disc_steps=2)
    observe(d, random_policy_rollouts(d, train_examples, rng, prompts=4))
    state = d.state_dict()
    groups = state["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [d.gail.lr, d.gail.head_lr]
    one = {**groups[0], "params": [i for g in groups for i in g["params"]]}
    restored = make(train_examples, disc_steps=2)
    restored.load_state_dict({**state, "optimizer": {**state["optimizer"], "param_groups": [one]}})
    assert [g["lr"] for g in restored.optimizer.param_groups] == [d.gail.lr, d.gail.head_lr]
    for a, b in zip(d.optimizer.state.values(), restored.optimizer.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_frozen_discriminator_never_changes(train_examples, tmp_path):
    rng = random.Random(2)
    trained = make(train_examples)
    observe(trained, random_policy_rollouts(trained, train_examples, rng, prompts=4))
    trained.save(tmp_path / "d.pt")
    frozen = make(train_examples, seed=3, frozen_path=str(tmp_path / "d.pt"))
    before = weights(frozen)
    assert all(torch.equal(before[k], v) for k, v in weights(trained).items())
    for _ in range(3):
        observe(frozen, random_policy_rollouts(frozen, train_examples, rng, prompts=4))
        observe(trained, random_policy_rollouts(trained, train_examples, rng, prompts=4))
    assert all(torch.equal(before[k], v) for k, v in weights(frozen).items())
    assert not all(torch.equal(before[k], v) for k, v in weights(trained).items())  # same calls do train
    m = frozen.metrics()
    assert m["gail/frozen_skips"] == 3 and math.isnan(m["gail/d_loss"]) and frozen.optimizer is None
    with pytest.raises(ValueError, match="not a file written by Discriminator.save"):
        torch.save({"x": 1}, tmp_path / "bad.pt")
        make(train_examples, frozen_path=str(tmp_path / "bad.pt"))


# ---- distributed ---------------------------------------------------------------------------


def _rank_main(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(rank)
    train = lean_examples(16, seed=3)
    cfg = Config(seed=rank, gail=GailConfig(model="tiny-bert", max_tokens=64, lr=1e-3,
                                            replay_size=8))  # seed differs per rank: the broadcast must fix it
    d = build_discriminator(cfg, train)
    initial = weights(d)
    rng = random.Random(100 + rank)  # each rank trains on its own rollouts
    for _ in range(3):
        observe(d, random_policy_rollouts(d, train, rng, prompts=4))
    torch.save({"initial": initial, "final": weights(d), "replay": d.replay, "metrics": d.metrics()},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_hold_bit_identical_weights(tmp_path):
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(r0["initial"][k], r1["initial"][k]) for k in r0["initial"])
    assert all(torch.equal(r0["final"][k], r1["final"][k]) for k in r0["final"])
    assert not all(torch.equal(r0["initial"][k], r0["final"][k]) for k in r0["final"])
    assert r0["replay"] == r1["replay"] and len(r0["replay"]) == 8
    assert r0["metrics"]["gail/negatives"] == r1["metrics"]["gail/negatives"] > 0  # summed over ranks
