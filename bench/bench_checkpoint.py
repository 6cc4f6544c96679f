"""Checkpoint save and load: time and each rank's peak memory, full vs sharded layout.

- `full`: model and optimizer gathered to rank 0 (`full_state_dict`, CPU offload), which
  writes model.safetensors + optimizer.pt (`--checkpoint.no-sharded`);
- `sharded`: every rank writes its own shards through torch.distributed.checkpoint (the
  default).

The policy is FSDP2-sharded as in training, with AdamW state from one real step, so a
checkpoint holds weights + two Adam moments (12 bytes per parameter in fp32). Layouts are
measured round-robin in the same processes; times are the slowest rank's, peak memory is each
rank's RSS high-water mark above its RSS before the call (bench.harness).

    torchrun --nproc_per_node 2 -m bench.bench_checkpoint --model smollm2-135m-instruct

Appends CSV rows (bench/results/checkpoint.csv) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from bench import machine
from bench.harness import markdown_rows, measure_round_robin, write_csv
from grailcore import checkpoint as ckpt
from grailcore import dist as gdist
from grailcore.config import Config
from grailcore.model import load_policy, resolve_model_path
from grailcore.policy import PolicyModel

LAYOUTS = ("full", "sharded")


def _sharded_policy(name: str, info) -> torch.nn.Module:
    model = PolicyModel(load_policy(resolve_model_path(name), "float32"), "fused", 1024)
    if info.world_size > 1:
        from grailcore.parallel import parallelize

        model = parallelize(model, Config(), info)
    return model


def _one_step(model: PolicyModel, optimizer: torch.optim.Optimizer) -> None:
    ids = torch.arange(16).view(2, 8) + 100
    logprobs = model(ids, torch.ones_like(ids), 4, temperature=1.0)  # through the FSDP2 root
    (-logprobs.logprobs.mean()).backward()
    optimizer.step()
    optimizer.zero_grad()


def _size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp dir)")
    parser.add_argument("--out", default="bench/results/checkpoint.csv")
    args = parser.parse_args()

    info = gdist.init_distributed()
    model = _sharded_policy(args.model, info)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    _one_step(model, optimizer)
    params = sum(p.numel() for p in model.parameters())  # DTensor.numel() is the global count
    root = Path(gdist.broadcast_object(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_")))
    saved: dict[str, Path] = {}
    step = {"n": 0}

    def save(layout: str):
        def call() -> None:
            step["n"] += 1
            saved[layout] = ckpt.save_checkpoint(root / layout, step["n"], model, optimizer, None, {},
                                                 keep=1, sharded=layout == "sharded")
        return call

    def load(layout: str):
        return lambda: ckpt.load_checkpoint(root / layout, model, optimizer)

    saves = measure_round_robin({layout: save(layout) for layout in LAYOUTS}, device="cpu", warmup=1,
                                repeats=args.repeats, after_each=lambda _: gdist.barrier())
    loads = measure_round_robin({layout: load(layout) for layout in LAYOUTS}, device="cpu", warmup=1,
                                repeats=args.repeats, after_each=lambda _: gdist.barrier())
    mine = {layout: (saves[layout].median_s, saves[layout].peak_mib, loads[layout].median_s, loads[layout].peak_mib)
            for layout in LAYOUTS}
    per_rank = gdist.all_gather_object(mine)
    if gdist.is_main():
        rows = []
        for layout in LAYOUTS:
            ranks = [r[layout] for r in per_rank]
            rows.append({
                "model": args.model, "params_m": round(params / 1e6, 1), "world_size": info.world_size,
                "layout": layout, "save_s": round(max(r[0] for r in ranks), 2),
                "save_peak_mib_rank0": round(ranks[0][1]),
                "save_peak_mib_max_other": round(max((r[1] for r in ranks[1:]), default=0)),
                "load_s": round(max(r[2] for r in ranks), 2),
                "load_peak_mib_rank0": round(ranks[0][3]),
                "load_peak_mib_max_other": round(max((r[3] for r in ranks[1:]), default=0)),
                "checkpoint_mib": round(_size_bytes(saved[layout]) / 2**20), "machine": machine.summary(),
            })
        write_csv(args.out, rows)
        print(markdown_rows(rows, [c for c in rows[0] if c != "machine"], header=True))
        print(f"\n{machine.summary()}")
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    gdist.finish_worker()


if __name__ == "__main__":
    main()
