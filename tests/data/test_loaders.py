"""load_examples over every accepted input, malformed rows (errors and skip mode), and caps."""

import json
import re
from pathlib import Path

import pytest

from grailcore.config import DataConfig
from grailcore.data import LoadResult, load_examples
from grailcore.data.prompt import DEFAULT_SYSTEM_PROMPT
from grailcore.data.schema import SchemaError, decision_to_dict
from grailcore.data.synth import generate_study, write_study

# The repo's copy of the shared seed_prompts_sample.jsonl (6 real rows), shared with test_audit.
SEED_SAMPLE = Path(__file__).parent / "fixtures" / "audit_seed_prompts_sample.jsonl"


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    write_study(str(out), "gun_control", 400, seed=0)
    return out


@pytest.fixture(scope="module")
def decision_rows():
    return [decision_to_dict(d) for d in generate_study("minimum_wage", 30, seed=2)]


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def seed_rows():
    return [json.loads(line) for line in SEED_SAMPLE.read_text().splitlines()]


def test_seed_sample_loads_with_gold_options_and_state(seed_rows):
    result = load_examples(str(SEED_SAMPLE), DataConfig(), split="validation")
    assert isinstance(result, LoadResult) and result.skipped == 0 and result.split == "all"
    assert len(result.examples) == len(result.raw_examples) == len(seed_rows) == 6
    for raw, row in zip(result.raw_examples, seed_rows):  # as the file gave them
        assert (raw.gold_index, raw.n_options, raw.issue, raw.study) == (row["gold_index"], row["n_options"],
                                                                         row["issue"], row["study"])
        assert raw.prompt == row["prompt"]
        assert raw.messages[0] == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}
        assert len(raw.option_texts) == raw.n_options
        assert raw.state_text.startswith("VIEWER ") and raw.state_text.endswith(".")
        assert "OPTIONS" not in raw.state_text
    first = result.raw_examples[0]
    assert first.option_texts[0] == ("Piers Morgan Argues With Pro-Gun Campaigner About Orlando Shooting | "
                                     "Good Morning Britain (Good Morning Britain, 382s long) — Engagement: "
                                     "views 2,433,982, likes 18,834, comments 40")
    assert first.option_texts[4] == ("Most Americans Want More Gun Control. Why Doesn’t It Happen? | NYT — "
                                     "Engagement: views 43,105, likes 706")
    assert first.example_id == f"{SEED_SAMPLE.stem}:1"
    for ex, raw in zip(result.examples, result.raw_examples):  # as training shows them
        assert (ex.example_id, ex.n_options, ex.issue, ex.study, ex.state_text, ex.messages[0]) == (
            raw.example_id, raw.n_options, raw.issue, raw.study, raw.state_text, raw.messages[0])
        order = ex.meta["shown_order"]
        assert sorted(order) == list(range(ex.n_options)) and order[ex.gold_index - 1] == raw.gold_index - 1
        assert ex.prompt.endswith(raw.prompt[raw.prompt.index("\n\nQUESTIONS"):])
    # The gun rows' gold carried no channel, duration or comments: now no option does.
    assert result.examples[0].option_texts[order_of(result.examples[0], 0)] == (
        "Piers Morgan Argues With Pro-Gun Campaigner About Orlando Shooting | Good Morning Britain — "
        "Engagement: views 2,433,982, likes 18,834")
    assert result.examples[0].meta["dropped_fields"] == ("channel", "comments", "duration")


def order_of(example, stored: int) -> int:
    """Shown index (0-based) of the option stored at `stored`."""
    return example.meta["shown_order"].index(stored)


def test_prerendered_rows_rendered_alike_keep_their_text_in_stored_order(seed_rows):
    # The wage rows render every option alike: unshuffled, their prompt is the file's, byte for byte.
    result = load_examples(str(SEED_SAMPLE), DataConfig(shuffle_options=False))
    for ex, raw, row in zip(result.examples, result.raw_examples, seed_rows):
        assert ex.gold_index == raw.gold_index == row["gold_index"]
        assert (ex.prompt == row["prompt"]) == (row["issue"] == "minimum_wage"), ex.example_id


