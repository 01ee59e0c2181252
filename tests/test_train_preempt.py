"""Preemption and concurrency (issue 24): a SIGTERM at any step checkpoints exactly that step
and a resume continues bit for bit (one process, and two where only one rank is signalled);
a second SIGTERM in the middle of that save leaves `latest` loadable; one train.py per run
dir, the second refused at once naming the first; outputs of convert/export/quantize too."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train import ENV, ROOT, cli, free_port, records, run
from test_train import base  # noqa: F401  (a fixture)
import train as train_mod
from store import lock, runs
from store.checkpoint import (RUN_LOCK, CheckpointError, load_checkpoint, output_lock,
                              save_checkpoint)
from model.config import ModelConfig
from model.transformer import Transformer

STEPS = 30


def steps(base) -> list[str]:
    return [*base, f"max_steps={STEPS}", "eval_every=0", "log_every=1", "keep_last=2"]


@pytest.fixture(scope="module")
def reference(base, tmp_path_factory) -> train_mod.TrainResult:
    """The uninterrupted run every stopped run must reproduce."""
    return run([*steps(base), f"run_dir={tmp_path_factory.mktemp('ref') / 'run'}"])


def wait_for_records(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"no {n} records: {proc.poll()} {proc.stderr and proc.stderr.read()}")


def latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return json.loads((latest / "trainer_state.json").read_text())["step"]


def assert_same_run(run_dir: Path, reference: train_mod.TrainResult) -> None:
    """Every per-step loss, and the final weights, bit for bit."""
    assert records(run_dir, "train_loss") == records(reference.run_dir, "train_loss")
    final = lambda d: load_file(Path(d) / "checkpoints" / f"step_{STEPS}" / "model.safetensors")
    ours, theirs = final(run_dir), final(reference.run_dir)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_sigterm_checkpoints_the_step_reached_and_resume_is_bit_exact(base, reference,
                                                                      tmp_path):
    at = random.randint(2, STEPS - 8)  # records seen before the signal: any step
    run_dir = tmp_path / "run"
    proc = cli([*steps(base), f"run_dir={run_dir}"], cwd=tmp_path)
    wait_for_records(run_dir, at, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == train_mod.REQUEUE_STATUS, (at, err[-3000:])
    reached = max(records(run_dir, "train_loss"))  # log_every=1: the last step trained
    assert at <= reached < STEPS
    assert latest_step(run_dir) == reached, at
    assert f"SIGTERM: stopped at step {reached}/{STEPS}, checkpoint " in out, out
    assert not (run_dir / RUN_LOCK).exists()  # released on the way out

    assert run([f"run_dir={run_dir}", "resume=true"]).step == STEPS
    assert_same_run(run_dir, reference)


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def launch_two(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--master_port", str(free_port()), str(ROOT / "train.py"),
                             *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(base, tmp_path):
    """Only one rank is signalled: the per-step all-reduce of the flag stops both after the
    same step, whose checkpoint holds both ranks' data positions; the resume reproduces the
    uninterrupted two-process run bit for bit."""
    args = [*steps(base), "batch_size=4"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    reference = launch_two([*args, f"hydra.run.dir={ref_dir}"], tmp_path)
    proc = launch_two([*args, f"hydra.run.dir={run_dir}"], tmp_path)
    wait_for_records(run_dir, random.randint(2, STEPS - 10), proc)
    os.kill(random.choice(children(proc.pid)), signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    reached = max(records(run_dir, "train_loss"))
    assert reached < STEPS and latest_step(run_dir) == reached, err[-3000:]
    state = json.loads((run_dir / "checkpoints/latest/trainer_state.json").read_text())
    assert len(state["loaders"]) == 2 and out.count(f"stopped at step {reached}/") == 1, out

    resumed = launch_two([*args, f"hydra.run.dir={run_dir}", "resume=true"], tmp_path)
    for p in (reference, resumed):
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    assert_same_run(run_dir, train_mod.TrainResult(STEPS, None, None, ref_dir))


SLOW_SAVE = """import os, runpy, sys, time
import store.checkpoint as c
write, gate = c.save_file, os.environ.get("SAVE_GATE")
def save_file(*args, **kwargs):  # a slow disk, or one that waits for the test's go
    time.sleep(float(os.environ.get("SAVE_SLEEP", "0")))
    while gate and not os.path.exists(gate):
        time.sleep(0.01)
    return write(*args, **kwargs)
