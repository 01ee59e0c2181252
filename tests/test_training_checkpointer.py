"""training/checkpointer.py: save -> restore gives back the run exactly, a failed save leaves
`latest` as it was, and pruning keeps keep_last plus whatever `latest` names."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.loader import TokenStream  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from store import runs  # noqa: E402
from store.checkpoint import CheckpointError, load_checkpoint, read_meta  # noqa: E402
from store.runs import METRICS, TRAIN_CONFIG  # noqa: E402
from training.checkpointer import Checkpointer, read_trainer_state, resume_point  # noqa: E402
from training.runtime import make_accelerator  # noqa: E402

RUN_CFG = OmegaConf.create({"mixed_precision": "no", "grad_accum": 1, "fsdp_reduce_dtype": "fp32",
                            "logger": {"backend": "none"}, "seed": 3})


def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "train.bin"
    (np.arange(600) % 40).astype(np.uint16).tofile(path)
    return path


def setup_run(tmp_path: Path, seed: int):
    """A prepared tiny model, AdamW and token stream, as train.py's setup leaves them."""
    accelerator = make_accelerator(RUN_CFG, tmp_path / "run")
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                    max_seq_len=16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    stream = TokenStream(tokens(tmp_path), np.uint16, 16, 2, seed=3)
    return accelerator, model, optimizer, stream


def train_steps(model, optimizer, stream, n: int) -> None:
    for _ in range(n):
        x, y = stream.next_batch()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def save(checkpointer, accelerator, model, stream, step: int, **counters) -> Path:
    trainer_state = {"step": step, "tokens_seen": 32 * step, **counters,
                     "loader": stream.state_dict()}
    return checkpointer.save(accelerator, model, step, {"step": step}, trainer_state, RUN_CFG, {})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_save_then_restore_gives_back_weights_optimizer_rng_and_trainer_state(tmp_path):
    accelerator, model, optimizer, stream = setup_run(tmp_path, seed=0)
    train_steps(model, optimizer, stream, 2)
    checkpointer = Checkpointer(tmp_path / "run", keep_last=2)
    path = save(checkpointer, accelerator, model, stream, 2, step_last=1, loss_sum=0.25)
    after_save = torch.rand(5)  # what the RNG saved with the checkpoint draws next
    saved_weights, saved_optimizer = weights(model), optimizer.state_dict()

    accelerator, fresh, fresh_optimizer, fresh_stream = setup_run(tmp_path, seed=1)
    assert not torch.equal(fresh.state_dict()["embed.weight"], saved_weights["embed.weight"])
    assert resume_point(True, tmp_path / "run") == path == checkpointer.latest
    counters = checkpointer.restore(accelerator, fresh_stream, path, read_trainer_state(path))

    assert counters == {"step": 2, "tokens_seen": 64, "step_last": 1, "loss_sum": 0.25}
    assert torch.equal(torch.rand(5), after_save)
    assert fresh_stream.state_dict() == stream.state_dict() == {"step": 2, "seed": 3,
                                                                "mode": "random"}
    restored = fresh_optimizer.state_dict()
    assert restored["param_groups"] == saved_optimizer["param_groups"]
    for index, state in saved_optimizer["state"].items():
        assert_same_tensors(restored["state"][index], state)
    assert_same_tensors(weights(load_checkpoint(path).model), saved_weights)
    assert OmegaConf.load(path / TRAIN_CONFIG) == RUN_CFG
    assert read_meta(path)["step"] == 2


def fail_in_accelerate_state(accelerator, monkeypatch):
    def half_written(out: str):
        Path(out).mkdir(parents=True)
        (Path(out) / "optimizer.bin").write_bytes(b"half")
        raise OSError("No space left on device")
    monkeypatch.setattr(accelerator, "save_state", half_written)
    return OSError, {}


def fail_in_trainer_state(accelerator, monkeypatch):
    return TypeError, {"tokens_seen": object()}  # not JSON: fails after the weights are written


