"""The experiments' training runs: a train.py subprocess (the Accelerator is process-wide
state) in a dir named by the run's content, reused once complete and resumed after a stop.

    <runs>/<name>-<content_key(args)>/
      experiment.log          every attempt's command and output, appended
      experiment_done.json    written last: the final checkpoint and the training seconds
      experiment_done.partial seconds spent by attempts that stopped, while none completed
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cli
from store import runs
from store.checkpoint import WEIGHTS, write_atomic

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"
DONE, PARTIAL, LOG = "experiment_done.json", "experiment_done.partial", "experiment.log"


class TrainRunError(cli.UserError):
    """A training run that failed; the message names its log."""


def content_key(*parts) -> str:
    """A short hash of JSON-able parts: equal inputs find the same cached result."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def run_dir_of(root: Path, name: str, args: list[str]) -> Path:
    return Path(root).resolve() / f"{name}-{content_key(list(args))}"


def finished_run(run_dir: Path) -> tuple[Path, float] | None:
    """(final checkpoint, training seconds) of a completed run, None before it completes."""
    done = run_dir / DONE
    if not done.is_file():
        return None
    record = json.loads(done.read_text())
    return Path(record["checkpoint"]), record["seconds"]


def train_run(run_dir: Path, args: list[str]) -> tuple[Path, float]:
    """`train.py args` in run_dir -> its final checkpoint and training seconds (over every
    attempt). A completed run is reused; one stopped after a checkpoint resumes from it
    (train.py resume=true: the losses of an uninterrupted run) instead of starting over."""
    if (finished := finished_run(run_dir)) is not None:
        return finished
    resuming = runs.latest_checkpoint(run_dir) is not None
    cmd = [sys.executable, str(TRAIN_PY), f"hydra.run.dir={run_dir}",
           *(["resume=true"] if resuming else [*args, "overwrite=true"])]
    run_dir.mkdir(parents=True, exist_ok=True)
    log, partial = run_dir / LOG, run_dir / PARTIAL
    started = time.perf_counter()
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=child_env(),
                              cwd=TRAIN_PY.parent)
    seconds = time.perf_counter() - started + (json.loads(partial.read_text())
                                                if partial.is_file() else 0.0)
    if proc.returncode != 0:
        write_atomic(partial, json.dumps(seconds))
        tail = log.read_text().strip().splitlines()[-1]
        raise TrainRunError(f"training run {run_dir.name} failed ({tail}); log: {log}; "
                            f"rerun to resume")
    ckpt = final_checkpoint(run_dir)
    write_atomic(run_dir / DONE, json.dumps({"checkpoint": str(ckpt), "seconds": seconds,
                                             "args": list(args)}, indent=1))
    partial.unlink(missing_ok=True)
    return ckpt, seconds


def child_env() -> dict:
    """Offline and quiet unless the caller's environment says otherwise."""
    env = dict(os.environ)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"),
                       ("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                       ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    return env


def final_checkpoint(run_dir: Path) -> Path:
    latest = runs.latest_checkpoint(run_dir)
    if latest is None or not (latest / WEIGHTS).is_file():
        raise TrainRunError(f"{run_dir} finished without a checkpoint at checkpoints/latest")
    return latest
