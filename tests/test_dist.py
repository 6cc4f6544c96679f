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


COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
               "all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")

CHECKED_RUN = '''
import json, sys
from pathlib import Path
import torch, torch.distributed as tdist
from grailcore import dist as gdist
import grailcore.train

PACKAGE, HELPER = str(Path(gdist.__file__).parent), gdist.__file__
bad, callers = [], set()


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _checked(name, real):
    def call(*args, **kwargs):
        frame = sys._getframe(1)
        if frame.f_code.co_filename.startswith(PACKAGE):  # the trainer's own call, not torch's inside FSDP
            devices = {{str(t.device) for t in _tensors(list(args) + list(kwargs.values()))}}
            where = f"{{frame.f_code.co_filename}}:{{frame.f_lineno}}"
            if frame.f_code.co_filename != HELPER or devices - {{str(gdist.collective_device())}}:
                bad.append(f"{{name}} at {{where}} on {{sorted(devices)}}")
            while frame.f_code.co_filename == HELPER:
                frame = frame.f_back
            callers.add(f"{{Path(frame.f_code.co_filename).stem}}.{{frame.f_code.co_name}}")
        return real(*args, **kwargs)
    return call


for name in {collectives!r}:
    setattr(tdist, name, _checked(name, getattr(tdist, name)))
grailcore.train.main(sys.argv[2:])
with open(f"{{sys.argv[1]}}/rank{{gdist.get_rank()}}.json", "w") as f:
    json.dump({{"bad": bad, "callers": sorted(callers)}}, f)
'''


@pytest.mark.slow
def test_every_collective_of_a_two_rank_run_goes_through_dist_on_the_groups_device(tmp_path):
    """Each torch.distributed collective is wrapped: one the trainer calls from anywhere but
    grailcore/dist.py, or with a tensor off the group's device, is recorded as wrong. (On gloo
    the group's device is the CPU, so here the routing is what fails; on nccl the same route
    moves every tensor to CUDA.) The run takes the paths with collectives: dapo's global token
    count, batch-scaled advantages, the discriminator's broadcast, metrics and replay, checkpoints
    (RNG of every rank), metrics, the final evaluation, and the bucketed weight sync into each
    rank's HF engine copy."""
    script = tmp_path / "checked_run.py"
    script.write_text(CHECKED_RUN.format(collectives=COLLECTIVES))
    torchrun(script, str(tmp_path), "--run-dir", str(tmp_path / "run"), "--model.name-or-path", "micro-llama",
             "--model.no-gradient-checkpointing", "--data.synthetic-n", "100", "--data.max-history", "1",
             "--rollout.max-prompt-tokens", "4096", "--rollout.max-completion-tokens", "8",
             "--grpo.prompts-per-step", "2", "--grpo.group-size", "2", "--grpo.loss-type", "dapo",
             "--grpo.scale-rewards", "batch", "--rewards.names", "length", "gail", "--rewards.weights", "1.0", "0.5",
             "--gail.model", "tiny-bert", "--gail.max-tokens", "256", "--gail.replay-size", "8",
             "--optim.lr", "1e-3", "--optim.max-steps", "2", "--checkpoint.every", "1", "--checkpoint.no-export-final",
             "--eval.max-samples", "2", "--logging.no-tensorboard", "--logging.no-progress", timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["bad"] == [], result["bad"]
        assert {"optimize._global_items", "steps.step_advantages", "ranks.broadcast_from_rank0",
                "discriminator._extend_replay", "discriminator.metrics", "trainer.reduce",
                "sync._gather_bucket"} <= set(result["callers"]), result["callers"]
