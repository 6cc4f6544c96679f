"""Issue #21 item 4: can SmolLM2-135M-Instruct learn the synthetic study's choice at all?

Three measurements on the same synthetic rows and viewer splits as grailcore's loaders:
  extract   one frozen forward per row (prompt + the answer prefix `<answer>`): hidden states
            at each option's line and at the state, the zero-shot next-token distribution over
            the option digits, and the residual stream entering the top K_MAX layers (cached,
            so fine-tuning the top layers never re-runs the frozen bottom);
  probe     conditional-logit heads on the frozen features (selected on validation), plus
            ridge probes of each latent variable (option stance, views, viewer lean, interest);
  finetune  direct-answer SFT of the top k layers on the person's answer digit, per-epoch
            held-out NLL / accuracy / TV / off-slate mass;
  report    the tables (viewer-bootstrap intervals), plots and verdict -> OUT/README.md + JSON.

Every stage caches under RUN (resumable: finished chunks, fits and epochs are kept):
    python experiments/learnability.py all --run runs/learnability --out experiments/results/learnability
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from grailcore.data.prompt import build_example, encode_prompt
from grailcore.data.schema import Decision, Example
from grailcore.data.synth import INTEREST_LEVELS, ChoiceModel, StudyParams, generate_study, split_by_viewer

MODEL = "smollm2-135m-instruct"
DIRECT_SYSTEM_PROMPT = (
    "You simulate a survey participant on a YouTube-like platform. From the viewer's profile, "
    "what they are watching now, what they watched before and the recommended options, predict "
    "which option they will watch next. Answer with the option number only, in this format:\n"
    "<answer>k</answer>"
)
ANSWER_PREFIX = "<answer>"
"""Appended after the assistant turn's start: the next token is the option digit."""
K_MAX = 4
"""The residual stream entering layer L - K_MAX is cached, so up to K_MAX top layers can be trained
(fewer on a model with fewer layers)."""
CHUNK = 16
"""Rows per cache file (the unit of resumption)."""


# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Row:
    """One decision as the model sees it (options in the SHOWN order) and its known latents."""

    example: Example
    split: str
    gold: int  # 0-based shown position of the person's choice
    true_probs: np.ndarray  # [n] the known choice model's probabilities, shown order
    stance: np.ndarray  # [n] latent stance of each shown option in [-1, 1]
    log_views: np.ndarray  # [n] log10(views)
    lean: float  # 2 * attitude - 1 at the decision (the choice model's lean)
    interest: int  # index into INTEREST_LEVELS
    current_stance: float  # stance of the video being watched

    @property
    def n_options(self) -> int:
        return len(self.stance)

    @property
    def viewer_id(self) -> str:
        return self.example.viewer_id


COMPACT_SYSTEM_PROMPT = ("Predict which option the viewer watches next. Answer with the option number only, "
                         "in this format: <answer>k</answer>")


@dataclass(frozen=True)
class Variant:
    """A study (None = grailcore's default StudyParams) and a prompt layout: 'full' is
    grailcore's build_example; 'compact' keeps only what the choice model reads."""

    params: StudyParams | None
    layout: str
    note: str


SHARP = StudyParams(choice=dataclasses.replace(ChoiceModel(), temperature=0.5))
VARIANTS = {
    "default": Variant(None, "full", "grailcore's default study and prompt"),
    "compact": Variant(None, "compact", "the default study; a short prompt with only the viewer's politics, "
                                        "the current video and each option's title, channel and views"),
    "sharp": Variant(SHARP, "full", "the choice model at temperature 0.5 (sharper, still stochastic)"),
    "compact_sharp": Variant(SHARP, "compact", "both"),
}


def compact_example(decision: Decision, example: Example) -> Example:
    """`example` re-rendered short: party, ideology, interest and the stated support score; the
    current video; each option's title, channel and views (same shown order and gold)."""
    viewer = decision.viewer
    score = next((value for label, value in decision.survey if "support score" in label), "unknown")
    state = (f"VIEWER {viewer.party}, {(viewer.ideology or 'unknown').lower()}, {viewer.political_interest}, "
             f"{decision.issue.replace('_', ' ')} support score {score}\n"
             f"WATCHING {decision.current.title} ({decision.current.channel})")
    options = tuple(f"{decision.slate[i].title} ({decision.slate[i].channel}) - {decision.slate[i].views:,} views"
                    for i in example.meta["shown_order"])
    lines = "\n".join(f"{k}. {text}" for k, text in enumerate(options, 1))
    prompt = f"{state}\n\nOPTIONS\n{lines}\n\nWhich option number will the viewer watch next?"
    return example.replace(messages=({"role": "system", "content": COMPACT_SYSTEM_PROMPT},
                                     {"role": "user", "content": prompt}),
                           option_texts=options, state_text=state)


def make_row(decision: Decision, split: str, seed: int, system_prompt: str, layout: str = "full") -> Row:
    """Render `decision` exactly as grailcore's synthetic loader does, with `system_prompt`
    (layout 'compact': see compact_example)."""
    example = build_example(decision, max_history=12, show_ids=False, shuffle_options=True, seed=seed,
                            system_prompt=system_prompt, source=f"synthetic:{decision.issue}")
    if layout == "compact":
        example = compact_example(decision, example)
    order = example.meta["shown_order"]
    slate = [decision.slate[i] for i in order]
    return Row(
        example=example, split=split, gold=example.gold_index - 1,
        true_probs=np.asarray(example.true_choice_probs, dtype=np.float64),
        stance=np.array([v.stance for v in slate]), log_views=np.log10([v.views for v in slate]),
        lean=2 * decision.opinion_before - 1, interest=INTEREST_LEVELS.index(decision.viewer.political_interest),
        current_stance=decision.current.stance)


def study_rows(issue: str = "gun_control", n: int = 3000, seed: int = 0, variant: str = "default") -> dict[str, list[Row]]:
    """train / validation / test rows, split by viewer with the loader's seed (the default
    variant gives the rows of `load_examples('synthetic:<issue>', DataConfig(synthetic_n=n, seed=seed), split)`)."""
    chosen = VARIANTS[variant]
    splits = split_by_viewer(generate_study(issue, n, seed, chosen.params), seed)
    return {name: [make_row(d, name, seed, DIRECT_SYSTEM_PROMPT, chosen.layout) for d in rows]
            for name, rows in splits.items()}


