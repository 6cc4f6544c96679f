import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from grailcore import checkpoint as ckpt
from grailcore.export import export_hf
from grailcore.rng import capture_rng_state, restore_rng_state
from grailcore.model import load_policy, load_tokenizer, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
SMALL_FILES = {"scheduler.pt", "trainer_state.json", "extra.pt", "rng.pt", "manifest.json"}
WEIGHT_FILES = {True: {"state"}, False: {"model.safetensors", "optimizer.pt"}}  # by `sharded`
# The file a test corrupts or deletes in each layout: one rank's shard / the gathered weights.
WEIGHTS = {True: "state/__0_0.distcp", False: "model.safetensors"}
LAYOUTS = pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "full"])


def tiny_llama() -> nn.Module:
    return load_policy(resolve_model_path("tiny-llama"))


class Toy(nn.Module):
    """Tied embedding/head like a small LM, for the tests that only exercise file handling."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.mid = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


class Policy(nn.Module):
    """The trainer's shape: the HF model under `.lm`, FSDP2's root is this wrapper."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, **kwargs):
        return self.lm(**kwargs)


def make_optim(model: nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    # lr changes every step, so a scheduler that was not restored shows in the lr.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    return optimizer, scheduler


def train_step(model: nn.Module, optimizer, scheduler) -> None:
    ids = torch.arange(8).view(2, 4) % 16
    out = model(ids) if isinstance(model, Toy) else model(input_ids=ids, labels=ids).loss
    out.float().square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(4).tolist()


def clone_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_weights_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name


def save_toy(run_dir: Path, step: int, model: Toy, optimizer, scheduler, **kw) -> Path:
    return ckpt.save_checkpoint(run_dir, step, model, optimizer, scheduler, {"step": step}, **kw)


@LAYOUTS
def test_round_trip_restores_weights_optimizer_scheduler_rng_and_state(tmp_path, sharded):
    model = tiny_llama()
    optimizer, scheduler = make_optim(model)
    train_step(model, optimizer, scheduler)
    state = {"step": 1, "sampler_position": 7, "best_metric": float("-inf")}
    extra = {"discriminator": {"w": torch.arange(3.0)}, "replay": ["a", "b"]}
    path = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, state, extra=extra, sharded=sharded)
    after_save = draws()

    assert path == tmp_path / "checkpoints" / "step_00000001"
    assert {p.name for p in path.iterdir()} == SMALL_FILES | WEIGHT_FILES[sharded]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    saved = ckpt.read_model_weights(path)
    assert "lm_head.weight" not in saved, "the tied head is stored twice"
    assert saved.keys() == clone_weights(model).keys() - {"lm_head.weight"}
    assert all(torch.equal(saved[k], v) for k, v in clone_weights(model).items() if k in saved)

    fresh = tiny_llama()
    fresh_opt, fresh_sched = make_optim(fresh)
    loaded = ckpt.load_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched)
    assert draws() == after_save
    assert (loaded.step, loaded.path, loaded.trainer_state) == (1, path, state)
    assert torch.equal(loaded.extra["discriminator"]["w"], torch.arange(3.0))
    assert loaded.extra["replay"] == ["a", "b"]
    assert_weights_equal(fresh, clone_weights(model))
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key, value in optimizer.state[p].items():
            assert torch.equal(fresh_opt.state[q][key], value), key
    assert fresh_sched.state_dict() == scheduler.state_dict()
    assert fresh_opt.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"] == 0.5e-2
    # The resumed run continues exactly like the original one.
    train_step(model, optimizer, scheduler)
    train_step(fresh, fresh_opt, fresh_sched)
    assert_weights_equal(fresh, clone_weights(model))


def test_no_checkpoint_loads_none(tmp_path):
    assert ckpt.load_checkpoint(tmp_path, Toy()) is None


