"""The experiments' cached train.py runs (experiments/cached_run.py), with train.py replaced
by a stand-in that writes checkpoints as it does: a run stopped after a checkpoint resumes
instead of starting over, a completed one is reused, the seconds of every attempt add up."""
from __future__ import annotations

import subprocess

import pytest

from experiments import cached_run
from store import runs
from store.checkpoint import WEIGHTS

ARGS = ["model=tiny", "max_steps=4"]


class FakeTrain:
    """train.py's effect on its run dir: each call writes the next checkpoint; `fail` says
    which calls stop with an error after writing theirs (a kill, a crash)."""

    def __init__(self, fail: set[int]):
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd[2:])  # after python and train.py
        run_dir = next(a.split("=", 1)[1] for a in cmd if a.startswith("hydra.run.dir="))
        root = runs.checkpoints_dir(run_dir)
        step = runs.step_dir(root, 2 * len(self.calls))
        step.mkdir(parents=True)
        (step / WEIGHTS).write_bytes(b"")
        (root / runs.LATEST).unlink(missing_ok=True)
        (root / runs.LATEST).symlink_to(step.name)
        return subprocess.CompletedProcess(cmd, 1 if len(self.calls) in self.fail else 0)


def test_a_stopped_run_resumes_and_a_completed_one_is_reused(tmp_path, monkeypatch):
    train = FakeTrain(fail={1})
    monkeypatch.setattr(cached_run.subprocess, "run", train)
    run_dir = cached_run.run_dir_of(tmp_path, "mha", ARGS)
    with pytest.raises(cached_run.TrainRunError, match="rerun to resume"):
        cached_run.train_run(run_dir, ARGS)
    assert cached_run.finished_run(run_dir) is None
    first = float((run_dir / cached_run.PARTIAL).read_text())

    ckpt, seconds = cached_run.train_run(run_dir, ARGS)
    assert train.calls == [[f"hydra.run.dir={run_dir}", *ARGS, "overwrite=true"],
                           [f"hydra.run.dir={run_dir}", "resume=true"]]
    assert ckpt == runs.step_dir(runs.checkpoints_dir(run_dir), 4) and seconds >= first
    assert not (run_dir / cached_run.PARTIAL).exists()

    assert cached_run.train_run(run_dir, ARGS) == (ckpt, seconds)  # reused: no third call
    assert len(train.calls) == 2


def test_a_run_stopped_before_any_checkpoint_starts_over(tmp_path, monkeypatch):
    train = FakeTrain(fail=set())
    monkeypatch.setattr(cached_run.subprocess, "run", train)
    run_dir = cached_run.run_dir_of(tmp_path, "mha", ARGS)
    run_dir.mkdir(parents=True)  # a run killed while it started: a dir, no checkpoint
    cached_run.train_run(run_dir, ARGS)
    assert train.calls == [[f"hydra.run.dir={run_dir}", *ARGS, "overwrite=true"]]


def test_the_run_dir_is_named_by_its_arguments(tmp_path):
    assert cached_run.run_dir_of(tmp_path, "mha", ARGS) == cached_run.run_dir_of(tmp_path, "mha", list(ARGS))
    assert cached_run.run_dir_of(tmp_path, "mha", ARGS) != cached_run.run_dir_of(tmp_path, "mha", ARGS[:1])