def test_study_dir_splits_render_and_share_no_viewer(study_dir):
    cfg = DataConfig(seed=0)
    loaded = {s: load_examples(str(study_dir), cfg, s) for s in ("train", "validation", "test")}
    for split, result in loaded.items():
        lines = (study_dir / f"{split}.jsonl").read_text().splitlines()
        assert len(result.examples) == len(lines) and result.split == split
        assert all(ex.task == "viewer" and ex.true_choice_probs for ex in result.examples)
    viewers = {s: {ex.viewer_id for ex in r.examples} for s, r in loaded.items()}
    assert not viewers["train"] & (viewers["validation"] | viewers["test"])
    assert loaded["train"].source == study_dir.name
    capped = DataConfig(max_train_samples=25)
    assert len(load_examples(str(study_dir), capped, "train").examples) == 25
    assert len(load_examples(str(study_dir), capped, "validation").examples) == len(loaded["validation"].examples)


def test_render_settings_come_from_the_data_config(study_dir):
    plain = load_examples(str(study_dir), DataConfig(shuffle_options=False, max_history=1), "test").examples
    rows = [json.loads(x) for x in (study_dir / "test.jsonl").read_text().splitlines()]
    assert [ex.gold_index for ex in plain] == [r["gold_index"] for r in rows]
    assert all("\n2. " not in ex.state_text.split("RECENTLY WATCHED")[1] for ex in plain)
    custom = load_examples(str(study_dir), DataConfig(system_prompt="S"), "test").examples
    assert custom[0].messages[0]["content"] == "S"


def test_synthetic_path_generates_in_memory():
    cfg = DataConfig(synthetic_n=300, seed=1)
    parts = [load_examples("synthetic:gun_control", cfg, s).examples for s in ("train", "validation", "test")]
    assert sum(map(len, parts)) == 300
    assert not {e.viewer_id for e in parts[0]} & {e.viewer_id for e in parts[2]}
    assert [e.prompt for e in parts[1]] == [e.prompt for e in load_examples("synthetic:gun_control", cfg,
                                                                            "validation").examples]
    with pytest.raises(ValueError, match="unknown issue 'abortion'"):
        load_examples("synthetic:abortion", cfg)


def test_jsonl_parquet_and_saved_dataset_give_the_same_examples(tmp_path, decision_rows):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = DataConfig()
    from_jsonl = load_examples(str(_write_jsonl(tmp_path / "rows.jsonl", decision_rows)), cfg).examples
    pq.write_table(pa.Table.from_pylist(decision_rows), tmp_path / "rows.parquet")
    from_parquet = load_examples(str(tmp_path / "rows.parquet"), cfg).examples
    datasets.Dataset.from_list(decision_rows).save_to_disk(str(tmp_path / "saved"))
    from_saved = load_examples(str(tmp_path / "saved"), cfg).examples
    datasets.DatasetDict({"test": datasets.Dataset.from_list(decision_rows)}).save_to_disk(str(tmp_path / "dd"))
    from_dict = load_examples(str(tmp_path / "dd"), cfg, "test")
    assert len(from_jsonl) == 30
    prompts = [e.prompt for e in from_jsonl]
    for other in (from_parquet, from_saved, from_dict.examples):
        assert [e.prompt for e in other] == prompts
        assert [e.gold_index for e in other] == [e.gold_index for e in from_jsonl]
    assert from_dict.split == "test"
    with pytest.raises(SchemaError, match="has splits \\['test'\\], not 'train'"):
        load_examples(str(tmp_path / "dd"), cfg, "train")


BAD_ROWS = [
    ("gold out of range", lambda r: r.update(gold_index=9), "field 'gold_index' must be in 1.."),
    ("empty slate", lambda r: r.update(slate=[]), "field 'slate' is empty"),
    ("missing field", lambda r: r.pop("current"), "field 'current' is missing"),
    ("bad direction", lambda r: r.update(opinion_direction="up"), "field 'opinion_direction'"),
    ("probs", lambda r: r.update(true_opinion_probs=[0.2, 0.2, 0.2]), "field 'true_opinion_probs' must sum to 1"),
]


