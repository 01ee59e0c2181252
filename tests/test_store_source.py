"""store.source.open_source: every kind of source opens to the config and the logits its own
loader gives, run dirs resolve to their latest step, and refusals name the option and the fix."""
import hashlib
import os
import shutil

import pytest
import torch

from data.tokenizer import load_tokenizer
from model.config import ModelConfig
from model.transformer import Transformer
from store.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from store.hf import import_hf, read_hf_config
from store.quantize import load_quantized, quantize_checkpoint
from store.source import FLOAT, Kind, SourceError, open_source

TOKENS = torch.arange(24)[None] % 7


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_model_path):
    """A tiny float checkpoint with its tokenizer."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=load_tokenizer(spm_model_path).vocab_size, n_layer=2,
                      n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)
    return save_checkpoint(tmp_path_factory.mktemp("src") / "float", Transformer(cfg).eval(),
                           meta={"step": 7}, files={"tokenizer.model": spm_model_path})


@pytest.fixture(scope="module")
def int8(ckpt):
    return quantize_checkpoint(ckpt, ckpt.parent / "int8", "int8")


def logits(model):
    with torch.no_grad():
        return model(TOKENS)


def test_a_checkpoint_opens_as_load_checkpoint_reads_it(ckpt, spm_model_path):
    source, direct = open_source(ckpt), load_checkpoint(ckpt)
    assert (source.kind, source.path, source.run_dir) == (Kind.CHECKPOINT, ckpt.resolve(), None)
    assert source.config == direct.config and source.meta == direct.meta == {"step": 7}
    assert torch.equal(logits(source.load()), logits(direct.model))
    assert source.tokenizer().sha256() == load_tokenizer(spm_model_path).sha256()
    assert source.weights_sha256() == hashlib.sha256(
        (ckpt / "model.safetensors").read_bytes()).hexdigest()


def test_an_hf_dir_opens_as_import_hf_reads_it(hf_llama, hf_family):
    for hf_dir in (hf_llama[1], hf_family[1]):
        source = open_source(hf_dir)
        assert source.kind is Kind.HF and source.config == read_hf_config(hf_dir)
        assert torch.equal(logits(source.load()), logits(import_hf(hf_dir)))
        assert source.tokenizer().sha256() == load_tokenizer(hf_dir).sha256()


def test_a_quantized_dir_loads_as_stored(int8):
    source, direct = open_source(int8), load_quantized(int8)
    assert source.kind is Kind.QUANTIZED and source.config == direct.config
    assert torch.equal(logits(source.load()), logits(direct.model))


def test_opening_reads_no_weights(ckpt, tmp_path):
    broken = shutil.copytree(ckpt, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not weights")
    source = open_source(broken)
    assert source.config == load_checkpoint(ckpt).config
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        source.load()


def run_dir(tmp_path, ckpt, latest):
    """A run dir holding ckpt as step_1 and step_2, checkpoints/latest -> latest."""
    steps = tmp_path / "run" / "checkpoints"
    for name in ("step_1", "step_2"):
        shutil.copytree(ckpt, steps / name)
    (steps / "latest").symlink_to(latest)
    return tmp_path / "run"


def test_a_run_dir_opens_its_latest_step(ckpt, tmp_path):
    run = run_dir(tmp_path, ckpt, "step_1")
    source = open_source(run)
    assert source.path == (run / "checkpoints" / "step_1").resolve()
    assert source.run_dir == run.resolve()
    assert torch.equal(logits(source.load()), logits(load_checkpoint(ckpt).model))


def test_a_dangling_latest_is_refused_naming_the_steps_left(ckpt, tmp_path):
    run = run_dir(tmp_path, ckpt, "step_3")
    with pytest.raises(SourceError) as e:
        open_source(run, "init_from")
    assert str(e.value) == (f"{run}/checkpoints/latest points at step_3, which does not exist "
                            f"(dangling): pass init_from={run}/checkpoints/step_2 (on disk: "
                            f"step_1, step_2)")


@pytest.mark.parametrize("make, message", [
    (lambda tmp: None, "no checkpoint given: pass init_from=<checkpoint dir"),
    (lambda tmp: tmp / "absent", "not found: pass an existing directory as init_from="),
    (lambda tmp: tmp, r"holds no config.json and no checkpoints/latest \(not a gqalab "
                      r"checkpoint, run dir or HF model dir\): pass init_from=<a checkpoint dir"),
])
def test_what_is_no_source_is_refused_naming_the_option(tmp_path, make, message):
    with pytest.raises(SourceError, match=message):
        open_source(make(tmp_path), "init_from")


def test_a_command_refuses_kinds_it_cannot_take(ckpt, int8, hf_llama):
    with pytest.raises(SourceError, match=f"{int8} is already quantized, for generation only: "
                                          f"pass init_from={ckpt.resolve()}"):
        open_source(int8, "init_from", FLOAT)
    hf_dir = hf_llama[1]
    with pytest.raises(CheckpointError, match=f"{hf_dir} is an HF llama model dir: import it first"):
        open_source(hf_dir, "ckpt", [Kind.CHECKPOINT])


def test_pickled_hf_weights_that_run_code_are_refused_without_running_it(hf_llama, tmp_path):
    hf_dir = shutil.copytree(hf_llama[1], tmp_path / "hf")
    (hf_dir / "model.safetensors").unlink()
    ran = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return os.mkdir, (str(ran),)

    torch.save({"model.embed_tokens.weight": RunsCode()}, hf_dir / "pytorch_model.bin")
    source = open_source(hf_dir)  # config.json only
    assert source.weight_files() == [hf_dir.resolve() / "pytorch_model.bin"]
    with pytest.raises(CheckpointError, match="unreadable as plain weights"):
        source.load()
    assert not ran.exists()


def test_init_from_a_run_dir_records_the_step_it_names(ckpt, tmp_path):
    """`latest` moves on as the run trains: the uptraining records the step it started from."""
    from test_train import compose_cfg
    from training.start import uptrain_config
    run = run_dir(tmp_path, ckpt, "step_2")
    args = [f"init_from={run}", "seq_len=32", "logger=none", f"run_dir={tmp_path / 'up'}"]
    cfg = uptrain_config(compose_cfg(args), run, args)
    step = (run / "checkpoints" / "step_2").resolve()
    assert cfg.init_from == cfg.data.tokenizer == str(step)
    assert (cfg.model.n_layer, cfg.attention.n_kv_head) == (2, 2)  # the source's model
