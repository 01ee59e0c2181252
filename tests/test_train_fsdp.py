"""train.py under Accelerate's FSDP2 plugin, launched with configs/accelerate/fsdp.yaml on
two CPU processes over gloo (tests/fsdp_cpu.py lifts Accelerate's GPU-only check): the same
losses as one process, one consolidated model.safetensors, the optimizer state split in
half per rank, and an exact resume from the sharded state (with activation checkpointing)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from test_train import ENV, ROOT, free_port, odd_val_seq_len, records, run
from fsdp_reduce_cpu import X
from training.runtime import fsdp_plugin
from test_train import base  # noqa: F401  (a fixture)


def launch_fsdp(overrides: list[str], cwd, script: str = "fsdp_cpu.py") -> str:
    """The main process's stdout."""
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes", "2",
         "--main_process_port", str(free_port()), str(ROOT / "tests" / script), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def shard_bytes(optimizer_dir) -> dict[str, int]:
    """Bytes of optimizer-state tensor data in each rank's file of a sharded (DCP) save."""
    meta = FileSystemReader(str(optimizer_dir)).read_metadata()
    per_file: dict[str, int] = {}
    for index, where in meta.storage_data.items():
        tensor = meta.state_dict_metadata[index.fqn]
        for chunk in getattr(tensor, "chunks", []):
            if tuple(chunk.offsets) == tuple(index.offset):
                size = math.prod(chunk.sizes) * tensor.properties.dtype.itemsize
                per_file[where.relative_path] = per_file.get(where.relative_path, 0) + size
    return per_file


def test_fsdp_two_processes_match_one_and_resume_exactly(base, tmp_path):
    common = [*base, "max_steps=6", "eval_every=6", "ckpt_every=3", "log_every=1",
              "batch_mode=sequential", "eval_batches=1000", f"seq_len={odd_val_seq_len(base)}"]
    two = tmp_path / "fsdp"
    launch_fsdp([*common, "batch_size=4", f"hydra.run.dir={two}"], tmp_path)
    one = run([*common, f"run_dir={tmp_path / 'one'}"])  # 1 process x batch 8: same batches

    two_loss, one_loss = records(two, "train_loss"), records(one.run_dir, "train_loss")
    assert sorted(two_loss) == sorted(one_loss) == list(range(1, 7))
    for step in one_loss:
        assert two_loss[step] == pytest.approx(one_loss[step], rel=1e-4), step
    assert records(two, "val_loss")[6] == pytest.approx(one.val_loss, rel=1e-4)

    # one consolidated weights file per checkpoint, the one-process weights up to AdamW's
    # amplification of rounding: an element whose gradient is near zero moves by up to
    # ~lr in a direction set by the all-reduce's summation order (CI's CPU flipped a few
    # that this machine did not). A wrong consolidation (a stale step, swapped or missing
    # shards) differs almost everywhere. The resume below loads such a file and proves
    # it exact.
    ckpts = two / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_3", "step_6"]
    fsdp_weights = load_file(ckpts / "step_6/model.safetensors")
    one_weights = load_file(one.checkpoint / "model.safetensors")
    assert fsdp_weights.keys() == one_weights.keys()
    names = sorted(one_weights)
    fsdp_flat = torch.cat([fsdp_weights[n].flatten() for n in names])
    one_flat = torch.cat([one_weights[n].flatten() for n in names])
    off = ~torch.isclose(fsdp_flat, one_flat, rtol=1e-4, atol=1e-6)
    diff = (fsdp_flat - one_flat).norm() / one_flat.norm()
    assert off.float().mean() <= 1e-3 and diff <= 1e-3, (int(off.sum()), off.numel(), float(diff))

    # AdamW state: each rank holds and saves half of what the single process does
    single = torch.load(one.checkpoint / "accelerate/optimizer.bin", weights_only=True)
    single_bytes = sum(t.numel() * t.element_size() for state in single["state"].values()
                       for t in state.values() if t.dim() > 0)  # exp_avg, exp_avg_sq
    per_rank = shard_bytes(ckpts / "step_6/accelerate/optimizer_0")
    assert sorted(per_rank) == ["__0_0.distcp", "__1_0.distcp"]
    for rank_bytes in per_rank.values():
        assert rank_bytes == pytest.approx(single_bytes / 2, rel=0.01), (per_rank, single_bytes)

    # resume the FSDP run from step 3: steps 4-6 as in the uninterrupted run, also with
    # activation checkpointing around the sharded blocks (recompute changes no number)
    launch_fsdp([*common, "batch_size=4", f"hydra.run.dir={two}", "activation_checkpointing=true",
                 f"resume={ckpts / 'step_3'}"], tmp_path)
    resumed = records(two, "train_loss")
    assert sorted(resumed) == list(range(1, 7))
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(two_loss[step], abs=1e-6), step
    for name, tensor in load_file(ckpts / "step_6/model.safetensors").items():
        torch.testing.assert_close(tensor, fsdp_weights[name], rtol=0, atol=1e-6, msg=name)


