"""Tests of grailcore/data/options.py: reading option text into fields, and rendering a
slate again with one rule (fields only some options carry are dropped for all)."""

from __future__ import annotations

import json
from pathlib import Path

from grailcore.data.loaders import split_prompt
from grailcore.data.options import common_fields, parse_option_fields, render_option, unreadable

SEED_SAMPLE = Path(__file__).parent / "fixtures" / "audit_seed_prompts_sample.jsonl"
FULL = ("Fast Food CEO After Minimum Wage Increase (Waldorf Nation, 453s long) — Engagement: "
        "views 141,333, likes 2,609, comments 40")
BARE = "How the NRA hijacks gun control debates — Engagement: views 1,183,266, likes 36,035"


def test_fields_are_read_with_their_written_values():
    full = parse_option_fields(FULL)
    assert (full.title, full.channel, full.duration) == ("Fast Food CEO After Minimum Wage Increase",
                                                         "Waldorf Nation", "453s long")
    assert full.counts == (("views", "141,333"), ("likes", "2,609"), ("comments", "40"))
    assert full.carried() == ("channel", "duration", "views", "likes", "comments")
    assert full.count("views") == 141_333 and not full.unparsed
    bare = parse_option_fields(BARE)
    assert (bare.channel, bare.duration, bare.carried()) == (None, None, ("views", "likes"))
    # A comma inside a channel name stays in the channel; 'unknown' values carry nothing.
    odd = parse_option_fields("T (Fox News, Inc., channel, 6:22) — Engagement: views unknown, likes 3")
    assert (odd.channel, odd.duration) == ("Fox News, Inc., channel", "6:22")
    assert odd.carried() == ("channel", "duration", "likes") and odd.signature()[-1] == "views?"
    unknown = parse_option_fields("T (channel unknown, length unknown) — Engagement: views 5")
    assert unknown.carried() == ("views",)
    assert unknown.signature() == ("channel?", "duration?", "views")


def test_unreadable_text_is_reported_not_dropped():
    assert unreadable(parse_option_fields(FULL)) is None
    assert "not a 'name value' list" in unreadable(parse_option_fields("T — Engagement: views 5, lots of likes"))
    assert unreadable(parse_option_fields("(Chan, 30s long) — Engagement: views 5")) == "no title before its fields"
    assert "appear twice" in unreadable(parse_option_fields("T — Engagement: views 5, views 6"))


def test_rendering_with_every_field_reproduces_the_seed_text():
    rows = [json.loads(line) for line in SEED_SAMPLE.read_text().splitlines()]
    wage = [r for r in rows if r["issue"] == "minimum_wage"]
    for row in wage:  # every option rendered alike in the original: nothing to change
        _, options = split_prompt(row["prompt"], "x")
        slate = [parse_option_fields(text) for text in options]
        keep = common_fields(slate)
        assert keep == ("channel", "duration", "views", "likes", "comments")
        assert [render_option(fields, keep) for fields in slate] == list(options)


def test_a_field_only_some_options_carry_is_dropped_for_all():
    slate = [parse_option_fields(FULL), parse_option_fields(BARE)]
    keep = common_fields(slate)
    assert keep == ("views", "likes")
    rendered = [render_option(fields, keep) for fields in slate]
    assert rendered == ["Fast Food CEO After Minimum Wage Increase — Engagement: views 141,333, likes 2,609", BARE]
    assert len({parse_option_fields(text).signature() for text in rendered}) == 1


def test_a_bare_title_ending_in_parentheses_never_passes_for_a_channel():
    # The appended gold 'X (Full Segment)' parses as a channel-only parenthetical; beside
    # options with channel and duration the parenthetical is dropped for every option.
    slate = [parse_option_fields(t) for t in (
        "Gold video (Full Segment) — Engagement: views 10, likes 2",
        "Other video (Full Segment) (Civic Pulse, 361s long) — Engagement: views 30, likes 4, comments 1",
        "Third video (Policy Explained, 415s long) — Engagement: views 50, likes 6, comments 2")]
    keep = common_fields(slate)
    assert keep == ("views", "likes")
    rendered = [render_option(fields, keep) for fields in slate]
    assert rendered == ["Gold video — Engagement: views 10, likes 2", "Other video — Engagement: views 30, likes 4",
                        "Third video — Engagement: views 50, likes 6"]
    # Where every option shows the same fields in it, the parenthetical is kept.
    same = [parse_option_fields(FULL), parse_option_fields("B (Chan, 12s long) — Engagement: views 1, likes 1")]
    assert common_fields(same) == ("channel", "duration", "views", "likes")
