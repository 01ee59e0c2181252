"""The run dir and checkpoint layout train.py writes, and what every command reads of it.

    <run dir>/
      .lock                       held by the one train.py writing here (store/lock.py)
      .hydra/                     the config it ran with; resume-*-overrides.yaml per resume
      metrics.jsonl, loss.png
      checkpoints/
        step_N/                   a checkpoint (store/checkpoint.py) + train_config.yaml,
                                  trainer_state.json, accelerate/ (optimizer, RNG)
        latest -> step_N          swapped in one rename: always a complete checkpoint
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open

from data.tokenizer import Tokenizer, load_tokenizer, tokenizer_files
from store.checkpoint import RUN_LOCK, WEIGHTS, CheckpointError, staged_file

CHECKPOINTS, LATEST = "checkpoints", "latest"
TRAIN_CONFIG, TRAINER_STATE, ACCEL_STATE = "train_config.yaml", "trainer_state.json", "accelerate"
__all__ = ["RUN_LOCK"]  # the run dir's lock file, named beside the output locks it excludes


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step}"


def step_of(path: Path) -> int:
    return int(path.name[5:])


def step_dirs(root: Path) -> list[Path]:
    """The step_N dirs under a checkpoints dir, oldest first."""
    dirs = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=step_of)


def has_checkpoints(run_dir: Path) -> bool:
    root = checkpoints_dir(run_dir)
    return root.is_dir() and bool(step_dirs(root) or os.path.lexists(root / LATEST))


def point_latest(root: Path, name: str) -> None:
    """Swap the `latest` symlink in one rename: it always names a complete checkpoint."""
    with staged_file(root / LATEST) as tmp:
        os.symlink(name, tmp)


def prune_checkpoints(root: Path, keep_last: int, newer_than: int | None = None) -> None:
    """Keep the newest keep_last; with newer_than, first drop the abandoned future of a
    run killed after that step. Leftovers of interrupted writes go too."""
    latest = (root / LATEST).resolve()
    dirs = step_dirs(root)
    if newer_than is not None:
        for future in [d for d in dirs if step_of(d) > newer_than]:
            shutil.rmtree(future)
        dirs = [d for d in dirs if step_of(d) <= newer_than]
    for old in dirs[:-keep_last]:
        if old.resolve() != latest:
            shutil.rmtree(old, ignore_errors=True)
    for junk in root.glob(".*"):
        shutil.rmtree(junk, ignore_errors=True) if junk.is_dir() else junk.unlink()


def latest_link(run_dir: Path) -> Path:
    return checkpoints_dir(run_dir) / LATEST


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint a run dir's `latest` names, resolved; None when there is none."""
    latest = latest_link(run_dir)
    return latest.resolve() if latest.is_dir() else None


def find_checkpoint(path: Path) -> Path:
    """A resumable checkpoint: a step dir, or a run dir / checkpoints dir whose `latest`
    names one; one that is truncated or dangling is refused with the newest intact one to
    use instead."""
    for candidate in (path, path / LATEST, checkpoints_dir(path) / LATEST):
        if candidate.is_symlink() and not candidate.exists():
            raise broken_checkpoint(candidate, f"{candidate} points at a missing "
                                               f"{os.readlink(candidate)} (dangling)")
        if (candidate / WEIGHTS).is_file() and (candidate / TRAINER_STATE).is_file():
            if not checkpoint_intact(candidate):
                raise broken_checkpoint(candidate, f"{candidate.resolve()} is truncated or "
                                                   f"corrupt")
            return candidate.resolve()
    raise CheckpointError(f"no resumable checkpoint at {path}: pass a run dir or a "
                          f"checkpoints/step_N dir written by train.py")


def checkpoint_intact(path: Path) -> bool:
    """Every byte the weights' header promises is there, and the trainer state parses
    (cheap: reads headers, not tensors)."""
    try:
        json.loads((path / TRAINER_STATE).read_text())
        with safe_open(path / WEIGHTS, "pt"):
            return True
    except (OSError, ValueError, SafetensorError):
        return False


def broken_checkpoint(path: Path, problem: str) -> CheckpointError:
    root = path.resolve().parent if path.name != LATEST else path.parent
    intact = [d for d in reversed(step_dirs(root)) if checkpoint_intact(d)]
    if not intact:
        return CheckpointError(f"{problem}, and {root} holds no intact checkpoint: start over "
                               f"with overwrite=true")
    return CheckpointError(f"{problem}: resume from the newest intact checkpoint with "
                           f"`python train.py resume={intact[0]}`")


def read_train_config(checkpoint: Path) -> DictConfig | None:
    """The resolved train config a train.py checkpoint carries (None: not one of those)."""
    path = Path(checkpoint) / TRAIN_CONFIG
    return OmegaConf.load(path) if path.is_file() else None


def read_data_config(checkpoint: Path) -> DictConfig | None:
    """The data settings a checkpoint was trained on: its train config's data section."""
    cfg = read_train_config(checkpoint)
    return cfg.get("data") if cfg is not None else None


def check_tokenizer(given: Tokenizer | str | Path | None, source: Path,
                    error: type[Exception]) -> None:
    """The tokenizer data is (or will be) tokenized with must be the one source ships, by
    content: its ids are the only ones the model knows. A source without one takes any."""
    if given is None or not tokenizer_files(source):
        return
    given = given if isinstance(given, Tokenizer) else load_tokenizer(given)
    if given.sha256() != load_tokenizer(source).sha256():
        raise error(f"the data's tokenizer differs from the tokenizer {source} ships: the model "
                    f"needs its own token ids; drop data.tokenizer and data.vocab_size "
                    f"overrides, or pass data.tokenizer={source}")
