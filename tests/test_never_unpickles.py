"""No loader runs code a file carries (issue 34). The payload is a pickle whose __reduce__
creates a marker file when unpickled, stored where each loader reads weights or state:
a checkpoint's model.safetensors, a quantized checkpoint's, an HF dir's pytorch_model.bin,
and a resume's Accelerate state (optimizer.bin, random_states_0.pkl). Each is refused and
the marker never appears; the control proves that plain unpickling would create it."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from hf_fixtures import tiny_hf_llama
from test_train import run
from test_train import base  # noqa: F401  (a fixture)
from model import ModelConfig, Transformer
from model.quantized import quantize_model
from store.checkpoint import WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint
from store.hf import import_hf
from store.quantize import load_quantized, save_quantized
from store.runs import ACCEL_STATE


class CreatesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling calls open(marker, "w"): the file appears
        return (open, (self.marker, "w"))


def plant(file: Path, marker: Path) -> None:
    """file becomes a torch.save zip whose unpickling would create marker."""
    file.unlink(missing_ok=True)
    torch.save({"weight": torch.zeros(2), "payload": CreatesMarker(marker)}, file)


def test_the_payload_runs_when_unpickled_plainly(tmp_path):
    plant(tmp_path / "x.bin", tmp_path / "marker")
    torch.load(tmp_path / "x.bin", weights_only=False)
    assert (tmp_path / "marker").exists()  # so its absence below means "never unpickled"


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=40, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                                   max_seq_len=16)).eval()


def test_checkpoint_loading(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", tiny())
    plant(path / WEIGHTS, tmp_path / "marker")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "marker").exists()


def test_quantized_loading(tmp_path):
    path = save_quantized(tmp_path / "q", quantize_model(tiny(), "int8"))
    assert load_quantized(path).model is not None  # the intact one loads
    plant(path / WEIGHTS, tmp_path / "marker")
    with pytest.raises(CheckpointError):
        load_quantized(path)
    assert not (tmp_path / "marker").exists()


def test_hf_import_of_a_pytorch_model_bin(tmp_path):
    tiny_hf_llama(tmp_path / "hf", "bpe")
    (tmp_path / "hf" / "model.safetensors").unlink()
    plant(tmp_path / "hf" / "pytorch_model.bin", tmp_path / "marker")
    with pytest.raises(CheckpointError, match="unreadable as plain weights"):
        import_hf(tmp_path / "hf")
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl"])
def test_resume_of_a_run_whose_state_was_replaced(base, tmp_path_factory, tmp_path, name):
    source = tmp_path_factory.getbasetemp() / "unpickles_run"
    if not source.exists():  # one 1-step run for both files
        run([*base, "max_steps=1", "eval_every=0", "sample_tokens=2", f"run_dir={source}"])
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir, symlinks=True)
    state = run_dir / "checkpoints" / "latest" / ACCEL_STATE / name
    assert state.is_file()
    plant(state, tmp_path / "marker")
    try:
        run([*base, "max_steps=2", "eval_every=0", f"run_dir={run_dir}", "resume=true"])
        refused = None
    except Exception as e:  # torch's weights_only refusal, raised as is
        refused = e
    assert not (tmp_path / "marker").exists()
    if name == "optimizer.bin":
        assert "weights_only" in str(refused), refused
    # random_states_0.pkl: Accelerate 1.15 catches any failure to load it and only logs
    # "Could not load random states" (the resume goes on); what matters here is the marker