@pytest.mark.parametrize("name,mutate,expected", BAD_ROWS, ids=[b[0] for b in BAD_ROWS])
def test_malformed_decision_row_names_file_line_and_field(tmp_path, decision_rows, name, mutate, expected):
    rows = [dict(r) for r in decision_rows[:4]]
    mutate(rows[2])
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(SchemaError) as err:
        load_examples(str(path), DataConfig())
    assert str(err.value).startswith(f"{path}:3: ") and expected in str(err.value), str(err.value)
    assert "skip_bad_rows" in str(err.value)


def test_malformed_prerendered_rows_name_file_line_and_field(tmp_path, seed_rows):
    cases = [
        (dict(seed_rows[0], n_options=4), "field 'n_options' is 4 but the prompt's OPTIONS lists 5"),
        (dict(seed_rows[0], gold_index=6), "field 'gold_index' must be in 1..5"),
        (dict(seed_rows[0], gold_index="5"), "field 'gold_index' must be int"),
        ({k: v for k, v in seed_rows[0].items() if k != "prompt"}, "field 'prompt' is missing"),
        (dict(seed_rows[0], prompt="VIEWER x"), "field 'prompt' has no OPTIONS section"),
        (dict(seed_rows[0], opinion_direction="more"), "field 'opinion_direction' must be one of"),
        (dict(seed_rows[0], prompt=seed_rows[0]["prompt"].replace("likes 706", "liked by many")),
         "field 'prompt', OPTIONS line 5 cannot be re-rendered: engagement text 'liked by many'"),
        (dict(seed_rows[0], prompt=seed_rows[0]["prompt"].replace(
            "\n1. Piers Morgan Argues With Pro-Gun Campaigner About Orlando Shooting | Good Morning Britain (",
            "\n1. (")), "field 'prompt', OPTIONS line 1 cannot be re-rendered: no title"),
    ]
    for row, expected in cases:
        path = _write_jsonl(tmp_path / "pre.jsonl", [seed_rows[1], row])
        with pytest.raises(SchemaError) as err:
            load_examples(str(path), DataConfig())
        assert str(err.value).startswith(f"{path}:2: ") and expected in str(err.value), str(err.value)


def test_skip_mode_counts_and_reports_every_bad_row(tmp_path, decision_rows):
    rows = [dict(r) for r in decision_rows[:6]]
    rows[1]["gold_index"] = 0
    rows[4]["slate"] = []
    path = _write_jsonl(tmp_path / "mixed.jsonl", rows[:3] + ["{not json"] + rows[3:])
    with pytest.raises(SchemaError, match=rf"{path}:2: field 'gold_index'"):
        load_examples(str(path), DataConfig())
    result = load_examples(str(path), DataConfig(skip_bad_rows=True))
    assert result.skipped == 3 and len(result.examples) == 4
    assert [r.split(": ", 1)[0] for r in result.skip_reasons] == [f"{path}:2", f"{path}:4", f"{path}:6"]
    assert "not valid JSON" in result.skip_reasons[1] and "'slate' is empty" in result.skip_reasons[2]
    with pytest.raises(SchemaError, match="no usable rows"):
        load_examples(str(_write_jsonl(tmp_path / "all_bad.jsonl", ["[]"])), DataConfig(skip_bad_rows=True))


def test_math_task_dispatches_to_the_math_loader(tmp_path):
    path = _write_jsonl(tmp_path / "math.jsonl", [{"problem": "Compute $2+2$.", "answer": "4"}] * 3)
    result = load_examples(str(path), DataConfig(task="math", max_train_samples=2))
    assert [ex.task for ex in result.examples] == ["math", "math"]
    assert result.examples[0].answer == "4"
    custom = load_examples(str(path), DataConfig(task="math", system_prompt="Solve."), "validation")
    assert [m["role"] for m in custom.examples[0].messages] == ["system", "user"]
    assert custom.examples[0].messages[0]["content"] == "Solve." and len(custom.examples) == 3


