"""What one optimizer step of train.py does (issue 34): grad_accum=k at batch b is batch k·b
with k times fewer optimizer steps than micro-batches, clipping bounds the global norm the
optimizer sees, and a compiled run trains like an eager one."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

from helpers import compile_works
from test_train import records, run
from test_train import base  # noqa: F401  (a fixture)
from store.runs import ACCEL_STATE


class OptimizerSteps:
    """Every real optimizer step of the run (a global pre-step hook: Accelerate's wrapper
    skips the inner step on accumulation micro-batches), with the global grad norm then."""

    def __enter__(self) -> "OptimizerSteps":
        self.norms: list[float] = []

        def hook(optimizer, args, kwargs):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                     if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])).item())

        self.handle = register_optimizer_step_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def short(base, run_dir: Path, *more: str) -> list[str]:
    return [*base, "max_steps=3", "eval_every=0", "log_every=1", "batch_mode=sequential",
            "mixed_precision=no", "compile=false", "sample_tokens=2", f"run_dir={run_dir}", *more]


def final_weights(result) -> dict[str, torch.Tensor]:
    return load_file(result.checkpoint / "model.safetensors")


def adam_steps(result) -> set[int]:
    """The step count AdamW's saved state holds for its parameters."""
    state = torch.load(result.checkpoint / ACCEL_STATE / "optimizer.bin", weights_only=True)
    return {int(s["step"]) for s in state["state"].values()}


def test_grad_accum_two_at_batch_four_is_batch_eight(base, tmp_path):
    """Sequential batches: two micro-batches of 4 are the 8 windows of one batch of 8, and the
    mean of the two half-batch means is the full mean: the same 3 updates up to fp32 roundoff.
    Roundoff is judged on each tensor's whole update, not elementwise: AdamW divides by
    sqrt(v), so an element whose gradient is near zero turns a 1e-7 difference in summation
    order (which differs between CPU kernels: AVX2 vs AVX-512) into a visible one. Measured
    here: ||Δ_accum - Δ_full|| / ||Δ_full|| ≤ 3e-6 on every tensor; a dropped or unsynced
    micro-batch gives O(0.1-1)."""
    with OptimizerSteps() as full:
        eight = run(short(base, tmp_path / "eight", "batch_size=8", "grad_accum=1"))
    with OptimizerSteps() as accum:
        four = run(short(base, tmp_path / "four", "batch_size=4", "grad_accum=2"))
    assert len(full.norms) == len(accum.norms) == 3  # not 6: one step per 2 micro-batches
    assert adam_steps(four) == adam_steps(eight) == {3}
    # the first gradient is taken at the same weights: only summation order differs
    first = records(eight.run_dir, "grad_norm")[1]
    assert records(four.run_dir, "grad_norm")[1] == pytest.approx(first, rel=1e-5)
    start = final_weights(run(short(base, tmp_path / "zero", "batch_size=8", "max_steps=1",
                                    "optim.lr=0")))
    a, b = final_weights(four), final_weights(eight)
    assert a.keys() == b.keys() == start.keys()
    for name in a:
        update = (b[name] - start[name]).norm()
        assert update > 0, name
        assert (a[name] - b[name]).norm() <= 5e-3 * update, name
    # the recorded CE: the mean over both micro-batches is the batch-8 mean
    for step, loss in records(eight.run_dir, "train_loss").items():
        assert records(four.run_dir, "train_loss")[step] == pytest.approx(loss, rel=1e-5)


def test_grad_clip_bounds_the_global_norm_the_optimizer_sees(base, tmp_path):
    """optim.grad_clip=c: the gradients AdamW steps on have global norm min(norm, c), where
    norm (the grad_norm record) is the one before clipping; grad_clip=0 leaves them alone."""
    clip = 0.05
    with OptimizerSteps() as clipped:
        result = run(short(base, tmp_path / "clip", f"optim.grad_clip={clip}"))
    before = records(result.run_dir, "grad_norm")
    assert sorted(before) == [1, 2, 3] and all(v > 2 * clip for v in before.values())
    assert clipped.norms == pytest.approx([clip] * 3, rel=1e-5)
    with OptimizerSteps() as free:
        result = run(short(base, tmp_path / "free", "optim.grad_clip=0"))
    before = records(result.run_dir, "grad_norm")
    assert free.norms == pytest.approx([before[s] for s in (1, 2, 3)], rel=1e-5)
    assert all(v > 2 * clip for v in free.norms)


def test_compiled_training_matches_eager(base, tmp_path):
    why = compile_works()
    if why:
        pytest.skip(why)
    eager = run(short(base, tmp_path / "eager", "compile=false"))
    compiled = run(short(base, tmp_path / "compiled", "compile=true"))
    a, b = records(eager.run_dir, "train_loss"), records(compiled.run_dir, "train_loss")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5, rel=1e-5), step
    assert not math.isnan(compiled.val_loss)
    assert compiled.val_loss == pytest.approx(eager.val_loss, abs=1e-4)