@LAYOUTS
def test_corrupt_latest_falls_back_to_previous_with_warning(tmp_path, sharded):
    model = Toy()
    optimizer, scheduler = make_optim(model)
    train_step(model, optimizer, scheduler)
    save_toy(tmp_path, 1, model, optimizer, scheduler, sharded=sharded)
    good = clone_weights(model)
    train_step(model, optimizer, scheduler)
    bad = save_toy(tmp_path, 2, model, optimizer, scheduler, sharded=sharded)
    data = bytearray((bad / WEIGHTS[sharded]).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of a weight: still a loadable file, only the sha256 knows
    (bad / WEIGHTS[sharded]).write_bytes(bytes(data))

    fresh = Toy()
    with pytest.warns(ckpt.CheckpointWarning, match=f"step_00000002.*{WEIGHTS[sharded]} does not match"):
        loaded = ckpt.load_checkpoint(tmp_path, fresh, *make_optim(fresh))
    assert loaded.step == 1 and loaded.trainer_state == {"step": 1}
    assert_weights_equal(fresh, good)


@LAYOUTS
def test_missing_file_and_no_good_checkpoint_raise(tmp_path, sharded):
    model = Toy()
    optimizer, scheduler = make_optim(model)
    path = save_toy(tmp_path, 1, model, optimizer, scheduler, sharded=sharded)
    missing = "state/.metadata" if sharded else "optimizer.pt"
    (path / missing).unlink()
    with pytest.warns(ckpt.CheckpointWarning, match=f"{missing} is missing"):
        with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
            ckpt.load_checkpoint(tmp_path, Toy())


def test_missing_latest_uses_newest_finished_dir(tmp_path):
    # A crash between the rename and the update of `latest` leaves a finished dir.
    model = Toy()
    optimizer, scheduler = make_optim(model)
    save_toy(tmp_path, 3, model, optimizer, scheduler)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert ckpt.load_checkpoint(tmp_path, Toy()).step == 3


@LAYOUTS
def test_disk_full_mid_write_keeps_previous_checkpoint_and_latest(tmp_path, monkeypatch, sharded):
    from torch.distributed.checkpoint import filesystem

    model = Toy()
    optimizer, scheduler = make_optim(model)
    save_toy(tmp_path, 1, model, optimizer, scheduler, sharded=sharded)
    good = clone_weights(model)
    train_step(model, optimizer, scheduler)

    def full_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full_disk_shard(transforms, stream, *args, **kwargs):  # DCP's write of one tensor
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if sharded:
        monkeypatch.setattr(filesystem, "_write_item", full_disk_shard)
    else:
        monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match=r"ENOSPC.*step_00000001 and `latest` are intact"):
        save_toy(tmp_path, 2, model, optimizer, scheduler, sharded=sharded)
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert {p.name for p in root.iterdir()} == {"latest", "step_00000001"}  # no temp dir left
    assert (root / "latest").read_text().strip() == "step_00000001"
    fresh = Toy()
    assert ckpt.load_checkpoint(tmp_path, fresh).step == 1
    assert_weights_equal(fresh, good)


