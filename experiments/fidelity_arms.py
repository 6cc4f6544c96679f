"""Issues #13 and #7: which training arm simulates the viewers most like the humans?

Three arms start from one SFT warm start and train on the same synthetic study rows with
the same seeds and optimizer steps: `sft` (more SFT on the human choices, P x G targets a
step), `grpo` (rule rewards, P prompts x G completions a step), `grail` (GRPO + the
discriminator). `python -m grailcore.eval` then scores each final model and the warm start
on the same held-out viewers: k samples per row over a temperature sweep, R option
permutations at the matched temperature, viewer-clustered bootstrap intervals.
Writes OUT/results.md (tables, plot, commands, verdict computed from the numbers) and
OUT/results.json. Resumable: a finished arm (its final/) or evaluation (metrics.json) is kept.

    .venv/bin/python experiments/fidelity_arms.py --out runs/fidelity [--steps 10 --seeds 0 1]

Needs grailcore installed (scripts/setup.sh does it) for the report's paired differences;
matplotlib draws the plot when installed. Every training and evaluation run is a
`python -m grailcore.*` subprocess in the repository root, and relative
paths in the options are relative to the repository root too.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = ("sft", "grpo", "grail")

# Seconds, SmolLM2-135M on the shared 2-core CPU machine (README, bench/RESULTS.md): a GRPO
# step of 8 x 4 completions (<= 48 tokens) took 27.6 s at load 2-3; an SFT step of 32 targets
# (each its own ~660-token prompt) took 322 s with vLLM in the process and two other jobs on
# the cores (10 s a target). bench/RESULTS.md saw in-process vLLM slow training ~2.6x, hence
# the HF engine in --sft-args and ~4 s a target assumed (not yet measured). An in-loop
# evaluation of 48 rows x 4 samples ~75 s; scoring with 1000 bootstrap replicates ~8 s; a
# process start ~60 s.
COST = {"train_start": 75.0, "grpo_per_completion": 27.6 / 32, "grail_factor": 1.2, "sft_per_target": 4.0,
        "eval_start": 60.0, "eval_per_prompt": 0.35, "eval_per_completion": 0.3, "eval_scoring": 8.0}


@dataclass(frozen=True)
class Job:
    """One subprocess: a training arm or an evaluation; `done` is the file it leaves when finished."""

    name: str
    argv: list[str]
    done: Path
    estimate_s: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (one run dir per arm and seed, evals, results)")
    p.add_argument("--start", default="runs/demo_sft_gun/final",
                   help="the SFT warm start every arm starts from (configs/demo_sft_gun.py writes it)")
    p.add_argument("--build-start", action="store_true",
                   help="if --start is missing, run the --sft-cfg preset to make it (about 20 min on CPU)")
    p.add_argument("--sft-cfg", default="configs/demo_sft_gun.py")
    p.add_argument("--grpo-cfg", default="configs/demo_gun.py")
    p.add_argument("--grail-cfg", default="configs/demo_grail_gun.py")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps of every arm")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--prompts-per-step", type=int, default=8, help="GRPO/GRAIL prompts per step (P)")
    p.add_argument("--group-size", type=int, default=4, help="GRPO/GRAIL completions per prompt (G); SFT "
                   "trains P x G targets a step so every arm trains as many completions")
    p.add_argument("--sft-lr", type=float, default=None, help="default: the --sft-cfg preset's optim.lr")
    p.add_argument("--train-args", default="", help="extra overrides for every training run, e.g. "
                   "'--rollout.engine hf --gail.model tiny-bert'")
    p.add_argument("--sft-args", default="--rollout.engine hf",
                   help="extra overrides for the SFT arm (after --train-args). It samples only for its final "
                   "greedy check, and an in-process vLLM engine slows training (bench/RESULTS.md), so HF by default")
    p.add_argument("--train-eval-rows", type=int, default=8,
                   help="rows of the trainers' own (greedy, final-only) evaluation; results come from the "
                   "separate evaluation below")
    p.add_argument("--split", default="test", choices=("validation", "test"),
                   help="held-out viewers to score (the trainers evaluate on validation)")
    p.add_argument("--eval-rows", type=int, default=48, help="a seeded sample of the split, spread over viewers")
    p.add_argument("--samples", type=int, default=4, help="k samples per row")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.5, 0.7, 1.0, 1.3])
    p.add_argument("--matched-temperature", type=float, default=1.0,
                   help="the arms' rollout temperature; order robustness is measured here")
    p.add_argument("--permutations", type=int, default=2, help="R option orders at the matched temperature")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--eval-seed", type=int, default=0, help="rows, sampling, orders and bootstrap of every eval")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, run nothing")
    args = p.parse_args(argv)
    args.temperatures = sorted({*args.temperatures, args.matched_temperature})  # the matched one is always swept
    return args


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def shown(argv: list[str]) -> str:
    """`argv` as a shell line for the record, the interpreter relative to the repository
    (no path of this machine in results)."""
    exe = Path(argv[0])
    try:
        exe = exe.relative_to(REPO)
    except ValueError:
        exe = Path("python")
    return shlex.join([str(exe), *argv[1:]])


def arm_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}_s{seed}"


def training_jobs(args: argparse.Namespace, out: Path) -> list[Job]:
    completions = args.prompts_per_step * args.group_size
    common = ["--model.name-or-path", args.start, "--optim.max-steps", str(args.steps),
              "--eval.no-on-start", "--eval.every", "0", "--eval.max-samples", str(args.train_eval_rows),
              "--eval.samples-per-row", "1", "--eval.permutations", "0", "--checkpoint.every", "0",
              "--checkpoint.keep", "1"]
    extra = shlex.split(args.train_args)
    jobs = []
    for seed in args.seeds:
        for arm in args.arms:
            run = arm_dir(out, arm, seed)
            own = ["--run-dir", str(run), "--seed", str(seed)]
            if arm == "sft":
                lr = ["--optim.lr", str(args.sft_lr)] if args.sft_lr else []
                argv = python_module("grailcore.sft", "--cfg", args.sft_cfg, *common, *own,
                                     "--sft.batch-size", str(completions), *lr, *extra, *shlex.split(args.sft_args))
                seconds = COST["train_start"] + args.steps * completions * COST["sft_per_target"]
            else:
                argv = python_module("grailcore.train", "--cfg", args.grpo_cfg if arm == "grpo" else args.grail_cfg,
                                     *common, *own, "--grpo.prompts-per-step", str(args.prompts_per_step),
                                     "--grpo.group-size", str(args.group_size), *extra)
                seconds = args.steps * completions * COST["grpo_per_completion"]
                seconds = COST["train_start"] + seconds * (COST["grail_factor"] if arm == "grail" else 1.0)
            jobs.append(Job(f"{arm}/s{seed}", argv, run / "final" / "config.json", seconds))
    return jobs


def evaluated_models(args: argparse.Namespace, out: Path) -> dict[str, str]:
    """Model label -> HF dir: the warm start, then every arm and seed."""
    models = {"start": args.start}
    for arm in args.arms:
        for seed in args.seeds:
            models[f"{arm}/s{seed}"] = str(arm_dir(out, arm, seed) / "final")
    return models


def eval_dir(out: Path, label: str, temperature: float) -> Path:
    """Where `grailcore.eval` scores `label` at `temperature` (a sweep's OUT/T<t> naming)."""
    return out / "eval" / label.replace("/", "_") / f"T{temperature:g}"


def eval_preset(args: argparse.Namespace, out: Path) -> Path:
    """The resolved config a trained arm saved: evaluation renders the same prompts (data),
    samples through the same engine and caps completions the same way as training did."""
    saved = [arm_dir(out, arm, args.seeds[0]) / "config.yaml" for arm in ("grpo", "grail", "sft") if arm in args.arms]
    return next((p for p in saved if p.is_file()), saved[0])


def eval_jobs(args: argparse.Namespace, out: Path) -> list[Job]:
    """Per model: one `grailcore.eval --temperatures` sweep over the unmatched temperatures (one
    engine start), and the matched temperature with R option permutations."""
    def seconds(temperatures: int, orders: int) -> float:
        per_pass = args.eval_rows * (COST["eval_per_prompt"] + args.samples * COST["eval_per_completion"])
        return COST["eval_start"] + temperatures * (orders * per_pass + COST["eval_scoring"])

    sweep = [t for t in args.temperatures if t != args.matched_temperature]
    jobs = []
    for label, model in evaluated_models(args, out).items():
        common = python_module("grailcore.eval", "--cfg", str(eval_preset(args, out)), "--model", model,
                               "--split", args.split, "--max-samples", str(args.eval_rows),
                               "--samples-per-row", str(args.samples), "--n-boot", str(args.n_boot),
                               "--seed", str(args.eval_seed))
        if sweep:  # writes eval_dir(out, label, t) for each t
            argv = [*common, "--temperatures", *(f"{t:g}" for t in sweep), "--permutations", "0",
                    "--out", str(eval_dir(out, label, sweep[0]).parent)]
            jobs.append(Job(f"eval {label} T={','.join(f'{t:g}' for t in sweep)}", argv,
                            eval_dir(out, label, sweep[-1]) / "metrics.json", seconds(len(sweep), 1)))
        matched = eval_dir(out, label, args.matched_temperature)
        argv = [*common, "--temperature", f"{args.matched_temperature:g}", "--permutations", str(args.permutations),
                "--out", str(matched)]
        jobs.append(Job(f"eval {label} T={args.matched_temperature:g}", argv, matched / "metrics.json",
                        seconds(1, 1 + args.permutations)))
    return jobs


def check_reused_arm(run: Path, args: argparse.Namespace, seed: int) -> None:
    """A finished arm is reused only if it trained what this invocation asks for."""
    saved = (run / "config.yaml").read_text()
    want = {"seed": str(seed), "name_or_path": args.start, "max_steps": str(args.steps)}
    found = {key: re.search(rf"^\s*{key}: (\S+)$", saved, re.MULTILINE) for key in want}
    wrong = [f"{key} {m.group(1) if m else '?'} (asked: {want[key]})" for key, m in found.items()
             if not m or m.group(1) != want[key]]
    if wrong:
        raise SystemExit(f"{run} is a finished arm with other settings: {', '.join(wrong)}; "
                         "give another --out or delete it")


def run_job(job: Job, out: Path, log: list[dict]) -> None:
    """Run `job` unless its `done` file exists; its output goes to OUT/logs; a failure stops everything."""
    record = {"name": job.name, "command": shown(job.argv), "estimate_s": round(job.estimate_s)}
    if job.done.exists():
        log.append({**record, "skipped": f"{job.done} exists"})
        print(f"[skip] {job.name}: {job.done} exists", flush=True)
        return
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / (job.name.replace("/", "_").replace(" ", "_").replace("=", "") + ".log")
    print(f"[run ] {job.name} (~{job.estimate_s / 60:.1f} min): {record['command']}", flush=True)
    start = time.time()
    with open(path, "w") as f:
        proc = subprocess.run(job.argv, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    log.append({**record, "seconds": round(seconds, 1), "log": str(path), "returncode": proc.returncode})
    if proc.returncode != 0 or not job.done.exists():
        tail = "".join(path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise SystemExit(f"{job.name} failed (exit {proc.returncode}; full log {path}):\n{tail}")
    print(f"[done] {job.name} in {seconds / 60:.1f} min", flush=True)


def ensure_start(args: argparse.Namespace) -> None:
    if (Path(args.start) / "config.json").is_file():
        return
    make = shown(python_module("grailcore.sft", "--cfg", args.sft_cfg, "--run-dir", str(Path(args.start).parent)))
    if not args.build_start or Path(args.start).name != "final":
        raise SystemExit(f"the SFT warm start {args.start} is missing (no config.json). Make it first:\n  {make}\n"
                         "(about 20 min on 2 CPU cores), rerun with --build-start to have this script do it, "
                         "or pass --start DIR")
    print(f"[run ] warm start: {make}", flush=True)
    subprocess.run(shlex.split(make), cwd=REPO, check=True)


def machine() -> dict:
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
            "commit": git.stdout.strip() + (" (working tree has uncommitted changes)" if dirty else ""),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    os.chdir(REPO)  # relative paths mean the same here and in the subprocesses
    out = Path(args.out)
    jobs = training_jobs(args, out) + eval_jobs(args, out)
    todo = [j for j in jobs if not j.done.exists()]
    total = sum(j.estimate_s for j in todo)
    print(f"{len(jobs)} runs ({len(jobs) - len(todo)} already done); estimated {total / 60:.0f} min for the rest "
          f"(SmolLM2-135M speeds on 2 shared CPU cores; other models and loads scale it)", flush=True)
    if args.dry_run:
        for job in jobs:
            print(("[done] " if job.done.exists() else f"[~{job.estimate_s / 60:4.1f} min] ") + shown(job.argv))
        return None
    ensure_start(args)
    out.mkdir(parents=True, exist_ok=True)
    info, log, t0 = machine(), [], time.time()
    for job, (arm, seed) in zip(training_jobs(args, out), [(a, s) for s in args.seeds for a in args.arms]):
        if job.done.exists():
            check_reused_arm(arm_dir(out, arm, seed), args, seed)
        run_job(job, out, log)
    for job in eval_jobs(args, out):  # rebuilt: the eval preset exists only once an arm has trained
        run_job(job, out, log)
    info.update(finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"), wall_minutes=round((time.time() - t0) / 60, 1),
                load_average_at_end=[round(x, 2) for x in os.getloadavg()])
    from fidelity_report import write_results  # beside this script

    models = evaluated_models(args, out)
    run_dirs = {label: Path(model).parent for label, model in models.items() if label != "start"}
    return write_results(args, out, info, log, sys.argv[1:] if argv is None else list(argv),
                         lambda label, t: eval_dir(out, label, t), list(models), run_dirs)


if __name__ == "__main__":
    main()