c.save_file = save_file
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def slow_save(args: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    """train.py whose checkpoint weights are written after SAVE_SLEEP s / once SAVE_GATE exists."""
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(ROOT / "train.py"), *args],
                            cwd=cwd, env={**ENV, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_second_sigterm_during_the_save_leaves_latest_loadable(base, tmp_path):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    proc = slow_save([*steps(base), "ckpt_every=3", f"run_dir={run_dir}"], tmp_path,
                     SAVE_SLEEP="0.5")
    wait_for_records(run_dir, 4, proc)  # step_3 is being saved or written
    while not (ckpts / "latest").exists() and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    while not list(ckpts.glob(".step_*.tmp-*")) and proc.poll() is None:
        time.sleep(0.005)  # the stop's checkpoint is being written
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err[-3000:]  # killed inside the save
    assert "stopped at step" not in out
    assert latest_step(run_dir) == 3 < max(records(run_dir, "train_loss"))
    assert runs.find_checkpoint(run_dir) == (ckpts / "step_3").resolve()
    load_checkpoint(ckpts / "latest")
    assert run([f"run_dir={run_dir}", "resume=true", "max_steps=4"]).step == 4
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_3", "step_4"]


def test_second_train_on_a_run_dir_is_refused_at_once_naming_the_first(base, reference,
                                                                      tmp_path):
    """The first holds the dir while its final save waits for the test; the second, a
    `resume=true` as a relaunch would be, is refused before any work: its own data cache is
    never made (no data prepared) and no file of the run dir is created, changed or removed."""
    run_dir, gate, cache = tmp_path / "run", tmp_path / "go", tmp_path / "second_cache"
    first = slow_save([*steps(base), f"run_dir={run_dir}"], tmp_path, SAVE_GATE=str(gate))
    wait_for_records(run_dir, STEPS, first)
    while not list((run_dir / "checkpoints").glob(".step_*.tmp-*")) and first.poll() is None:
        time.sleep(0.005)  # the first is inside its final save, held there by the gate
    time.sleep(0.2)
    before = tree(run_dir)
    started = time.time()
    second = cli([*steps(base), f"run_dir={run_dir}", "resume=true", f"data.cache_dir={cache}"],
                 cwd=tmp_path)
    _, err = second.communicate(timeout=300)
    took = time.time() - started
    after = tree(run_dir)
    gate.touch()
    assert second.returncode == 2, err
    assert err.count("\n") == 1 and re.match(
        rf"error: {re.escape(str(run_dir))} is being written by pid {first.pid} on "
        rf"{re.escape(socket.gethostname())} \(since .*train.py.*\): one run dir takes one "
        rf"train.py at a time", err), err
    assert not cache.exists()  # nothing tokenized, no tokenizer trained
    assert after == before  # every path, its size, mtime and bytes
    print(f"second train.py refused in {took:.1f} s")
    assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    assert_same_run(run_dir, reference)
    assert not (run_dir / RUN_LOCK).exists()


def tree(folder: Path) -> dict[str, tuple]:
    """Every file and dir under folder: (mtime_ns, size, bytes for files)."""
    return {str(p.relative_to(folder)): (p.lstat().st_mtime_ns, p.lstat().st_size,
                                         p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_outputs_being_written_are_refused_before_any_work(tmp_path):
    """convert/export/quantize check their out= first (check_out) and the atomic publish
    holds it: a second writer is refused naming the first, and nothing is written."""
    from convert.command import main as convert_main

    model = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16))
    src = save_checkpoint(tmp_path / "src", model)
    out = tmp_path / "gqa"
    fd = lock.acquire(output_lock(out), f"out={out}", "", CheckpointError)
    try:
        with pytest.raises(CheckpointError, match=rf"out={out} is being written by pid "
                                                  rf"{os.getpid()} on "):
            save_checkpoint(out, model)
        assert convert_main([f"ckpt={src}", "n_kv_head=1", f"out={out}"]) == 2
    finally:
        lock.release(output_lock(out), fd)
    assert not out.exists() and not output_lock(out).exists()
    assert convert_main([f"ckpt={src}", "n_kv_head=1", f"out={out}"]) == 0
    # a run dir a train.py holds cannot be an out= either
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = lock.acquire(run_dir / RUN_LOCK, str(run_dir), "", ValueError)
    try:
        assert convert_main([f"ckpt={src}", "n_kv_head=1", f"out={run_dir}",
                             "overwrite=true"]) == 2
    finally:
        lock.release(run_dir / RUN_LOCK, fd)
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1], ids=["SIGINT", "SIGUSR1"])
def test_sigint_and_sigusr1_stop_like_sigterm(base, tmp_path, signum):
    """Ctrl-C and SLURM's warning signal, received during step 3's optimizer step (in this
    process): that step finishes and is checkpointed, the run stops there naming the signal
    (train.py's main turns that into exit 143, as for SIGTERM above), and the handlers that
    were installed before the run are back."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    seen = []

    def hook(optimizer, args, kwargs):
        seen.append(len(seen) + 1)
        if len(seen) == 3:
            os.kill(os.getpid(), signum)

    unhandled = []  # ours, installed before the run: reached only if the run ignores signum
    before = signal.signal(signum, lambda *a: unhandled.append(a))
    handle = register_optimizer_step_pre_hook(hook)
    try:
        result = run([*steps(base), f"run_dir={tmp_path / 'run'}"])
        assert signal.getsignal(signum) is not None and not unhandled
        ours = signal.getsignal(signum)
    finally:
        handle.remove()
        signal.signal(signum, before)
    assert ours.__name__ == "<lambda>"  # the run put ours back
    assert result.stopped_by == signal.Signals(signum).name
    assert result.step == 3 == len(seen) == max(records(result.run_dir, "train_loss"))
    assert latest_step(result.run_dir) == 3 and result.checkpoint.name == "step_3"
    load_checkpoint(result.checkpoint)


def test_on_signal_exit_dies_at_once_without_a_checkpoint(base, tmp_path):
    """on_signal=exit: SIGTERM's default action, no grace: killed by the signal mid-run, no
    checkpoint written (the only one due is at the end)."""
    run_dir = tmp_path / "run"
    proc = cli([*steps(base), f"run_dir={run_dir}", "on_signal=exit"], cwd=tmp_path)
    wait_for_records(run_dir, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, err[-3000:]
    assert "stopped at step" not in out
    assert max(records(run_dir, "train_loss")) < STEPS
    assert not runs.has_checkpoints(run_dir)
    assert not list(run_dir.glob("checkpoints/*"))