def extraction_order(rows: list[Row], limit: int | None, seed: int) -> list[Row]:
    """Rows of one split in a seeded viewer-shuffled order (whole viewers together), cut to
    `limit` rows: any prefix is a viewer sample, so a capped run extends a smaller one."""
    viewers = sorted({r.viewer_id for r in rows})
    random.Random(f"learnability:{seed}").shuffle(viewers)
    rank = {v: i for i, v in enumerate(viewers)}
    ordered = sorted(rows, key=lambda r: (rank[r.viewer_id], r.example.example_id))
    return ordered if limit is None else ordered[:limit]


# ----------------------------------------------------------------------------- tokens

@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + ANSWER_PREFIX and the positions the probes read."""

    ids: list[int]
    option_spans: list[tuple[int, int]]  # [n] token [start, end) of each option's line
    survey_end: int  # last token of the state text (end of SURVEY HIGHLIGHTS)

    @property
    def option_ends(self) -> list[int]:
        return [end - 1 for _, end in self.option_spans]


def _token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the token whose character span holds `char`."""
    for i, (start, end) in enumerate(offsets):
        if start <= char < end:
            return i
    raise ValueError(f"no token covers character {char}")


def encode_direct(tokenizer, example: Example) -> Encoded:
    """Chat-templated prompt (grailcore's `encode_prompt`) + ANSWER_PREFIX, with the token
    spans of every option line; the ids are checked against a re-tokenisation with offsets."""
    ids = encode_prompt(tokenizer, example) + tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
    text = tokenizer.apply_chat_template([dict(m) for m in example.messages], add_generation_prompt=True,
                                         tokenize=False) + ANSWER_PREFIX
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise ValueError(f"{example.example_id}: the templated text does not re-tokenise to encode_prompt's ids")
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    block = text.index("\nOPTIONS\n")
    spans = []
    for k, option in enumerate(example.option_texts, 1):
        line = f"\n{k}. {option}"
        start = text.index(line, block) + 1
        end = start + len(line) - 1
        spans.append((_token_at(offsets, start), _token_at(offsets, end - 1) + 1))
        block = end
    state_end = text.index(example.state_text) + len(example.state_text)
    return Encoded(ids, spans, _token_at(offsets, state_end - 1))


def digit_ids(tokenizer, n: int) -> list[int]:
    """Token ids of '1'..'n' (each must be one token)."""
    out = []
    for k in range(1, n + 1):
        ids = tokenizer.encode(str(k), add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"option number {k} is {len(ids)} tokens for this tokenizer; the direct answer needs 1")
        out.append(ids[0])
    return out


# ----------------------------------------------------------------------------- forward

def decoder(model):
    """The Llama-style decoder (embed_tokens, rotary_emb, layers, norm) of a causal LM."""
    return model.model


