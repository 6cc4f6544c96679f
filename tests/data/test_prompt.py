"""Prompt rendering: the seed format, no post-decision information, seeded shuffling, chat encoding."""

import dataclasses
import re
from collections import Counter, defaultdict

import pytest

from grailcore.data.prompt import DEFAULT_SYSTEM_PROMPT, DIRECT_SYSTEM_PROMPT, build_example, encode_prompt, option_text
from grailcore.data.schema import Video, WatchedVideo
from grailcore.data.synth import generate_study

COUNT = r"(?:[\d,]+|unknown)"
OPTION_SHAPE = rf".+ \([^()]+, [^()]+\) — Engagement: views {COUNT}, likes {COUNT}, comments {COUNT}"
OPTION_LINE = re.compile(rf"^\d+\. {OPTION_SHAPE}$")
HISTORY_LINE = re.compile(r"^\d+\. .+ \(watched \d+s of \d+s \(\d+% complete\), from .+\)$")
SECTIONS = ("VIEWER ", "Initial Viewpoint: ", "CURRENTLY WATCHING ", "RECENTLY WATCHED (NEWEST LAST)",
            "SURVEY HIGHLIGHTS", "OPTIONS", "QUESTIONS")


@pytest.fixture(scope="module")
def study():
    return generate_study("gun_control", 2400, seed=0)


