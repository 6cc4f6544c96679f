"""grailcore.generate_dataset: k scored completions per prompt as a datasets dataset, the
--keep correct filter (rejection-sampled SFT data), resumption, and a micro-llama run."""

from __future__ import annotations

import json

import datasets
import pytest

from grailcore.config import Config, ConfigError, DataConfig, RewardsConfig
from grailcore.data.loaders import load_examples
from grailcore.generate_dataset import GenerateOptions, generate_dataset, main, scoring_config
from grailcore.types import Completion

ANSWERS = ("<think>a</think><answer>1</answer><opinion>increase</opinion>",
           "<think>b</think><answer>2</answer><opinion>decrease</opinion>")


class ScriptedEngine:
    """Sample k answers option k+1; can fail on a given call to simulate a crash."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls, self.prompts, self.fail_on_call = 0, 0, fail_on_call

    def generate(self, prompt_ids, params):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise RuntimeError("simulated crash")
        self.prompts += len(prompt_ids)
        return [[Completion(ANSWERS[k], (1, 2, 3), None, "stop") for k in range(params.n)] for _ in prompt_ids]


@pytest.fixture(scope="module")
def examples():
    data = DataConfig(synthetic_n=100, max_history=2)
    return load_examples("synthetic:gun_control", data, split="train").examples[:10]


def _cfg() -> Config:
    return Config(rewards=RewardsConfig(names=("format",), weights=(1.0,)))


def test_keep_correct_is_rejection_sampling(tmp_path, examples):
    ids = [[1, 2]] * len(examples)
    everything = generate_dataset(ScriptedEngine(), examples, ids, _cfg(),
                                  GenerateOptions(tmp_path / "g", samples_per_row=2, shard_size=4))
    rows = datasets.load_from_disk(everything["dataset"])
    assert everything["samples"] == len(rows) == 20
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": ANSWERS[0]}
    assert rows[0]["messages"][:-1] == [dict(m) for m in examples[0].messages]
    assert set(rows[0]["rewards"]) == {"format", "option_accuracy"}
    assert all(r["reward"] == r["rewards"]["format"] == 1.0 for r in rows)  # option_accuracy has weight 0
    # Rerun with --keep correct: no generation, only the rows whose option is the gold one.
    engine = ScriptedEngine()
    correct = generate_dataset(engine, examples, ids, _cfg(),
                               GenerateOptions(tmp_path / "g", samples_per_row=2, shard_size=4, keep="correct"))
    assert engine.calls == 0
    kept = datasets.load_from_disk(correct["dataset"])
    expected = sorted((i, ex.gold_index - 1) for i, ex in enumerate(examples) if ex.gold_index <= 2)
    assert sorted(zip(kept["row"], kept["sample"])) == expected
    assert all(r["correct"] and r["rewards"]["option_accuracy"] == 1.0 for r in kept)


def test_resume_after_a_crash_skips_done_shards(tmp_path, examples):
    ids = [[1, 2]] * len(examples)
    options = GenerateOptions(tmp_path / "g", samples_per_row=2, shard_size=4)  # shards of 4, 4, 2 prompts
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_dataset(ScriptedEngine(fail_on_call=2), examples, ids, _cfg(), options)
    assert sorted(p.name for p in (tmp_path / "g" / "shards").iterdir()) == ["shard-00000.jsonl"]
    engine = ScriptedEngine()
    summary = generate_dataset(engine, examples, ids, _cfg(), options)
    assert engine.prompts == 6 and summary["shards_generated"] == 2
    rows = datasets.load_from_disk(summary["dataset"])
    assert sorted(zip(rows["row"], rows["sample"])) == [(r, k) for r in range(10) for k in range(2)]
    with pytest.raises(ConfigError, match="samples_per_row differ"):
        generate_dataset(engine, examples, ids, _cfg(), GenerateOptions(tmp_path / "g", samples_per_row=3, shard_size=4))


def test_scoring_config_adds_correctness_at_zero_weight():
    rewards = scoring_config(RewardsConfig(names=("format",), weights=(0.5,)), ["viewer", "math", "viewer"])
    assert rewards.names == ("format", "math_accuracy", "option_accuracy") and rewards.weights == (0.5, 0.0, 0.0)
    same = RewardsConfig(names=("option_accuracy",), weights=(1.0,))
    assert scoring_config(same, ["viewer"]) == same


def test_micro_llama_generation_and_rerun(tmp_path, capsys):
    args = ["--out", str(tmp_path / "gen"), "--samples-per-row", "2", "--shard-size", "2",
            "--model.name-or-path", "micro-llama", "--data.synthetic-n", "100", "--data.max-history", "2",
            "--data.max-train-samples", "3", "--rollout.max-prompt-tokens", "4096",
            "--rollout.max-completion-tokens", "8", "--eval.max-samples", "2"]
    first = main(args)
    assert first["shards"] == first["shards_generated"] == 2 and first["samples"] == 6
    rows = datasets.load_from_disk(first["dataset"])
    assert len(rows) == 6 and set(rows["source"]) == {"synthetic:gun_control"}
    assert all(0 < t <= 8 for t in rows["completion_tokens"])
    assert all(r["messages"][-1]["content"] == r["completion"] for r in rows)
    assert all(r["correct"] == (r["rewards"]["option_accuracy"] == 1.0) for r in rows)
    again = main(args + ["--keep", "correct"])
    assert again["shards_generated"] == 0 and again["kept"] == sum(rows["correct"])
    if again["kept"] == 0:  # a random model rarely answers right: no dataset rather than an empty one
        assert again["dataset"] is None and not (tmp_path / "gen" / "dataset").exists()
    assert json.loads((tmp_path / "gen" / "generate.json").read_text())["samples_per_row"] == 2
