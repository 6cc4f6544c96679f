"""Issue #21 item 4: can SmolLM2-135M-Instruct learn the synthetic study's choice at all, or
does the trainer fail to teach it? Stages, on the same rows and viewer splits as grailcore's loader:
  extract   one frozen forward per row (prompt + the answer prefix `<answer>`): hidden states
            at each option's line and at the state, the zero-shot next-token distribution over
            the option digits, and the residual stream entering the top K_MAX layers (cached,
            so fine-tuning the top layers never re-runs the frozen bottom);
  probe     conditional-logit heads on the frozen features trained on the people's choices
            (selected on validation), ridge probes of each latent variable and the choice
            model's form on the read-out latents (learnability_heads.py), learning curves;
  finetune  direct-answer SFT of the top k layers on the person's answer digit, per-epoch
            held-out NLL / accuracy / TV / off-slate mass;
  report    every predictor and reference (learnability_rows.py) on the test rows with
            viewer-bootstrap intervals, plots, verdict -> OUT/README.md + JSON (learnability_report.py).

Every stage caches under RUN and resumes (finished chunks, fits and epochs are kept):
    python experiments/learnability.py all --run runs/learnability --out experiments/results/learnability
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from grailcore.data.prompt import encode_prompt
from grailcore.data.schema import Example
from learnability_heads import (
    K_MAX, PROBE_L2S, Cached, _save, chunk_path, fit_probes, latent_probe, learning_curve_sizes, load_cached,
    mean_nll, oracle_logit, probe_grid, replace_l2, structured_probe,
)
from learnability_rows import VARIANTS, Row, extraction_order, pad, slate_scores, study_rows

MODEL = "smollm2-135m-instruct"
ANSWER_PREFIX = "<answer>"
"""Appended after the assistant turn's start: the next token is the option digit."""
CHUNK = 16
"""Rows per cache file (the unit of resumption)."""


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
                f"{took / len(chunk):.1f} s/row, {np.mean([it['n_tokens'] for it in items]):.0f} tokens/row")


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
    p.add_argument("--finetune", default="1:1e-4:6,1:1e-3:6",
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