@pytest.mark.parametrize("fail", [fail_in_accelerate_state, fail_in_trainer_state])
def test_a_save_that_fails_midway_leaves_latest_intact_and_loadable(tmp_path, monkeypatch, fail):
    accelerator, model, optimizer, stream = setup_run(tmp_path, seed=0)
    checkpointer = Checkpointer(tmp_path / "run", keep_last=2)
    train_steps(model, optimizer, stream, 1)
    first = save(checkpointer, accelerator, model, stream, 1)
    first_weights = weights(model)
    train_steps(model, optimizer, stream, 1)

    with monkeypatch.context() as patch:
        error, bad_counters = fail(accelerator, patch)
        with pytest.raises(error):
            save(checkpointer, accelerator, model, stream, 2, **bad_counters)

    run_dir = tmp_path / "run"
    assert checkpointer.latest == first == runs.find_checkpoint(run_dir)
    assert not (runs.checkpoints_dir(run_dir) / "step_2").exists()
    assert_same_tensors(weights(load_checkpoint(run_dir / "checkpoints" / "latest").model),
                        first_weights)
    assert read_trainer_state(first)["step"] == 1
    second = save(checkpointer, accelerator, model, stream, 2)  # the next save clears leftovers
    assert checkpointer.latest == second
    assert sorted(p.name for p in checkpointer.root.iterdir()) == ["latest", "step_1", "step_2"]


def step_dirs_with_latest(root: Path, steps: list[int], latest: int,
                          keep_last: int) -> Checkpointer:
    for step in steps:
        (root / "checkpoints" / f"step_{step}").mkdir(parents=True)
    (root / "checkpoints" / "latest").symlink_to(f"step_{latest}")
    (root / "checkpoints" / ".staging-step_9").mkdir()  # leftovers of killed writes
    (root / "checkpoints" / ".latest-4242").write_text("")
    return Checkpointer(root, keep_last)


def kept(checkpointer: Checkpointer) -> list[str]:
    return sorted(p.name for p in checkpointer.root.iterdir())


@pytest.mark.parametrize("keep_last, latest, expected", [
    (2, 7, ["step_5", "step_7"]),
    (2, 1, ["step_1", "step_5", "step_7"]),  # latest is never pruned, even when old
    (1, 3, ["step_3", "step_7"]),
    (3, 5, ["step_3", "step_5", "step_7"]),
    (9, 1, ["step_1", "step_3", "step_5", "step_7"]),
])
def test_prune_keeps_keep_last_and_the_one_latest_names(tmp_path, keep_last, latest, expected):
    checkpointer = step_dirs_with_latest(tmp_path, [1, 3, 5, 7], latest, keep_last)
    checkpointer.prune()
    assert kept(checkpointer) == ["latest", *expected]
    assert checkpointer.latest == checkpointer.root / f"step_{latest}"


def test_rewind_drops_the_checkpoints_and_metrics_after_the_resumed_step(tmp_path):
    checkpointer = step_dirs_with_latest(tmp_path, [1, 2, 3, 4], latest=2, keep_last=5)
    records = [{"step": 1, "train_loss": 3.0}, {"step": 2, "train_loss": 2.5},
               {"step": 2, "val_loss": 2.6}, {"step": 3, "train_loss": 2.0},
               {"step": 4, "train_loss": 1.5}]
    (tmp_path / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    checkpointer.rewind(2)
    assert kept(checkpointer) == ["latest", "step_1", "step_2"]
    assert [json.loads(line) for line in (tmp_path / METRICS).read_text().splitlines()] == \
        records[:3]


def test_start_over_removes_checkpoints_and_logs_only(tmp_path):
    checkpointer = step_dirs_with_latest(tmp_path, [1, 2], latest=2, keep_last=2)
    for name in (METRICS, "loss.png", "notes.txt"):
        (tmp_path / name).write_text("x\n")
    checkpointer.start_over()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert checkpointer.latest is None


def test_resume_true_without_a_checkpoint_is_refused(tmp_path):
    assert resume_point(False, tmp_path) is None and resume_point("false", tmp_path) is None
    with pytest.raises(CheckpointError, match="resume=true but .* has no checkpoint"):
        resume_point(True, tmp_path)