def run_layers(model, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """[B, T, H] residual stream entering layer `start` -> entering layer `stop` (causal, no padding)."""
    lm = decoder(model)
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
    rope = lm.rotary_emb(hidden, positions)
    for layer in lm.layers[start:stop]:
        hidden = layer(hidden, position_embeddings=rope, position_ids=positions)
    return hidden


def last_layer_at_end(model, hidden: torch.Tensor) -> torch.Tensor:
    """[B, T, H] stream entering the LAST layer -> [B, H] its output at the final position only.

    Keys and values still come from every position; the query, attention output and MLP run
    at one position, ~16x cheaper than the whole layer (what fine-tuning the top layer needs)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # the model family's RoPE

    lm = decoder(model)
    layer = lm.layers[-1]
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    positions = torch.arange(length, device=hidden.device)[None]
    cos, sin = lm.rotary_emb(hidden, positions)
    normed = layer.input_layernorm(hidden)
    q = attn.q_proj(normed[:, -1:]).view(batch, 1, -1, attn.head_dim).transpose(1, 2)  # [B, heads, 1, d]
    k = attn.k_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)  # [B, kv_heads, T, d]
    v = attn.v_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)  # the last query sees every key
    h = hidden[:, -1] + attn.o_proj(out.transpose(1, 2).reshape(batch, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def final_logits(model, last_hidden: torch.Tensor) -> torch.Tensor:
    """[B, H] last layer's output -> [B, V] next-token logits."""
    return model.lm_head(decoder(model).norm(last_hidden))


def top_logits(model, hidden_in: torch.Tensor, k: int) -> torch.Tensor:
    """[B, T, H] stream entering layer L - k -> [B, V] logits at the final position."""
    n_layers = len(decoder(model).layers)
    hidden = run_layers(model, hidden_in, n_layers - k, n_layers - 1)
    return final_logits(model, last_layer_at_end(model, hidden))


def slate_distribution(logits: torch.Tensor, digits: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[V] logits -> ([n] log-probs over the slate digits renormalised, off-slate mass)."""
    full = torch.log_softmax(logits.float(), dim=-1)
    on = full[digits[:n]]
    return on - torch.logsumexp(on, dim=0), 1 - on.exp().sum()


# ----------------------------------------------------------------------------- extract

def probe_layers(n_layers: int) -> tuple[int, ...]:
    """Streams probed: entering the layers at 1/4, 1/2, 3/4 depth, and n_layers = the final
    (normed) output the LM head reads. SmolLM2-135M (30 layers): 8, 15, 22, 30."""
    return tuple(sorted({max(1, round(n_layers * f)) for f in (0.25, 0.5, 0.75)} | {n_layers}))


def _save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a chunk is either whole or absent: a killed run resumes cleanly


def _features(hidden: torch.Tensor, enc: Encoded) -> dict[str, torch.Tensor]:
    """[T, H] stream -> what the probes read at the row's informative positions (fp16)."""
    return {
        "option_end": hidden[enc.option_ends],  # [n, H]
        "option_mean": torch.stack([hidden[a:b].mean(0) for a, b in enc.option_spans]),  # [n, H]
        "state_last": hidden[-1],  # [H] the answer prefix's last token
        "survey_end": hidden[enc.survey_end],  # [H]
    }


@torch.inference_mode()
def extract_row(model, tokenizer, row: Row, probe_layers: tuple[int, ...], k_max: int) -> dict:
    """One frozen forward: probe features per layer, the digit log-probs, the stream entering L - k_max."""
    enc = encode_direct(tokenizer, row.example)
    n_layers = len(decoder(model).layers)
    ids = torch.tensor([enc.ids])
    hidden = decoder(model).embed_tokens(ids)
    stops = sorted({*probe_layers, n_layers - k_max, n_layers})
    out, start = {"probe": {}}, 0
    for stop in stops:
        hidden = run_layers(model, hidden, start, stop)
        start = stop
        if stop == n_layers - k_max:
            out["ft_input"] = hidden[0].to(torch.bfloat16)  # [T, H]
        if stop in probe_layers:
            seen = decoder(model).norm(hidden) if stop == n_layers else hidden
            out["probe"][stop] = {k: v.half() for k, v in _features(seen[0], enc).items()}
    logits = model.lm_head(decoder(model).norm(hidden[:, -1]))[0]
    out["digit_logp"] = torch.log_softmax(logits.float(), -1)[digit_ids(tokenizer, 9)]  # [9] full-vocab
    out["n_tokens"] = len(enc.ids)
    return out


def chunk_path(run: Path, split: str, index: int) -> Path:
    return run / "features" / f"{split}-{index:04d}.pt"


def extract(run: Path, rows: dict[str, list[Row]], limits: dict[str, int | None], seed: int,
            model_name: str = MODEL, log=print) -> None:
    """Cache every chunk not yet on disk: test first, then validation, then train."""
    (run / "features").mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_name)
    model.eval()
    n_layers = len(decoder(model).layers)
    layers, k_max = probe_layers(n_layers), min(K_MAX, n_layers)
    for split in ("test", "validation", "train"):
        ordered = extraction_order(rows[split], limits.get(split), seed)
        for index in range(math.ceil(len(ordered) / CHUNK)):
            target = chunk_path(run, split, index)
            if target.exists():
                continue
            chunk, started = ordered[index * CHUNK:(index + 1) * CHUNK], time.time()
            items = [extract_row(model, tokenizer, r, layers, k_max) for r in chunk]
            _save({"row_ids": [r.example.example_id for r in chunk], "model": model_name, "k_max": k_max,
                   "items": items}, target)
            took = time.time() - started
            log(f"extract {split} chunk {index + 1}/{math.ceil(len(ordered) / CHUNK)}: {len(chunk)} rows, "
                  f"{took / len(chunk):.1f} s/row, {np.mean([it['n_tokens'] for it in items]):.0f} tokens/row",
)



# ----------------------------------------------------------------------------- scores

def pad(values: list[np.ndarray], width: int = 5, fill: float = 0.0) -> np.ndarray:
    """Ragged per-row vectors -> [N, width]."""
    out = np.full((len(values), width), fill, dtype=np.float64)
    for i, v in enumerate(values):
        out[i, : len(v)] = v
    return out


def slate_scores(probs: np.ndarray, gold: np.ndarray, true: np.ndarray, n_options: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row scores of a predicted slate distribution ([N, W], 0 beyond each row's n):
    nll = -log p(person's choice); accuracy = the true probability of the predictor's top
    option (ties split evenly), i.e. its expected accuracy against people who choose by the
    truth; hit = 1 when the top option is the person's choice (ties split); tv = TV to the truth."""
    valid = np.arange(probs.shape[1])[None, :] < n_options[:, None]
    p = np.where(valid, probs, -np.inf)
    top = np.isclose(p, p.max(axis=1, keepdims=True), rtol=0, atol=1e-12) & valid
    share = top / top.sum(axis=1, keepdims=True)
    rows = np.arange(len(gold))
    return {
        "nll": -np.log(np.maximum(probs[rows, gold], 1e-300)),
        "accuracy": (share * true).sum(axis=1),
        "hit": share[rows, gold],
        "tv": 0.5 * np.abs(np.where(valid, probs - true, 0)).sum(axis=1),
    }


def summarize_scores(scores: dict[str, np.ndarray], plan, reference: dict[str, np.ndarray] | None = None) -> dict:
    """Mean and viewer-bootstrap interval of every score (and of the paired gap to `reference`)."""
    from grailcore.evaluation.bootstrap import mean_estimate

    out = {name: mean_estimate(values, plan).as_dict() for name, values in scores.items()}
    if reference is not None:
        for name in ("nll", "accuracy", "tv"):
            out[f"{name}_minus_bayes"] = mean_estimate(scores[name] - reference[name], plan).as_dict()
    return out


# ----------------------------------------------------------------------------- references

def uniform_probs(n_options: np.ndarray, width: int = 5) -> np.ndarray:
    return (np.arange(width)[None, :] < n_options[:, None]) / n_options[:, None]


def rule_probs(choice: np.ndarray, n_options: np.ndarray, width: int = 5) -> np.ndarray:
    """A deterministic rule as a (degenerate) distribution: all mass on its option."""
    out = np.zeros((len(choice), width))
    out[np.arange(len(choice)), choice] = 1.0
    return out


def most_viewed(rows: list[Row]) -> np.ndarray:
    return np.array([int(np.argmax(r.log_views)) for r in rows])


def viewer_side(row: Row) -> int:
    """+1 / -1 from the viewer's initial viewpoint as the prompt states it ('Supports ...' / 'Opposes ...')."""
    return -1 if row.example.meta["initial_viewpoint"].startswith("Opposes") else 1


def option_side(stance: np.ndarray) -> np.ndarray:
    """+1 / -1 / 0 (neutral) as the catalog draws it: neutral videos have |stance| < 0.15."""
    return np.where(np.abs(stance) < 0.15, 0, np.sign(stance)).astype(int)


def side_matches(rows: list[Row]) -> np.ndarray:
    """The most-viewed option on the viewer's side (their stated viewpoint), else the most viewed."""
    out = []
    for r in rows:
        match = option_side(r.stance) == viewer_side(r)
        views = np.where(match, r.log_views, -np.inf) if match.any() else r.log_views
        out.append(int(np.argmax(views)))
    return np.array(out)


_TIERS = ((0.0, 0.15), (0.15, 0.55), (0.55, 1.0))
"""|stance| ranges the catalog draws neutral / mild / strong videos from (uniformly)."""


def readable_probs(row: Row, params: StudyParams | None, samples: int = 64, seed: int = 0) -> np.ndarray:
    """[n] the best a reader of the prompt can do (approx.): the known choice model averaged
    over what the text hides, i.e. each video's stance within its side's tier (uniform), and
    the order the viewer saw (the prompt shuffles it, hiding the primacy term); lean, interest
    and views are taken as readable exactly."""
    from itertools import permutations

    model = (params or StudyParams()).choice
    rng = np.random.default_rng(seed)
    n = row.n_options

    def draw(stance: np.ndarray) -> np.ndarray:  # [samples, len(stance)]
        mag = np.abs(stance)
        tier = np.searchsorted([0.15, 0.55], mag, side="right")
        lo, hi = np.array([_TIERS[t][0] for t in tier]), np.array([_TIERS[t][1] for t in tier])
        u = rng.uniform(lo, hi, size=(samples, len(stance)))
        sign = np.where(tier == 0, rng.choice([-1.0, 1.0], size=(samples, len(stance))), np.sign(stance))
        return u * sign

    stance, current = draw(row.stance), draw(np.array([row.current_stance]))  # [S, n], [S, 1]
    scale = model.interest_scale[row.interest]
    base = (model.affinity * scale * stance * row.lean + model.popularity * row.log_views[None]
            + model.continuity * stance * current)  # [S, n]
    orders = np.array(list(permutations(range(n))))  # [P, n] original position of each shown option
    primacy = model.primacy * (1 - orders / (n - 1)) if n > 1 else np.full((1, 1), model.primacy)
    utility = base[:, None, :] + primacy[None]  # [S, P, n]
    utility = utility / model.temperature
    utility -= utility.max(axis=-1, keepdims=True)
    probs = np.exp(utility)
    return (probs / probs.sum(-1, keepdims=True)).mean(axis=(0, 1))


def oracle_features(row: Row) -> np.ndarray:
    """[n, 6] the choice model's own terms minus primacy, from the TRUE latents: stance x lean
    per interest level, log10 views, stance x current stance."""
    n = row.n_options
    affinity = np.zeros((n, len(INTEREST_LEVELS)))
    affinity[:, row.interest] = row.stance * row.lean
    return np.column_stack([affinity, row.log_views, row.stance * row.current_stance])


# ----------------------------------------------------------------------------- conditional logit

def fit_conditional_logit(x: torch.Tensor, mask: torch.Tensor, gold: torch.Tensor, l2: float,
                          init: torch.Tensor | None = None, max_iter: int = 300) -> torch.Tensor:
    """Weights w [D] of P(k) = softmax_k(x[k] . w) over each row's valid options, by L-BFGS on
    mean NLL + l2 * |w|^2. x: [N, W, D], mask: [N, W] bool, gold: [N] 0-based."""
    w = (init.clone() if init is not None else torch.zeros(x.shape[-1], dtype=x.dtype)).requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = conditional_logit_nll(x, mask, gold, w).mean() + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def conditional_logit_logp(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[N, W] log-probabilities over each row's valid options (-inf beyond)."""
    scores = (x @ w).masked_fill(~mask, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def conditional_logit_nll(x: torch.Tensor, mask: torch.Tensor, gold: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return -conditional_logit_logp(x, mask, w).gather(1, gold[:, None])[:, 0]


def stack_options(per_row: list[np.ndarray], width: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged [n_i, D] -> ([N, width, D] float64 zero-padded, [N, width] mask)."""
    dim = per_row[0].shape[1]
    x = torch.zeros(len(per_row), width, dim, dtype=torch.float64)
    mask = torch.zeros(len(per_row), width, dtype=torch.bool)
    for i, feats in enumerate(per_row):
        x[i, : len(feats)] = torch.as_tensor(np.asarray(feats, dtype=np.float64))
        mask[i, : len(feats)] = True
    return x, mask



# ----------------------------------------------------------------------------- cached features

@dataclass
class Cached:
    """The cached forward of one split's rows (in extraction order), aligned with `rows`."""

    rows: list[Row]
    items: list[dict]
    k_max: int = K_MAX
    """The cached fine-tuning stream enters layer L - k_max."""

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.items[0]["probe"]))

    def options(self, layer: int, pooling: str) -> list[np.ndarray]:
        """Per row [n, H] float64 option features ('end': last token of the line, 'mean': the line's mean)."""
        return [it["probe"][layer][f"option_{pooling}"].double().numpy() for it in self.items]

    def state(self, layer: int, where: str) -> np.ndarray:
        """[N, H] state features ('last': the answer prefix's last token, 'survey': end of the state text)."""
        key = {"last": "state_last", "survey": "survey_end"}[where]
        return np.stack([it["probe"][layer][key].double().numpy() for it in self.items])

    @property
    def gold(self) -> np.ndarray:
        return np.array([r.gold for r in self.rows])

    @property
    def n_options(self) -> np.ndarray:
        return np.array([r.n_options for r in self.rows])

    @property
    def true(self) -> np.ndarray:
        return pad([r.true_probs for r in self.rows])

    @property
    def viewer_ids(self) -> list[str]:
        return [r.viewer_id for r in self.rows]

    def head(self, n: int) -> "Cached":
        return Cached(self.rows[:n], self.items[:n], self.k_max)


def load_cached(run: Path, rows: list[Row], keep_ft: bool = False) -> Cached:
    """Every finished chunk of a split, in order (extraction stops at the first missing chunk)."""
    by_id = {r.example.example_id: r for r in rows}
    split = rows[0].split
    out_rows, items, index, k_max = [], [], 0, K_MAX
    while chunk_path(run, split, index).exists():
        chunk = torch.load(chunk_path(run, split, index), weights_only=False)
        k_max = chunk.get("k_max", K_MAX)
        for row_id, item in zip(chunk["row_ids"], chunk["items"]):
            if not keep_ft:
                item.pop("ft_input")
            out_rows.append(by_id[row_id])
            items.append(item)
        index += 1
    if not items:
        raise FileNotFoundError(f"{run}: no cached {split} features; run the extract stage first")
    return Cached(out_rows, items, k_max)


# ----------------------------------------------------------------------------- probes

@dataclass(frozen=True)
class ProbeSpec:
    """One conditional-logit head on frozen features: option features (within-slate centred,
    standardised, top `dim` principal components) plus the `rank` x `rank` products of the top
    option and state components (the option-by-viewer interactions), L2 weight `l2`."""

    layer: int
    pooling: str  # 'end' | 'mean'
    state: str  # 'last' | 'survey'
    dim: int
    rank: int
    l2: float

    def name(self) -> str:
        return f"L{self.layer}/{self.pooling}/{self.state}/d{self.dim}/r{self.rank}/l2={self.l2:g}"


def _centred(options: list[np.ndarray]) -> list[np.ndarray]:
    return [f - f.mean(axis=0, keepdims=True) for f in options]


def _whitening(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, projection [H, k]) mapping rows of x to k unit-variance principal scores."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / std
    _, sv, vt = np.linalg.svd(z, full_matrices=False)
    k = min(k, len(sv))
    return mean, std, vt[:k].T / (sv[:k] / math.sqrt(len(z)) + 1e-6)


def probe_designs(train: Cached, others: dict[str, Cached], layer: int, pooling: str, state: str,
                  max_dim: int, max_rank: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per split ([N, 5, max_dim + max_rank^2], mask): whitened principal scores of the option
    features (centred within each slate: the softmax ignores what all options share) and the
    products of the top max_rank option scores with the top max_rank state scores (the
    option-by-viewer interactions). Bases are fitted on `train` only; see design_columns."""
    opt_mean, opt_std, opt_proj = _whitening(np.concatenate(_centred(train.options(layer, pooling))), max_dim)
    st_mean, st_std, st_proj = _whitening(train.state(layer, state), max_rank)
    out = {}
    for name, c in {"train": train, **others}.items():
        s = (c.state(layer, state) - st_mean) / st_std @ st_proj  # [N, max_rank]
        per_row = []
        for i, f in enumerate(_centred(c.options(layer, pooling))):
            z = f / opt_std @ opt_proj  # [n, max_dim] (the centring made opt_mean ~0)
            inter = (z[:, :max_rank, None] * s[i][None, None, :]).reshape(len(f), -1)
            per_row.append(np.concatenate([z, inter], axis=1))
        out[name] = stack_options(per_row)
    return out


def design_columns(dim: int, rank: int, max_dim: int, max_rank: int) -> torch.Tensor:
    """Columns of probe_designs' layout for a smaller (dim, rank)."""
    inter = [max_dim + a * max_rank + b for a in range(rank) for b in range(rank)]
    return torch.tensor(list(range(dim)) + inter)


def probe_grid(layers: tuple[int, ...], dims=(32, 128), ranks=(0, 8, 16), l2s=(1e-1, 3e-2, 1e-2, 3e-3, 1e-3)) -> list[ProbeSpec]:
    """Every spec, l2 innermost and decreasing (each fit warm-starts the next)."""
    specs = []
    for layer in layers:
        for pooling in ("end", "mean"):
            for state in ("last", "survey"):
                for dim in dims:
                    for rank in ranks:
                        if rank or state == "last":  # without interactions the state is unused
                            specs += [ProbeSpec(layer, pooling, state, dim, rank, l2) for l2 in sorted(l2s, reverse=True)]
    return specs


def fit_probes(specs: list[ProbeSpec], train: Cached, others: dict[str, Cached], log=print) -> list[dict]:
    """Fit every spec on `train`; each result holds the spec and [N, 5] probabilities on `others`."""
    results, designs, group, init = [], None, None, None
    max_dim = max(s.dim for s in specs)
    max_rank = max(s.rank for s in specs)
    for i, spec in enumerate(specs):
        if (spec.layer, spec.pooling, spec.state) != group:
            group = (spec.layer, spec.pooling, spec.state)
            designs = probe_designs(train, others, *group, max_dim, max_rank)
            init = None
        cols = design_columns(spec.dim, spec.rank, max_dim, max_rank)
        x, mask = designs["train"]
        if init is not None and init.shape[0] != len(cols):
            init = None
        w = fit_conditional_logit(x[..., cols], mask, torch.as_tensor(train.gold), spec.l2, init)
        init = w
        probs = {name: conditional_logit_logp(designs[name][0][..., cols], designs[name][1], w).exp().numpy()
                 for name in others}
        results.append({"spec": spec, "probs": probs})
        if (i + 1) % 25 == 0 or i + 1 == len(specs):
            log(f"probe fits {i + 1}/{len(specs)}")
    return results


# ----------------------------------------------------------------------------- latent probes

def ridge_predict(x_train: np.ndarray, y_train: np.ndarray, x_eval: list[np.ndarray], l2: float) -> list[np.ndarray]:
    """Ridge regression on standardised features (intercept unpenalised); predictions for each of x_eval."""
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    z = (x_train - mean) / std
    gram = z.T @ z + l2 * len(z) * np.eye(z.shape[1])
    w = np.linalg.solve(gram, z.T @ (y_train - y_train.mean()))
    return [((x - mean) / std) @ w + y_train.mean() for x in x_eval]


def r_squared(y: np.ndarray, pred: np.ndarray) -> float:
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def latent_targets(c: Cached) -> dict[str, tuple[str, np.ndarray]]:
    """Known latent variables: (level, values); option level in the flattened option order."""
    opt = lambda f: np.concatenate([f(r) for r in c.rows])  # noqa: E731
    centred_logp = lambda r: np.log(r.true_probs) - np.log(r.true_probs).mean()  # noqa: E731
    return {
        "stance": ("option", opt(lambda r: r.stance)),
        "log10_views": ("option", opt(lambda r: r.log_views)),
        "stance_x_lean": ("option", opt(lambda r: r.stance * r.lean)),
        "true_utility": ("option", opt(centred_logp)),
        "viewer_lean": ("row", np.array([r.lean for r in c.rows])),
        "political_interest": ("row", np.array([float(r.interest) for r in c.rows])),
        "current_stance": ("row", np.array([r.current_stance for r in c.rows])),
    }


def viewer_folds(c: Cached, folds: int = 5) -> np.ndarray:
    """[N] fold of each row; a viewer's rows share one fold (they share state text)."""
    viewers = sorted(set(c.viewer_ids))
    index = {v: i % folds for i, v in enumerate(viewers)}
    return np.array([index[v] for v in c.viewer_ids])


def latent_probe(train: Cached, val: Cached, test: Cached, layer: int,
                 l2s=(1e-4, 1e-3, 1e-2, 1e-1, 1.0)) -> tuple[dict, dict]:
    """Ridge probes of each latent from the layer's features: option latents from option-line
    features, row latents from state features (pooling / position and l2 chosen on validation).
    Returns (R^2 per latent, predictions per latent and split; train ones cross-fitted by viewer)."""
    targets = {name: latent_targets(c) for name, c in (("train", train), ("validation", val), ("test", test))}
    folds = viewer_folds(train)
    option_folds = np.concatenate([np.full(r.n_options, f) for r, f in zip(train.rows, folds)])
    summary, predictions = {}, {}
    for name, (level, y_train) in targets["train"].items():
        y_val, y_test = targets["validation"][name][1], targets["test"][name][1]
        kinds = ("end", "mean") if level == "option" else ("survey", "last")
        best = None
        for kind in kinds:
            get = ((lambda c: np.concatenate(c.options(layer, kind))) if level == "option"
                   else (lambda c: c.state(layer, kind)))
            x_train, x_val, x_test = get(train), get(val), get(test)
            for l2 in l2s:
                p_val, p_test = ridge_predict(x_train, y_train, [x_val, x_test], l2)
                score = r_squared(y_val, p_val)
                if best is None or score > best["val_r2"]:
                    best = {"val_r2": score, "test_r2": r_squared(y_test, p_test), "features": kind, "l2": l2,
                            "x_train": x_train, "validation": p_val, "test": p_test}
        fold_of = option_folds if level == "option" else folds
        crossed = np.empty_like(y_train)
        for fold in np.unique(fold_of):
            held = fold_of == fold
            (crossed[held],) = ridge_predict(best["x_train"][~held], y_train[~held], [best["x_train"][held]], best["l2"])
        predictions[name] = {"train": crossed, "validation": best["validation"], "test": best["test"]}
        summary[name] = {k: best[k] for k in ("val_r2", "test_r2", "features", "l2")}
    return summary, predictions


def structured_design(c: Cached, latents: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The choice model's form on READ-OUT latents: per option [s*l, i*s*l, v, s*c] with s the
    option's stance, v its log10 views, l the viewer's lean, i the interest level, c the current
    video's stance (every one a linear probe's prediction)."""
    per_row, start = [], 0
    for i, row in enumerate(c.rows):
        s = latents["stance"][start:start + row.n_options]
        v = latents["log10_views"][start:start + row.n_options]
        start += row.n_options
        lean, interest, current = (latents[k][i] for k in ("viewer_lean", "political_interest", "current_stance"))
        per_row.append(np.column_stack([s * lean, interest * s * lean, v, s * current]))
    return stack_options(per_row)


def structured_probe(train: Cached, evals: dict[str, Cached], predictions: dict) -> dict:
    """Conditional logit on structured_design, fitted on training rows (their latents cross-fitted):
    how close to Bayes the features get when each latent is read out linearly and combined the
    way the choice model combines them. Uses the latents' labels, which choice data alone lacks."""
    design = {split: structured_design(c, {k: v[split] for k, v in predictions.items()})
              for split, c in {"train": train, **evals}.items()}
    best = None
    for l2 in ORACLE_L2S:
        w = fit_conditional_logit(*design["train"], torch.as_tensor(train.gold), l2)
        probs = {split: conditional_logit_logp(*design[split], w).exp().numpy() for split in evals}
        val = mean_nll(probs["validation"], evals["validation"])
        if best is None or val < best["val_nll"]:
            best = {"val_nll": val, "l2": l2, "weights": w.tolist(), "probs": probs}
    return best


_SUPPORT = re.compile(r"support score (?:is )?(\d+)%")


def stated_support(example: Example) -> float:
    """The viewer's pre-treatment support score (0-1) as the prompt's survey states it."""
    match = _SUPPORT.search(example.prompt)
    if match is None:
        raise ValueError(f"{example.example_id}: no 'support score is N%' in the prompt")
    return int(match.group(1)) / 100


def tier_mean(stance: np.ndarray) -> np.ndarray:
    """E[stance | side, tier]: what a reader who knows each title's side and tier can say."""
    mids = np.array([0.0, 0.35, 0.775])  # midpoints of the neutral / mild / strong |stance| ranges
    return np.sign(stance) * mids[np.searchsorted([0.15, 0.55], np.abs(stance), side="right")]


def readable_ceilings(test: Cached, readable: np.ndarray) -> dict[str, float]:
    """Test R^2 of what the prompt text reveals about each latent (see readable_probs)."""
    stance = np.concatenate([r.stance for r in test.rows])
    guess = tier_mean(stance)
    lean = np.array([r.lean for r in test.rows])
    stated = np.array([2 * stated_support(r.example) - 1 for r in test.rows])
    leans = np.concatenate([np.full(r.n_options, r.lean) for r in test.rows])
    current = np.array([r.current_stance for r in test.rows])
    logp = [np.log(np.maximum(readable[i, : r.n_options], 1e-300)) for i, r in enumerate(test.rows)]
    util = np.concatenate([np.log(r.true_probs) - np.log(r.true_probs).mean() for r in test.rows])
    return {"stance": r_squared(stance, guess), "log10_views": 1.0,
            "stance_x_lean": r_squared(stance * leans, guess * leans),
            "true_utility": r_squared(util, np.concatenate([lp - lp.mean() for lp in logp])),
            "viewer_lean": r_squared(lean, stated), "political_interest": 1.0,
            "current_stance": r_squared(current, tier_mean(current))}


# ----------------------------------------------------------------------------- fine-tuning

@dataclass(frozen=True)
class FinetuneSpec:
    """Direct-answer SFT of the top `k` decoder layers (and the final norm) on the person's
    answer digit: cross-entropy of the digit token at the answer slot, AdamW, constant lr."""

    k: int
    lr: float
    epochs: int
    batch: int = 8
    seed: int = 0

    def name(self) -> str:
        return f"top{self.k}_lr{self.lr:g}"


def load_model(model_name: str = MODEL):
    from grailcore.model import load_policy, load_tokenizer, resolve_model_path

    path = resolve_model_path(model_name)
    return load_policy(path), load_tokenizer(path)


def freeze_below(model, k: int) -> list[torch.nn.Parameter]:
    """Only the top k layers and the final norm train (grailcore's model.trainable_layers)."""
    for param in model.parameters():
        param.requires_grad_(False)
    trainable = [*decoder(model).layers[-k:], decoder(model).norm]
    params = [p for module in trainable for p in module.parameters()]
    for param in params:
        param.requires_grad_(True)
    return params


@torch.inference_mode()
def inputs_at(model, cached: Cached, k: int, k_max: int, cache_file: Path) -> list[torch.Tensor]:
    """Per row [T, H] bf16 stream entering layer L - k, from the extraction's L - k_max stream
    through the frozen layers in between (computed once, kept in cache_file)."""
    if k == k_max:
        return [it["ft_input"] for it in cached.items]
    if cache_file.exists():
        stored = torch.load(cache_file, weights_only=False)
        if stored["row_ids"] == [r.example.example_id for r in cached.rows]:
            return stored["inputs"]
    n_layers = len(decoder(model).layers)
    out = [run_layers(model, it["ft_input"].float()[None], n_layers - k_max, n_layers - k)[0].to(torch.bfloat16)
           for it in cached.items]
    _save({"row_ids": [r.example.example_id for r in cached.rows], "inputs": out}, cache_file)
    return out


def answer_logits(model, hidden_in: torch.Tensor, k: int) -> torch.Tensor:
    """[T, H] cached stream entering layer L - k -> [V] logits of the answer slot."""
    return top_logits(model, hidden_in.float()[None], k)[0]


@torch.no_grad()
def evaluate_slate(model, inputs: list[torch.Tensor], cached: Cached, k: int, digits: list[int]) -> dict[str, np.ndarray]:
    """Slate distribution (digits renormalised) and off-slate mass of every row."""
    probs, off = [], []
    for hidden, row in zip(inputs, cached.rows):
        logp, mass = slate_distribution(answer_logits(model, hidden, k), digits, row.n_options)
        probs.append(logp.exp().numpy())
        off.append(float(mass))
    return {"probs": pad(probs), "off_slate": np.array(off)}


def finetune(run: Path, spec: FinetuneSpec, train: Cached, evals: dict[str, Cached], model_name: str = MODEL,
             log=print) -> list[dict]:
    """Train per `spec`; evaluate every split in `evals` before training and after each epoch.
    Resumable: the state after each finished epoch is kept in run/ft/<name>/state.pt."""
    out_dir = run / "ft" / spec.name()
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(model_name)
    digits = digit_ids(tokenizer, 9)
    params = freeze_below(model, spec.k)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    inputs = {name: inputs_at(model, c, spec.k, train.k_max, run / "ft" / f"inputs-k{spec.k}-{name}-{len(c.rows)}.pt")
              for name, c in {"train": train, **evals}.items()}
    state_file, history, start = out_dir / "state.pt", [], 0
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        history, start = state["history"], state["epoch"]
    gold_ids = torch.tensor([digits[r.gold] for r in train.rows])

    def record(epoch: int, train_loss: float | None, seconds: float) -> None:
        model.eval()
        entry = {"epoch": epoch, "train_loss": train_loss, "seconds": seconds,
                 "splits": {name: evaluate_slate(model, inputs[name], c, spec.k, digits) for name, c in evals.items()}}
        history.append(entry)
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        _save({"model": trainable, "optimizer": optimizer.state_dict(), "history": history, "epoch": epoch}, state_file)
        nll = {n: float(slate_scores(v["probs"], evals[n].gold, evals[n].true, evals[n].n_options)["nll"].mean())
               for n, v in entry["splits"].items()}
        log(f"finetune {spec.name()} epoch {epoch}: train loss {train_loss}, NLL {nll}, {seconds:.0f} s")

    if start == 0 and not history:
        record(0, None, 0.0)
    for epoch in range(start + 1, spec.epochs + 1):
        model.train()
        order = np.random.default_rng([spec.seed, epoch]).permutation(len(train.rows))
        started, total = time.time(), 0.0
        for b in range(0, len(order), spec.batch):
            batch = order[b:b + spec.batch]
            optimizer.zero_grad()
            for i in batch:
                loss = F.cross_entropy(answer_logits(model, inputs["train"][i], spec.k)[None], gold_ids[i:i + 1])
                (loss / len(batch)).backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
        record(epoch, total / len(order), time.time() - started)
    return history



# ----------------------------------------------------------------------------- stages

SPLITS = ("train", "validation", "test")
ORACLE_L2S = (1e-2, 1e-3, 1e-4)
PROBE_L2S = (1.0, 0.3, 0.1, 3e-2, 1e-2, 3e-3, 1e-3)


def mean_nll(probs: np.ndarray, c: Cached) -> float:
    return float(slate_scores(probs, c.gold, c.true, c.n_options)["nll"].mean())


def oracle_logit(train: Cached, others: dict[str, Cached]) -> dict:
    """The choice model's own terms (true latents, no primacy) fitted by maximum likelihood on
    the same training rows: what a correctly specified 6-parameter model reaches with them."""
    design = {name: stack_options([oracle_features(r) for r in c.rows]) for name, c in {"train": train, **others}.items()}
    best = None
    for l2 in ORACLE_L2S:
        w = fit_conditional_logit(*design["train"], torch.as_tensor(train.gold), l2)
        probs = {name: conditional_logit_logp(*design[name], w).exp().numpy() for name in others}
        val = mean_nll(probs["validation"], others["validation"])
        if best is None or val < best["val_nll"]:
            best = {"val_nll": val, "l2": l2, "weights": w.tolist(), "probs": probs}
    return best


def probe_stage(run: Path, rows: dict[str, list[Row]], log=print) -> dict:
    """Fit every probe spec, select on validation; latent probes per layer; learning curves."""
    train, val, test = (load_cached(run, rows[s]) for s in SPLITS)
    evals = {"validation": val, "test": test}
    log(f"probe: {len(train.rows)} train, {len(val.rows)} validation, {len(test.rows)} test rows")
    fits = fit_probes(probe_grid(train.layers, l2s=PROBE_L2S), train, evals, log)
    for fit in fits:
        fit["val_nll"] = mean_nll(fit["probs"]["validation"], val)
    best = min(fits, key=lambda f: f["val_nll"])
    per_layer = {layer: min((f for f in fits if f["spec"].layer == layer), key=lambda f: f["val_nll"])
                 for layer in train.layers}
    latent, structured = {}, {}
    for layer in train.layers:
        latent[layer], predictions = latent_probe(train, val, test, layer)
        structured[layer] = structured_probe(train, evals, predictions)
        log(f"layer {layer}: latent R^2 {({k: round(v['test_r2'], 3) for k, v in latent[layer].items()})}, "
            f"structured probe val NLL {structured[layer]['val_nll']:.4f}")
    curve = []
    for n in learning_curve_sizes(len(train.rows)):
        sub = train.head(n)
        same = [replace_l2(best["spec"], l2) for l2 in sorted(PROBE_L2S, reverse=True)]
        sub_fits = fit_probes(same, sub, evals, log=lambda *_: None)
        chosen = min(sub_fits, key=lambda f: mean_nll(f["probs"]["validation"], val))
        oracle = oracle_logit(sub, evals)
        curve.append({"train_rows": n, "probe_test_nll": mean_nll(chosen["probs"]["test"], test),
                      "oracle_logit_test_nll": mean_nll(oracle["probs"]["test"], test)})
        log(f"learning curve {curve[-1]}")
    result = {
        "train_rows": len(train.rows),
        "selection": sorted(({"spec": f["spec"].name(), "val_nll": f["val_nll"]} for f in fits), key=lambda r: r["val_nll"]),
        "best": {"spec": best["spec"].name(), "val_nll": best["val_nll"], "probs": best["probs"]},
        "best_per_layer": {layer: {"spec": f["spec"].name(), "val_nll": f["val_nll"], "probs": f["probs"]}
                           for layer, f in per_layer.items()},
        "latent": latent,
        "structured": structured,
        "oracle_logit": oracle_logit(train, evals),
        "curve": curve,
    }
    _save(result, run / "probe.pt")
    return result


def replace_l2(spec: ProbeSpec, l2: float) -> ProbeSpec:
    return ProbeSpec(spec.layer, spec.pooling, spec.state, spec.dim, spec.rank, l2)


def learning_curve_sizes(n: int) -> list[int]:
    """Training-set sizes halving down from n (at least 64 rows)."""
    sizes = [n]
    while sizes[-1] // 2 >= 64:
        sizes.append(sizes[-1] // 2)
    return sorted(sizes)


def parse_finetune(text: str) -> list[FinetuneSpec]:
    """'k:lr:epochs,...' -> specs, e.g. '1:3e-4:8,2:1e-4:4'."""
    specs = []
    for part in filter(None, text.split(",")):
        try:
            k, lr, epochs = part.split(":")
            specs.append(FinetuneSpec(int(k), float(lr), int(epochs)))
        except ValueError:
            raise ValueError(f"--finetune entry {part!r}: expected k:lr:epochs, e.g. 2:1e-4:4") from None
        if not 1 <= specs[-1].k <= K_MAX:
            raise ValueError(f"--finetune entry {part!r}: k must be in 1..{K_MAX} (the cached stream enters layer L-{K_MAX})")
    return specs


def finetune_stage(run: Path, rows: dict[str, list[Row]], specs: list[FinetuneSpec], model_name: str = MODEL,
                   log=print) -> dict[str, list[dict]]:
    train, val, test = (load_cached(run, rows[s], keep_ft=True) for s in SPLITS)
    log(f"finetune: {len(train.rows)} train rows; evaluating {len(val.rows)} validation, {len(test.rows)} test")
    for spec in specs:
        if spec.k > train.k_max:
            raise ValueError(f"fine-tuning top {spec.k} layers needs the stream entering layer L-{spec.k}; "
                             f"the cache under {run} holds L-{train.k_max}")
    return {spec.name(): finetune(run, spec, train, {"validation": val, "test": test}, model_name, log)
            for spec in specs}


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("extract", "probe", "finetune", "report", "all"))
    p.add_argument("--run", default="runs/learnability", help="cache folder (features, fits, checkpoints)")
    p.add_argument("--out", default="experiments/results/learnability", help="committed results folder")
    p.add_argument("--model", default=MODEL, help="registry name or local HF dir (a Llama-family causal LM)")
    p.add_argument("--variant", default="default", choices=sorted(VARIANTS), help="synthetic study variant")
    p.add_argument("--issue", default="gun_control")
    p.add_argument("--n", type=int, default=3000, help="decisions in the study (all splits)")
    p.add_argument("--seed", type=int, default=0, help="study, split and option-shuffle seed (the loader's)")
    p.add_argument("--train-rows", type=int, default=None, help="cap on training rows (whole viewers, seeded)")
    p.add_argument("--val-rows", type=int, default=None, help="cap on validation rows")
    p.add_argument("--test-rows", type=int, default=None, help="cap on test rows")
    p.add_argument("--finetune", default="1:1e-4:6,1:1e-3:6,2:1e-4:4",
                   help="fine-tuning runs as k:lr:epochs (top-k layers trained), comma separated")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine more threads oversubscribe and run slower)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    rows = study_rows(args.issue, args.n, args.seed, args.variant)
    limits = {"train": args.train_rows, "validation": args.val_rows, "test": args.test_rows}
    if args.stage in ("extract", "all"):
        extract(run, rows, limits, args.seed, args.model)
    if args.stage in ("probe", "all"):
        probe_stage(run, rows)
    if args.stage in ("finetune", "all"):
        finetune_stage(run, rows, parse_finetune(args.finetune), args.model)
    if args.stage in ("report", "all"):
        from learnability_report import write_report  # the plots need matplotlib; extraction does not

        write_report(run, Path(args.out), rows, args)


if __name__ == "__main__":
    main()