def test_pruning_keeps_the_newest(tmp_path):
    model = Toy()
    optimizer, scheduler = make_optim(model)
    for step in range(1, 5):
        save_toy(tmp_path, step, model, optimizer, scheduler, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    save_toy(tmp_path, 5, model, optimizer, scheduler, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005"]
    # Resumed from an earlier step: checkpoints of the abandoned future are removed, loudly.
    with pytest.warns(ckpt.CheckpointWarning, match="step_00000005.*newer than step_00000002"):
        save_toy(tmp_path, 2, model, optimizer, scheduler, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]


def test_bad_trainer_state_or_extra_is_rejected_before_writing(tmp_path):
    model = Toy()
    optimizer, scheduler = make_optim(model)
    with pytest.raises(TypeError, match="trainer_state is not JSON-serializable"):
        ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {"w": torch.ones(1)})
    with pytest.raises(TypeError, match=r"extra\['buf'\] is a ndarray"):
        ckpt.save_checkpoint(tmp_path, 1, model, optimizer, scheduler, {}, extra={"buf": np.ones(2)})
    assert not (tmp_path / "checkpoints").exists()


def test_rng_capture_restore_repeats_draws():
    state = capture_rng_state()
    first = draws()
    restore_rng_state(state)
    assert draws() == first


def test_export_hf_loads_in_transformers_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_llama()
    with torch.no_grad():  # trained weights, not the ones on disk
        model.model.embed_tokens.weight.add_(0.01)
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    tokenizer = load_tokenizer(resolve_model_path("tiny-llama"))
    out = export_hf(model, tokenizer, tmp_path / "export")
    export_hf(model, tokenizer, out)  # re-export replaces the dir
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.config.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(out).encode("hello world") == tokenizer.encode("hello world")
    ids = torch.tensor([tokenizer.encode("the quick brown fox")])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


FSDP_WORKER = '''
import sys
from pathlib import Path
import torch
from torch.distributed.fsdp import fully_shard
from grailcore import checkpoint as ckpt, dist as gdist
from grailcore.export import export_hf
from grailcore.model import load_policy, load_tokenizer, resolve_model_path

plain_dir, sharded_dir, export_dir, out = map(Path, sys.argv[1:5])
sharded = sys.argv[5] == "sharded"  # the layout this run writes; loading reads either
info = gdist.init_distributed()
assert info.world_size == 2
class Policy(torch.nn.Module):  # as in the test module: the root wraps the HF model
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, **kwargs):
        return self.lm(**kwargs)

path = resolve_model_path("tiny-llama")
model = Policy(load_policy(path))
for layer in model.lm.model.layers:
    fully_shard(layer)
fully_shard(model)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))

def dump(name):
    torch.save({
        "params": {n: p.to_local().detach().clone() for n, p in model.named_parameters()},
        "exp_avg": {n: optimizer.state[p]["exp_avg"].to_local().clone() for n, p in model.named_parameters()},
        "lr": optimizer.param_groups[0]["lr"],
    }, out / f"{name}_rank{info.rank}.pt")

loaded = ckpt.load_checkpoint(plain_dir, model, optimizer, scheduler)  # world 1 -> world 2
assert loaded.step == 1, loaded
dump("loaded")
ids = torch.arange(8).view(2, 4) + 8 * info.rank
model(input_ids=ids, labels=ids).loss.float().square().mean().backward()
optimizer.step()
scheduler.step()
dump("stepped")
ckpt.save_checkpoint(sharded_dir, 2, model, optimizer, scheduler, {"step": 2}, sharded=sharded)
export_hf(model.lm, load_tokenizer(path), export_dir)
gdist.finish_worker()  # barrier, destroy, exit without finalization (no exit abort)
'''


def torchrun(script: Path, *args: str, timeout: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def full_from_shards(out: Path, name: str, key: str) -> dict[str, torch.Tensor]:
    """FSDP2 shards every parameter on dim 0 across ranks: concatenating rebuilds it."""
    shards = [torch.load(out / f"{name}_rank{r}.pt")[key] for r in range(2)]
    return {n: torch.cat([shards[0][n], shards[1][n]]) for n in shards[0]}


@pytest.mark.slow  # ~30 s each: two torchrun ranks import transformers on 2 shared cores
@LAYOUTS
def test_fsdp2_checkpoints_move_between_world_sizes(tmp_path, sharded):
    """World 1 -> 2 -> 1 through checkpoints of one layout: DCP reshards the sharded one, the
    full one is gathered to and broadcast from rank 0."""
    from transformers import AutoModelForCausalLM

    plain = Policy(tiny_llama())
    optimizer, scheduler = make_optim(plain)
    train_step(plain, optimizer, scheduler)
    ckpt.save_checkpoint(tmp_path / "plain", 1, plain, optimizer, scheduler, {"step": 1}, sharded=sharded)
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER)
    dirs = [tmp_path / d for d in ("plain", "sharded", "export", "out")]
    dirs[-1].mkdir()
    torchrun(script, *map(str, dirs), "sharded" if sharded else "full", timeout=180)  # generous: 2 shared cores
    out = dirs[-1]
    if sharded:  # each rank wrote its own shards, about half of the state each
        state = dirs[1] / "checkpoints" / "step_00000002" / "state"
        shards = {f.name: f.stat().st_size for f in state.glob("*.distcp")}
        assert shards.keys() == {"__0_0.distcp", "__1_0.distcp"}, shards
        assert 0.4 < shards["__0_0.distcp"] / sum(shards.values()) < 0.6, shards

    # world 1 -> 2: the shards hold exactly the plain run's weights and Adam moments.
    loaded = full_from_shards(out, "loaded", "params")
    loaded_avg = full_from_shards(out, "loaded", "exp_avg")
    for (name, param) in plain.named_parameters():
        assert torch.equal(loaded[name], param.detach()), name
        assert torch.equal(loaded_avg[name], optimizer.state[param]["exp_avg"]), name

    # world 2 -> 1: a plain model resumes from the sharded run's checkpoint.
    stepped = full_from_shards(out, "stepped", "params")
    stepped_avg = full_from_shards(out, "stepped", "exp_avg")
    fresh = Policy(tiny_llama())
    fresh_opt, fresh_sched = make_optim(fresh)
    result = ckpt.load_checkpoint(tmp_path / "sharded", fresh, fresh_opt, fresh_sched)
    assert result.step == 2 and fresh_sched.last_epoch == 2
    assert fresh_opt.param_groups[0]["lr"] == torch.load(out / "stepped_rank0.pt")["lr"]
    for name, param in fresh.named_parameters():
        assert not torch.equal(stepped[name], loaded[name]) or param.dim() == 1, name
        assert torch.equal(param.detach(), stepped[name]), name
        assert torch.equal(fresh_opt.state[param]["exp_avg"], stepped_avg[name]), name

    with safe_open(tmp_path / "export" / "model.safetensors", "pt") as f:
        # Gathered FSDP2 weights are separate tensors: the tie must come from the model itself.
        assert "lm_head.weight" not in f.keys()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    for name, param in exported.named_parameters():
        assert torch.equal(param.detach(), stepped[f"lm.{name}"]), name


def test_a_checkpoint_from_before_the_layouts_loads_as_full(tmp_path):
    """Manifests written before the sharded layout carry no `layout`: they are the gathered one."""
    import json

    model = Toy()
    optimizer, scheduler = make_optim(model)
    train_step(model, optimizer, scheduler)
    path = save_toy(tmp_path, 1, model, optimizer, scheduler, sharded=False)
    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["layout"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    fresh = Toy()
    assert ckpt.load_checkpoint(tmp_path, fresh, *make_optim(fresh)).step == 1
    assert_weights_equal(fresh, clone_weights(model))
    assert ckpt.read_model_weights(path).keys() == {"emb.weight", "mid.weight", "mid.bias"}
    manifest["layout"] = "pickled"  # a layout this code does not know: unusable, named
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(ckpt.CheckpointWarning, match=r"layout 'pickled', this code reads \['full', 'sharded'\]"):
        with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
            ckpt.load_checkpoint(tmp_path, Toy())
