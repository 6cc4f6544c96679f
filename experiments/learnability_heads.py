"""Heads fitted on the frozen features cached by experiments/learnability.py (issue #21,
item 4): conditional-logit probes trained on the people's choices, ridge probes of each latent
variable, and the choice model's own form on true or read-out latents."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from learnability_rows import (
    Row, oracle_features, pad, slate_scores, stated_support, tier_mean,
)


# ----------------------------------------------------------------------------- cache

K_MAX = 4
"""The residual stream entering layer L - K_MAX is cached, so up to K_MAX top layers can be trained
(fewer on a model with fewer layers)."""


def _save(obj, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a chunk is either whole or absent: a killed run resumes cleanly


def chunk_path(run: Path, split: str, index: int) -> Path:
    return run / "features" / f"{split}-{index:04d}.pt"


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


# ----------------------------------------------------------------------------- probes on choices

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


def replace_l2(spec: ProbeSpec, l2: float) -> ProbeSpec:
    return ProbeSpec(spec.layer, spec.pooling, spec.state, spec.dim, spec.rank, l2)


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


def learning_curve_sizes(n: int) -> list[int]:
    """Training-set sizes halving down from n (at least 64 rows)."""
    sizes = [n]
    while sizes[-1] // 2 >= 64:
        sizes.append(sizes[-1] // 2)
    return sorted(sizes)


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