def test_sections_and_lines_follow_the_seed_format(study):
    d = next(d for d in study if len(d.history) >= 2)
    ex = build_example(d)
    prompt = ex.prompt
    positions = [prompt.index(s) for s in SECTIONS]
    assert positions == sorted(positions) and positions[0] == 0
    lines = prompt.splitlines()
    options = lines[lines.index("OPTIONS") + 1: lines.index("QUESTIONS") - 1]
    assert len(options) == d.n_options and all(OPTION_LINE.match(o) for o in options), options
    history = lines[lines.index("RECENTLY WATCHED (NEWEST LAST)") + 1: lines.index("SURVEY HIGHLIGHTS") - 1]
    assert len(history) == len(d.history) and all(HISTORY_LINE.match(h) for h in history), history
    assert prompt.endswith("will the viewer's opinion on Gun control increase, decrease, or stay the same?")
    assert re.match(r"VIEWER \d+-year-old, .+; .+\.$", lines[0])
    assert ex.state_text == prompt[: prompt.index("\n\nOPTIONS")]
    assert [f"{k}. {t}" for k, t in enumerate(ex.option_texts, 1)] == options
    assert ex.messages[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
    assert "<answer>k</answer><opinion>increase|decrease|no_change</opinion>" in DEFAULT_SYSTEM_PROMPT
    assert build_example(d, system_prompt="Be brief.").messages[0]["content"] == "Be brief."
    assert ex.meta["layout"] == "think"
    direct = build_example(d, layout="direct")
    assert direct.messages[0]["content"] == DIRECT_SYSTEM_PROMPT and direct.meta["layout"] == "direct"
    assert "<think>" not in DIRECT_SYSTEM_PROMPT and "<answer>k</answer><opinion>" in DIRECT_SYSTEM_PROMPT
    assert direct.messages[1] == ex.messages[1]  # the same user prompt


def test_no_information_from_after_the_decision(study):
    sessions = defaultdict(list)
    for d in study:
        sessions[d.session_id].append(d)
    checked = 0
    for steps in sessions.values():
        first_state = build_example(steps[0], max_history=0).state_text
        for t, d in enumerate(steps):
            state = build_example(d, max_history=0).state_text
            # chosen now or later: neither currently watched nor in the history
            for later in steps[t:]:
                chosen = later.slate[later.gold_index - 1]
                assert f". {chosen.title} (watched" not in state
                assert f"CURRENTLY WATCHING {chosen.title} (from" not in state
                checked += 1
            # viewer and survey are pre-treatment: identical at every step of the session
            assert state.split("\n\nCURRENTLY")[0] == first_state.split("\n\nCURRENTLY")[0]
            assert state.split("SURVEY HIGHLIGHTS")[1] == first_state.split("SURVEY HIGHLIGHTS")[1]
            assert f"{round(steps[0].opinion_before * 100)}%" in state
    assert checked > 2000


def test_max_history_keeps_the_newest_last(study):
    d = next(d for d in study if len(d.history) >= 4)
    shown = build_example(d, max_history=2).state_text
    history = shown.split("RECENTLY WATCHED (NEWEST LAST)\n")[1].split("\n\n")[0].splitlines()
    assert [h.split(" (watched")[0] for h in history] == [f"{i}. {w.video.title}" for i, w in
                                                          enumerate(d.history[-2:], 1)]
    everything = build_example(d, max_history=0).state_text
    assert all(f". {w.video.title} (watched" in everything for w in d.history)
    empty = dataclasses.replace(d, history=())
    assert "RECENTLY WATCHED (NEWEST LAST)\n(none yet)" in build_example(empty).prompt


def test_shuffle_remaps_gold_and_probabilities(study):
    for d in study[:300]:
        ex = build_example(d, seed=4)
        order = ex.meta["shown_order"]
        assert sorted(order) == list(range(d.n_options))
        assert ex.option_texts[ex.gold_index - 1] == option_text(d.slate[d.gold_index - 1])
        for k, stored in enumerate(order):
            assert ex.option_texts[k] == option_text(d.slate[stored])
            assert ex.true_choice_probs[k] == d.true_choice_probs[stored]
        assert build_example(d, seed=4) == ex, "the order must be stable for a row"
    unshuffled = build_example(study[0], shuffle_options=False)
    assert unshuffled.gold_index == study[0].gold_index and unshuffled.meta["shown_order"] == tuple(range(study[0].n_options))
    orders = {tuple(build_example(d, seed=s).meta["shown_order"]) for d in study[:1] for s in range(20)}
    assert len(orders) > 5, "the seed must change the order"


def test_shuffled_gold_position_is_uniform(study):
    # The stored order carries a primacy bias (gold over-represented at 1); shown positions must not.
    four = [d for d in study if d.n_options == 4]
    shown = Counter(build_example(d).gold_index for d in four)
    stored = Counter(d.gold_index for d in four)
    n = len(four)
    assert all(abs(shown[k] / n - 0.25) < 0.035 for k in range(1, 5)), shown
    assert stored[1] + stored[2] > stored[3] + stored[4] + 0.05 * n, "the stored order's primacy bias"
    moved = sum(build_example(d).gold_index != d.gold_index for d in four) / n
    assert 0.68 < moved < 0.82, "a uniform shuffle moves the gold of a 4-option slate 3 times in 4"


def test_every_option_is_rendered_the_same_way_even_with_missing_fields(study):
    d = study[0]
    bare = Video(video_id="zz", title="Gun Laws Explained")
    d = dataclasses.replace(d, slate=(bare,) + d.slate[1:], history=(WatchedVideo(bare),))
    ex = build_example(d, shuffle_options=False)
    assert ex.option_texts[0] == ("Gun Laws Explained (channel unknown, length unknown) — Engagement: "
                                  "views unknown, likes unknown, comments unknown")
    assert all(re.fullmatch(OPTION_SHAPE, t) for t in ex.option_texts), ex.option_texts
    assert "1. Gun Laws Explained (watch time unknown, from channel unknown)" in ex.state_text
    with_ids = build_example(d, shuffle_options=False, show_ids=True)
    assert all(f"[id {v.video_id}]" in t for v, t in zip(d.slate, with_ids.option_texts))


class _NoTemplate:
    chat_template = None
    name_or_path = "plain-tokenizer"


def test_encode_prompt_without_chat_template_says_what_to_do(study):
    with pytest.raises(ValueError, match="has no chat template.*set `tokenizer.chat_template`"):
        encode_prompt(_NoTemplate(), build_example(study[0]))


def test_encode_prompt_applies_the_chat_template(study):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ex = build_example(study[0])
    template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    splitter = pre_tokenizers.WhitespaceSplit()
    words = {w for m in ex.messages for w, _ in splitter.pre_tokenize_str(m["content"])}
    vocab = {w: i for i, w in enumerate(sorted(words | {"[UNK]", "<|system|>", "<|user|>", "<|assistant|>"}))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = splitter
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = template
    ids = encode_prompt(tokenizer, ex)
    assert all(isinstance(i, int) for i in ids)
    assert ids[-1] == vocab["<|assistant|>"]
    assert vocab["[UNK]"] not in ids
    assert tokenizer.decode(ids).split() == (f"<|system|> {ex.messages[0]['content']} <|user|> {ex.prompt} "
                                             "<|assistant|>").split()


def test_encode_prompt_with_smollm2_tokenizer(study):
    try:
        from grailcore.model import ModelNotFoundError, load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
    except (ImportError, ModelNotFoundError) as err:
        pytest.skip(f"SmolLM2 tokenizer unavailable ({err}); run `python -m grailcore.model prepare`")
    ex = build_example(study[0])
    text = tokenizer.decode(encode_prompt(tokenizer, ex))
    assert text.startswith("<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT)
    assert f"<|im_start|>user\n{ex.prompt}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
