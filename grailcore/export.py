"""Export the policy as a Hugging Face model dir (config, tokenizer, safetensors) that
transformers and vLLM load; written to a temp dir and renamed into place."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from grailcore import dist as gdist
from grailcore.atomic_files import fsync_path, replace_dir
from grailcore.lora import has_lora
from grailcore.rollout.sync import iter_full_params


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: canonical} for parameters registered under several names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def export_hf(model: torch.nn.Module, tokenizer, out_dir: str | Path, records: dict[str, dict] | None = None) -> Path:
    """Write the policy as a HF model dir (config, tokenizer, safetensors) loadable by
    `AutoModelForCausalLM.from_pretrained` and vLLM, plus each of `records` as a JSON file
    of that name. Every rank calls it; rank 0 writes.
    A LoRA policy is written merged (W + scale * B @ A): a plain model, no peft to load it."""
    out = Path(out_dir)
    if has_lora(model):
        keep = gdist.is_main()  # every rank takes part in the gathers; rank 0 keeps the tensors
        state_dict = {name: tensor.cpu() for name, tensor in iter_full_params(model) if keep}
    else:
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    gdist.run_on_rank0(f"export {out}", lambda: _write_hf_dir(model, tokenizer, state_dict, out, records or {}))
    return out


def _write_hf_dir(model: torch.nn.Module, tokenizer, state_dict: dict, out: Path, records: dict[str, dict]) -> None:
    # Tied weights are one tensor: HF re-ties from config.tie_word_embeddings on load.
    for alias in tied_aliases(model):
        state_dict.pop(alias, None)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        # save_pretrained applies the model family's checkpoint conventions (key names,
        # config, generation config) and only reads the given state dict, so FSDP2 works.
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, record in records.items():
            (tmp / name).write_text(json.dumps(record, indent=1))
        for file in tmp.iterdir():
            if file.is_file():
                fsync_path(file)
        fsync_path(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