def test_fsdp_bf16_computes_in_bf16_and_reduces_gradients_in_fp32(base, tmp_path):
    """Accelerate alone would reduce-scatter bf16 gradients (reduce_dtype = param_dtype);
    train.py's policy keeps the sum in fp32. Read back from the sharded blocks and reported
    at startup; the bf16 run trains (finite losses)."""
    run_dir = tmp_path / "bf16"
    out = launch_fsdp([*base, "max_steps=2", "eval_every=2", "log_every=1", "batch_size=2",
                       "eval_batches=1", "mixed_precision=bf16", f"hydra.run.dir={run_dir}"],
                      tmp_path)
    assert ("FSDP2 mixed precision: weights and AdamW float32, compute bfloat16, "
            "gradient reduce-scatter float32") in out, out[-2000:]
    losses = records(run_dir, "train_loss")
    assert sorted(losses) == [1, 2] and all(map(math.isfinite, losses.values()))
    assert math.isfinite(records(run_dir, "val_loss")[2])


def test_fsdp_bf16_gradients_are_summed_in_fp32(tmp_path):
    """The number, not the policy: train.py's Accelerator (make_accelerator, bf16, the default
    fsdp_reduce_dtype=fp32) shards a Block under the FSDP launch file on two processes; rank
    r's bf16 gradient is X[r], one large and one small value per column, each exact in bf16
    but not their sum. fp32 gives their exact mean; a bf16 sum (reduce=compute, or
    Accelerate's own policy) gives 0.5, 0.50390625, 0.5, 128 (measured). One launch: ~10 s."""
    out = tmp_path / "grad.json"
    launch_fsdp(["fp32", str(out)], tmp_path, script="fsdp_reduce_cpu.py")
    got = json.loads(out.read_text())
    x0, x1 = (torch.tensor(x, dtype=torch.float64) for x in X)
    exact = ((x0 + x1) / 2).float()  # a sum of two bf16 values and a halving: exact in fp32
    rounded = ((x0.bfloat16() + x1.bfloat16()) / 2).float()
    assert (exact != rounded).all()  # the crafted gradients tell the two apart in each column
    assert got["dtype"] == "torch.float32"  # the sharded gradient, beside fp32 weights
    assert torch.equal(torch.tensor(got["grad"]), exact.expand(2, -1)), (got, exact, rounded)


@pytest.mark.parametrize("precision, reduce, dtypes", [
    ("bf16", "fp32", (torch.bfloat16, torch.float32)),
    ("bf16", "compute", (torch.bfloat16, torch.bfloat16)),
    ("fp16", "fp32", (torch.float16, torch.float32)),
    ("no", "fp32", None)])
def test_fsdp_plugin_policy(monkeypatch, precision, reduce, dtypes):
    """The policy Accelerate receives under an FSDP launch (its env), and none without one:
    outside FSDP, and in fp32, Accelerate's own defaults stand."""
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert fsdp_plugin(precision, reduce) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    plugin = fsdp_plugin(precision, reduce)
    if dtypes is None:
        assert plugin is None
        return
    policy = plugin.mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == dtypes
    assert policy.output_dtype == dtypes[0] and plugin.fsdp_version == 2
    plugin.set_mixed_precision(precision)  # what AcceleratorState does next: keeps ours
    assert plugin.mixed_precision_policy is policy


@pytest.mark.parametrize("name, kind, machines", [
    ("single_gpu", "NO", 1), ("ddp", "MULTI_GPU", 1), ("fsdp", "FSDP", 1),
    ("multinode", "MULTI_GPU", 2)])
def test_launch_configs_load_with_accelerate(name, kind, machines):
    """Accelerate's own loader reads each launch file as the kind docs/training.md says."""
    from accelerate.commands.config.config_args import load_config_from_file
    config = load_config_from_file(str(ROOT / f"configs/accelerate/{name}.yaml"))
    assert (config.distributed_type.value, config.num_machines) == (kind, machines)
    assert config.mixed_precision == "bf16" and not config.use_cpu
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Block"