def test_missing_and_unsupported_paths_say_what_to_use(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_examples(str(tmp_path / "nope.jsonl"), DataConfig())
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SchemaError, match="unsupported file type; use .jsonl, .parquet"):
        load_examples(str(tmp_path / "data.csv"), DataConfig())
    with pytest.raises(SchemaError, match="without train.jsonl"):
        load_examples(str(tmp_path), DataConfig())


def test_sample_rows_is_seeded_in_stored_order_and_spread_over_viewers():
    from grailcore.data.loaders import sample_rows

    rows = load_examples("synthetic:gun_control", DataConfig(synthetic_n=600, max_history=2), split="validation").examples
    picked = sample_rows(rows, 16, seed=0)
    assert picked == sample_rows(rows, 16, seed=0) and picked != sample_rows(rows, 16, seed=1)
    position = {ex.example_id: i for i, ex in enumerate(rows)}
    assert [position[ex.example_id] for ex in picked] == sorted(position[ex.example_id] for ex in picked)
    # sessions are stored together: the first 16 rows cover far fewer viewers than a sample
    assert len({ex.viewer_id for ex in picked}) > len({ex.viewer_id for ex in rows[:16]})
    assert sample_rows(rows, None, seed=0) == rows and sample_rows(rows, 10**6, seed=0) == rows


def test_the_original_gun_flaw_is_gone_from_the_rows_training_sees():
    # 200 rows whose clicked video was appended last, without channel, duration and comments.
    from gun_flaw_fixture import FIXTURE

    shown = load_examples(str(FIXTURE), DataConfig())
    unshuffled = load_examples(str(FIXTURE), DataConfig(shuffle_options=False))
    assert all(raw.gold_index == raw.n_options for raw in shown.raw_examples)  # the flaw, as given
    assert gold_position_p_value(unshuffled.examples) < 1e-30  # the stored order keeps it
    assert gold_position_p_value(shown.examples) > 0.01
    for n in {ex.n_options for ex in shown.examples}:  # and no position holds a share far from 1/n
        rows = [ex for ex in shown.examples if ex.n_options == n]
        for position in range(1, n + 1):
            share = sum(ex.gold_index == position for ex in rows) / len(rows)
            assert abs(share - 1 / n) < 4 * (1 / n * (1 - 1 / n) / len(rows)) ** 0.5, (n, position, share)
    alike = re.compile(r"^\d+\. [^()]+ — Engagement: views [\d,]+, likes [\d,]+$")
    for ex, raw in zip(shown.examples, shown.raw_examples):
        # every option line has the same fields, none the dropped channel, duration or comments
        lines = ex.prompt.split("\n\nOPTIONS\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert len(lines) == ex.n_options and all(alike.match(line) for line in lines), lines
        # the gold is still the video the viewer clicked: same title (less a trailing
        # '(Full Segment)', dropped with the channel) and the same counts
        title, counts = ex.option_texts[ex.gold_index - 1].split(" — Engagement: ")
        raw_title, raw_counts = raw.option_texts[raw.gold_index - 1].split(" — Engagement: ")
        assert raw_title.startswith(title) and counts == raw_counts
        assert ex.meta["shown_order"][ex.gold_index - 1] == raw.gold_index - 1
        assert ex.meta["dropped_fields"] == ("channel", "comments", "duration")


def gold_position_p_value(examples) -> float:
    """Chi-square p-value of gold positions against uniform, pooled over slate sizes."""
    from grailcore.data.audit_stats import chi2_sf, position_tests

    by_size: dict[int, list[int]] = {}
    for ex in examples:
        by_size.setdefault(ex.n_options, []).append(ex.gold_index)
    tests = position_tests(by_size)
    return chi2_sf(sum(t.chi2 for t in tests), sum(t.df for t in tests))
