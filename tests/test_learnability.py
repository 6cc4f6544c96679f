"""experiments/learnability*.py (issue #21, item 4): the rows it scores are the loader's rows,
the scores are proper, the references and heads compute what they claim, and the cached
forward pieces reproduce the model's own forward (tiny real Llama, SmolLM2 tokenizer)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from grailcore.config import DataConfig
from grailcore.data.loaders import load_examples
from grailcore.data.prompt import encode_prompt
from grailcore.data.synth import ChoiceModel, StudyParams

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))  # the experiment's modules import each other by name

import learnability as L  # noqa: E402
import learnability_heads as H  # noqa: E402
import learnability_rows as R  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return R.study_rows(n=300)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = L.load_model("tiny-llama")
    return model.eval(), tokenizer


def test_rows_are_the_loaders_rows_with_the_known_latents(rows):
    for split in ("train", "validation", "test"):
        loaded = load_examples("synthetic:gun_control", DataConfig(synthetic_n=300), split).examples
        mine = rows[split]
        assert [r.example.example_id for r in mine] == [e.example_id for e in loaded]
        assert [r.gold + 1 for r in mine] == [e.gold_index for e in loaded]
        assert [r.example.option_texts for r in mine] == [e.option_texts for e in loaded]
        assert [r.example.prompt for r in mine] == [e.prompt for e in loaded]  # only the system prompt differs
        for r, e in zip(mine, loaded):
            np.testing.assert_allclose(r.true_probs, e.true_choice_probs)
            np.testing.assert_allclose(r.stance, e.meta["option_stances"])


def test_compact_variant_keeps_rows_order_and_gold_and_reads_the_same_latents(rows):
    compact = R.study_rows(n=300, variant="compact")["test"]
    for full, short in zip(rows["test"], compact):
        assert short.example.example_id == full.example.example_id and short.gold == full.gold
        np.testing.assert_allclose(short.true_probs, full.true_probs)
        for text, views in zip(short.example.option_texts, short.log_views):
            assert f"{round(10 ** views):,} views" in text and text in short.example.prompt
        assert len(short.example.prompt) < len(full.example.prompt) / 2
    matched = R.study_rows(n=300, variant="compact_match")["test"]
    for short, match in zip(compact, matched):  # the same lines, each ending with stance x lean
        assert match.gold == short.gold
        for plain, text, stance in zip(short.example.option_texts, match.example.option_texts, match.stance):
            assert text == f"{plain} - match with the viewer's views {stance * match.lean:+.2f}"
    sharp = R.study_rows(n=300, variant="sharp")["test"]
    assert max(max(r.true_probs) for r in sharp) > max(max(r.true_probs) for r in rows["test"])


def test_extraction_order_keeps_viewers_whole_and_extends_a_capped_run(rows):
    full = R.extraction_order(rows["train"], None, seed=0)
    capped = R.extraction_order(rows["train"], 50, seed=0)
    assert sorted(r.example.example_id for r in full) == sorted(r.example.example_id for r in rows["train"])
    assert capped == full[:50]
    viewers = [r.viewer_id for r in full]
    firsts = {v: viewers.index(v) for v in viewers}
    assert all(viewers[i] == viewers[i - 1] or i == firsts[viewers[i]] for i in range(1, len(viewers)))
    assert R.extraction_order(rows["train"], None, seed=1) != full


def test_slate_scores_by_hand():
    probs = np.array([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    true = np.array([[0.2, 0.7, 0.1, 0.0], [0.4, 0.3, 0.2, 0.1]])
    s = R.slate_scores(probs, np.array([1, 3]), true, np.array([3, 4]))
    np.testing.assert_allclose(s["nll"], [-np.log(0.3), -np.log(0.25)])
    np.testing.assert_allclose(s["accuracy"], [0.2, 0.25])  # top option's true prob; a 4-way tie averages
    np.testing.assert_allclose(s["hit"], [0.0, 0.25])
    np.testing.assert_allclose(s["tv"], [0.4, 0.2])


def test_nll_is_proper_the_truth_beats_its_own_mode():
    rng = np.random.default_rng(0)
    true = rng.dirichlet(np.ones(4), size=4000)
    gold = np.array([rng.choice(4, p=p) for p in true])
    n = np.full(4000, 4)
    mode = 0.85 * np.eye(4)[true.argmax(1)] + 0.05
    truth = R.slate_scores(true, gold, true, n)
    sharp = R.slate_scores(mode, gold, true, n)
    assert truth["nll"].mean() < sharp["nll"].mean() - 0.1
    assert truth["tv"].mean() == 0 and sharp["tv"].mean() > 0.2
    assert truth["accuracy"].mean() == pytest.approx(sharp["accuracy"].mean())  # same top option


def test_conditional_logit_recovers_known_weights():
    rng = np.random.default_rng(1)
    w_true = torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64)
    x = torch.as_tensor(rng.normal(size=(5000, 4, 3)))
    mask = torch.ones(5000, 4, dtype=torch.bool)
    mask[:1000, 3] = False  # three-option slates
    probs = H.conditional_logit_logp(x, mask, w_true).exp()
    gold = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(0))[:, 0]
    w = H.fit_conditional_logit(x, mask, gold, l2=1e-6)
    assert torch.allclose(w, w_true, atol=0.1)
    assert H.conditional_logit_logp(x, mask, w)[:1000, 3].isinf().all()


def test_readable_model_is_the_truth_when_nothing_is_hidden(rows):
    row = rows["test"][0]
    views_only = StudyParams(choice=ChoiceModel(affinity=0.0, primacy=0.0, continuity=0.0))
    true = np.exp(0.45 * row.log_views) / np.exp(0.45 * row.log_views).sum()
    np.testing.assert_allclose(R.readable_probs(row, views_only), true, rtol=1e-9)
    primacy_only = StudyParams(choice=ChoiceModel(affinity=0.0, popularity=0.0, continuity=0.0))
    np.testing.assert_allclose(R.readable_probs(row, primacy_only), np.full(row.n_options, 1 / row.n_options))


def test_readable_model_sits_between_bayes_and_uniform(rows):
    test = rows["test"]
    true, gold, n = R.pad([r.true_probs for r in test]), np.array([r.gold for r in test]), np.array([r.n_options for r in test])
    readable = R.pad([R.readable_probs(r, None) for r in test])
    tv = R.slate_scores(readable, gold, true, n)["tv"].mean()
    assert 0.01 < tv < R.slate_scores(R.uniform_probs(n), gold, true, n)["tv"].mean()


def test_rules_pick_by_views_and_by_side(rows):
    row = next(r for r in rows["test"] if r.n_options == 4)
    side = R.viewer_side(row)
    assert side == (-1 if row.example.meta["initial_viewpoint"].startswith("Opposes") else 1)
    mine = dataclasses.replace(row, stance=np.array([-0.7, 0.6, 0.05, 0.3]) * side, log_views=np.array([5.0, 3.0, 6.0, 4.0]))
    assert R.option_side(mine.stance * side).tolist() == [-1, 1, 0, 1]
    assert R.most_viewed([mine]).tolist() == [2]
    assert R.side_matches([mine]).tolist() == [3]  # the most viewed of the two on the viewer's side
    nobody = dataclasses.replace(mine, stance=np.array([-0.7, -0.6, 0.05, -0.3]) * side)
    assert R.side_matches([nobody]).tolist() == [2]  # none on their side: the most viewed


def test_encode_direct_spans_read_the_option_lines(rows, tiny):
    _, tokenizer = tiny
    example = rows["test"][3].example
    enc = L.encode_direct(tokenizer, example)
    prefix = tokenizer.encode(L.ANSWER_PREFIX, add_special_tokens=False)
    assert enc.ids == encode_prompt(tokenizer, example) + prefix
    for k, ((start, end), text) in enumerate(zip(enc.option_spans, example.option_texts), 1):
        assert tokenizer.decode(enc.ids[start:end]).strip() == f"{k}. {text}"
    assert tokenizer.decode(enc.ids[: enc.survey_end + 1]).endswith(example.state_text.splitlines()[-1])


def test_cached_forward_pieces_match_the_models_forward(rows, tiny):
    model, tokenizer = tiny
    row = rows["test"][5]
    enc = L.encode_direct(tokenizer, row.example)
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        reference = torch.log_softmax(model(ids).logits[0, -1], -1)
        item = L.extract_row(model, tokenizer, row, L.probe_layers(2), k_max=2)
        digits = L.digit_ids(tokenizer, 9)
        torch.testing.assert_close(item["digit_logp"], reference[digits], atol=1e-5, rtol=0)
        stream = L.run_layers(model, L.decoder(model).embed_tokens(ids), 0, 1)  # fp32, entering the top layer
        for k, hidden in ((1, stream), (2, L.decoder(model).embed_tokens(ids))):
            got = torch.log_softmax(L.top_logits(model, hidden, k)[0], -1)
            torch.testing.assert_close(got, reference, atol=1e-4, rtol=0)
    assert set(item["probe"]) == {1, 2} and item["probe"][2]["option_end"].shape == (row.n_options, 128)
    logp, off = L.slate_distribution(reference, digits, row.n_options)
    assert logp.exp().sum() == pytest.approx(1.0, abs=1e-6) and 0 <= float(off) <= 1


def test_probe_design_columns_select_the_smaller_design(rows):
    rng = np.random.default_rng(2)
    fake = [{"probe": {1: {"option_end": torch.as_tensor(rng.normal(size=(r.n_options, 40))),
                           "state_last": torch.as_tensor(rng.normal(size=40))}}} for r in rows["train"][:60]]
    train = H.Cached(rows["train"][:60], fake)
    big = H.probe_designs(train, {}, 1, "end", "last", 12, 4)["train"][0]
    small = H.probe_designs(train, {}, 1, "end", "last", 6, 2)["train"][0]
    torch.testing.assert_close(big[..., H.design_columns(6, 2, 12, 4)], small)


def test_probe_finds_a_planted_signal(rows):
    """Option features that carry the true log-probabilities: the probe must beat uniform."""
    rng = np.random.default_rng(3)

    def fake(r):
        opt = np.column_stack([np.log(r.true_probs), rng.normal(size=(r.n_options, 7))])
        return {"probe": {1: {"option_end": torch.as_tensor(opt), "state_last": torch.as_tensor(rng.normal(size=8))}}}

    train = H.Cached(rows["train"], [fake(r) for r in rows["train"]])
    test = H.Cached(rows["test"], [fake(r) for r in rows["test"]])
    spec = H.ProbeSpec(1, "end", "last", 8, 0, 1e-4)
    probs = H.fit_probes([spec], train, {"test": test}, log=lambda *_: None)[0]["probs"]["test"]
    uniform = H.mean_nll(R.uniform_probs(test.n_options), test)
    assert H.mean_nll(probs, test) < uniform - 0.1
    assert H.mean_nll(probs, test) < H.mean_nll(test.true, test) + 0.05


def test_ridge_r2_and_sizes():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 5))
    y = x @ np.array([1.0, 0, 0, 2.0, 0]) + 0.1 * rng.normal(size=500)
    (pred,) = H.ridge_predict(x[:400], y[:400], [x[400:]], 1e-4)
    assert H.r_squared(y[400:], pred) > 0.99
    assert H.r_squared(y, np.full_like(y, y.mean())) == pytest.approx(0.0)
    assert H.learning_curve_sizes(300) == [75, 150, 300]
    assert L.probe_layers(30) == (8, 15, 22, 30)


def test_parse_finetune():
    assert L.parse_finetune("1:3e-4:8,2:1e-4:4") == [L.FinetuneSpec(1, 3e-4, 8), L.FinetuneSpec(2, 1e-4, 4)]
    with pytest.raises(ValueError, match="k:lr:epochs"):
        L.parse_finetune("2:1e-4")
    with pytest.raises(ValueError, match="k must be in"):
        L.parse_finetune("9:1e-4:1")


def test_finetune_trains_only_the_top_layers_and_resumes(rows, tiny, tmp_path):
    model, tokenizer = tiny
    items = [L.extract_row(model, tokenizer, r, (1, 2), k_max=2) for r in rows["train"][:12]]
    train = H.Cached(rows["train"][:12], items, k_max=2)
    spec = L.FinetuneSpec(k=1, lr=1e-2, epochs=2, batch=4)
    first = L.finetune(tmp_path, dataclasses.replace(spec, epochs=1), train, {"validation": train}, "tiny-llama",
                       log=lambda *_: None)
    state = torch.load(tmp_path / "ft" / spec.name() / "state.pt", weights_only=False)
    assert all(n.startswith(("model.layers.1.", "model.norm.")) for n in state["model"])
    assert [e["epoch"] for e in first] == [0, 1]
    history = L.finetune(tmp_path, spec, train, {"validation": train}, "tiny-llama", log=lambda *_: None)
    assert [e["epoch"] for e in history] == [0, 1, 2]
    nll = [H.mean_nll(e["splits"]["validation"]["probs"], train) for e in history]
    assert nll[2] < nll[0]  # the training rows themselves: fitting them must lower their NLL


def _planted(rows, noise: float, seed: int):
    """Cached rows whose 'hidden states' hold the latents linearly (plus noise dimensions)."""
    rng = np.random.default_rng(seed)
    items = []
    for r in rows:
        opt = np.column_stack([r.stance, r.log_views, rng.normal(size=(r.n_options, 4))])
        state = np.array([r.lean, r.interest, r.current_stance, *rng.normal(size=3)])
        opt, state = opt + noise * rng.normal(size=opt.shape), state + noise * rng.normal(size=state.shape)
        feats = {"option_end": torch.as_tensor(opt), "option_mean": torch.as_tensor(opt),
                 "state_last": torch.as_tensor(state), "survey_end": torch.as_tensor(state)}
        items.append({"probe": {1: feats}})
    return H.Cached(rows, items)


def test_latent_and_structured_probes_recover_planted_latents():
    rows = R.study_rows(n=1200)
    train, val, test = (_planted(rows[s], 0.01, i) for i, s in enumerate(("train", "validation", "test")))
    summary, predictions = H.latent_probe(train, val, test, 1)
    for name in ("stance", "log10_views", "viewer_lean", "political_interest", "current_stance"):
        assert summary[name]["test_r2"] > 0.98, (name, summary[name])
    assert summary["stance_x_lean"]["test_r2"] < 0.5  # a product is not linear in the option features alone
    structured = H.structured_probe(train, {"validation": val, "test": test}, predictions)
    oracle = H.oracle_logit(train, {"validation": val, "test": test})
    got, ceiling = (H.mean_nll(x["probs"]["test"], test) for x in (structured, oracle))
    assert got < H.mean_nll(R.uniform_probs(test.n_options), test) - 0.15
    assert abs(got - ceiling) < 0.03


def test_report_keeps_a_hand_written_conclusion_and_nothing_else(tmp_path):
    import learnability_report as report

    readme = tmp_path / "README.md"
    assert report.kept_conclusion(readme) == []
    block = f"{report.CONCLUSION[0]}\n## Conclusion\ncompact_sharp is learnable\n{report.CONCLUSION[1]}"
    readme.write_text(f"# old title\n\n{block}\n\n## Verdict\nold numbers\n")
    assert report.kept_conclusion(readme) == [block, ""]
    readme.write_text(f"# old\n{report.CONCLUSION[1]} then {report.CONCLUSION[0]}\n")  # markers out of order
    assert report.kept_conclusion(readme) == []
