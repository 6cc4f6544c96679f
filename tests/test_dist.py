import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grailcore import dist as gdist

REPO = Path(__file__).resolve().parents[1]


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: int = 120) -> None:
    """Run `script` under `torchrun --standalone` (free port), failing with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def test_single_process_is_world_one_without_a_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = gdist.init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (0, 1, 0, None)
    assert info.is_main and gdist.is_main()
    assert not torch.distributed.is_initialized()
    assert gdist.all_reduce_mean({"b": 2, "a": 1.5}) == {"a": 1.5, "b": 2.0}
    assert gdist.broadcast_object({"x": 1}) == {"x": 1}
    gdist.barrier()
    gdist.shutdown()  # nothing to destroy: must not raise


def test_rank_survives_a_destroyed_group(monkeypatch):
    # After vLLM destroys the default group, rank 1 must not start acting as rank 0.
    monkeypatch.setenv("RANK", "1")
    assert gdist.get_rank() == 1 and not gdist.is_main()


def test_malformed_torchrun_env_is_reported(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        gdist.init_distributed()


WORKER = '''
import json, sys, torch
from grailcore import dist as gdist

out = sys.argv[1]
info = gdist.init_distributed()
assert info.world_size == 2 and info.backend == "gloo" and torch.distributed.is_initialized()
mean = gdist.all_reduce_mean({"loss": float(info.rank) * 2 + 1, "reward": 10.0 * info.rank})
obj = gdist.broadcast_object({"from": info.rank} if info.rank == 0 else None)
mismatch = None
try:
    gdist.all_reduce_mean({"loss": 1.0, f"only_on_rank_{info.rank}": 1.0})
except ValueError as e:
    mismatch = str(e)
gdist.barrier()
torch.distributed.destroy_process_group()  # as vLLM's engine shutdown does
gdist.shutdown()  # must not fail on the destroyed group
with open(f"{out}/rank{info.rank}.json", "w") as f:
    json.dump({"mean": mean, "obj": obj, "is_main": gdist.is_main(), "mismatch": mismatch}, f)
'''


def test_two_rank_gloo_collectives(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    torchrun(script, str(tmp_path), timeout=60)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, res in enumerate(results):
        # loss: (1 + 3) / 2, reward: (0 + 10) / 2
        assert res["mean"] == {"loss": 2.0, "reward": 5.0}
        assert res["obj"] == {"from": 0}
        assert res["is_main"] == (rank == 0)
        assert res["mismatch"] is not None and "different keys" in res["mismatch"]


_FINISH = """
import logging, os, sys
from grailcore import dist
logging.basicConfig(stream=sys.stderr, level=logging.INFO)
sys.stdout.write("buffered line")  # no newline: still in the buffer at exit
logging.getLogger("x").info("logged line")
dist.exit_finished_worker()
print("not reached in a worker")
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_finished_worker_flushes_then_skips_finalization_only_in_workers(world_size):
    env = {**os.environ, "WORLD_SIZE": world_size, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _FINISH], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("buffered line") and "logged line" in proc.stderr
    # One process returns and goes on; a torchrun worker leaves right there.
    assert ("not reached in a worker" in proc.stdout) == (world_size == "1")
