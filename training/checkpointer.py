"""A training run's checkpoints, from save to resume, in one place.

`Checkpointer.save` writes checkpoints/step_N (weights, train_config.yaml, trainer_state.json,
accelerate/ with the optimizer and RNG state), swaps `latest` to it and prunes to keep_last;
`resume_point` finds the checkpoint a resume continues and `Checkpointer.restore` loads its
optimizer, RNG and data position; `rewind` and `start_over` make the run dir agree with the
step a run starts from. The layout and its names are store/runs.py's: every command reads it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import gather_object
from omegaconf import DictConfig, OmegaConf

from store import runs
from store.checkpoint import (CheckpointError, save_checkpoint, staged_file, write_atomic,
                              write_json)
from store.runs import ACCEL_STATE, LATEST, LOSS_PLOT, METRICS, TRAIN_CONFIG, TRAINER_STATE


def resume_point(resume: Any, run_dir: Path) -> Path | None:
    """The checkpoint resume= continues: none (false), run_dir's latest (true), or the one a
    run or checkpoint dir names."""
    if resume in (False, None) or str(resume).lower() == "false":
        return None
    if resume is True or str(resume).lower() == "true":
        if not os.path.lexists(runs.latest_link(run_dir)):
            raise CheckpointError(f"resume=true but {run_dir} has no checkpoint: pass "
                                  f"resume=<run or checkpoint dir>, or run_dir=<the run to "
                                  f"continue>")
        return runs.find_checkpoint(run_dir)
    return runs.find_checkpoint(Path(str(resume)))


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


@dataclass
class Checkpointer:
    """The checkpoints of one run dir. save and restore run Accelerate's collective
    save_state/load_state: call them on every rank; the rest on the main process only."""
    run_dir: Path
    keep_last: int

    @property
    def root(self) -> Path:
        return runs.checkpoints_dir(self.run_dir)

    @property
    def latest(self) -> Path | None:
        return runs.latest_checkpoint(self.run_dir)

    def save(self, accelerator: Accelerator, model, step: int, meta: dict, trainer_state: dict,
             train_config: DictConfig, files: dict) -> Path:
        """Every rank writes its part of Accelerate's state (optimizer, RNG) into a staging
        dir; the main process moves it into the checkpoint's temp dir, renames the whole
        checkpoint into place, then swaps `latest`. A kill at any moment leaves `latest`
        readable. trainer_state["loader"]: this rank's data position (files: copied in)."""
        path, staging = runs.step_dir(self.root, step), self.root / f".staging-step_{step}"
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))
        loaders = gather_object([trainer_state["loader"]])  # every rank's data position
        # the full weights: gathered from every rank's shard under FSDP, on the main process only
        state = accelerator.get_state_dict(getattr(model, "_orig_mod", model))
        if accelerator.is_main_process:
            counters = {k: v for k, v in trainer_state.items() if k != "loader"}

            def extra(tmp: Path) -> None:
                os.replace(staging, tmp / ACCEL_STATE)
                (tmp / TRAIN_CONFIG).write_text(OmegaConf.to_yaml(train_config, resolve=True))
                write_json(tmp / TRAINER_STATE, {**counters, "loaders": loaders})

            save_checkpoint(path, model, meta, files=files, overwrite=True, extra=extra,
                            state=state)
            self.point_latest(path.name)
            self.prune()
        accelerator.wait_for_everyone()
        return path

    def restore(self, accelerator: Accelerator, stream, checkpoint: Path | None,
                state: dict) -> dict:
        """A resume's optimizer, RNG and data position (after accelerator.prepare), and the
        counters its loop continues from; {} for a new run. state: its trainer_state.json."""
        if checkpoint is None:
            return {}
        accelerator.load_state(str(checkpoint / ACCEL_STATE))
        stream.load_state_dict(state["loaders"][accelerator.process_index])
        step = state["step"]
        # checkpoints before these keys: the first record averages the steps since the resume
        return {"step": step, "tokens_seen": state["tokens_seen"],
                "step_last": state.get("step_last", step),
                "loss_sum": state.get("loss_sum", 0.0)}

    def point_latest(self, name: str) -> None:
        """Swap the `latest` symlink in one rename: it always names a complete checkpoint."""
        with staged_file(self.root / LATEST) as tmp:
            os.symlink(name, tmp)

    def prune(self, newer_than: int | None = None) -> None:
        """Keep the newest keep_last, and always the one `latest` names; with newer_than,
        first drop the abandoned future of a run killed after that step. Leftovers of
        interrupted writes go too."""
        latest = (self.root / LATEST).resolve()
        dirs = runs.step_dirs(self.root)
        if newer_than is not None:
            for future in [d for d in dirs if runs.step_of(d) > newer_than]:
                shutil.rmtree(future)
            dirs = [d for d in dirs if runs.step_of(d) <= newer_than]
        for old in dirs[:-self.keep_last]:
            if old.resolve() != latest:
                shutil.rmtree(old, ignore_errors=True)
        for junk in self.root.glob(".*"):
            shutil.rmtree(junk, ignore_errors=True) if junk.is_dir() else junk.unlink()

    def rewind(self, step: int) -> None:
        """A resume from step: what a killed run wrote after it (checkpoints, metrics) goes."""
        self.prune(newer_than=step)
        trim_metrics(self.run_dir / METRICS, step)

    def start_over(self) -> None:
        """A new run in this dir: the checkpoints (overwrite=true) and the logs of an earlier
        attempt, also one that died before its first checkpoint, go."""
        if runs.has_checkpoints(self.run_dir):
            shutil.rmtree(self.root)
        for name in (METRICS, LOSS_PLOT):
            (self.run_dir / name).unlink(missing_ok=True)


def trim_metrics(path: Path, last_step: int) -> None:
    """Drop records a killed run wrote after the checkpoint being resumed (atomically)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    write_atomic(path, "".join(line + "\n" for line in kept))
