"""Checkpoint directories: round trip, plain names, atomic writes, clear load errors."""
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from model import ModelConfig, Transformer
from store.checkpoint import (CONFIG, WEIGHTS, CheckpointError, load_checkpoint,
                              save_checkpoint, staged_file, write_atomic)


def tiny_model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2,
                                   d_model=32, max_seq_len=32, **kw)).eval()


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_gives_identical_logits(tmp_path, tie):
    model = tiny_model(tie_embeddings=tie)
    save_checkpoint(tmp_path / "ckpt", model, meta={"step": 12})
    loaded = load_checkpoint(tmp_path / "ckpt")
    tokens = torch.randint(0, 40, (2, 9))
    assert torch.equal(loaded.model(tokens), model(tokens))
    assert loaded.config == model.config and loaded.meta == {"step": 12}
    assert (loaded.model.lm_head.weight is loaded.model.embed.weight) == tie


def test_weights_have_plain_names_even_from_wrappers(tmp_path):
    model = tiny_model()
    wrapped = torch.nn.Module()
    wrapped.module = model  # how DDP nests the real model
    save_checkpoint(tmp_path / "ckpt", wrapped)
    names = set(load_file(tmp_path / "ckpt" / WEIGHTS))
    assert "embed.weight" in names and "lm_head.weight" not in names
    assert not any(n.startswith(("module.", "_orig_mod.")) for n in names)


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model(), meta={"v": 1})
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(tmp_path / "ckpt", tiny_model(), meta={"v": 2})
    save_checkpoint(tmp_path / "ckpt", tiny_model(), meta={"v": 3}, overwrite=True)
    assert load_checkpoint(tmp_path / "ckpt").meta == {"v": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporaries left


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_published_checkpoint_has_the_umask_modes(tmp_path, umask):
    """Not mkdtemp's owner-only 0700: a checkpoint on a shared machine is as readable as
    any file the user creates."""
    old = os.umask(umask)
    try:
        save_checkpoint(tmp_path / "ckpt", tiny_model(), files={"extra.txt": __file__})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o777 & ~umask
    for name in (WEIGHTS, CONFIG, "meta.json", "extra.txt"):
        assert stat.S_IMODE((tmp_path / "ckpt" / name).stat().st_mode) == 0o666 & ~umask


def test_failed_save_leaves_nothing_behind(tmp_path):
    def crash(tmp_dir):
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ckpt", tiny_model(), extra=crash)
    assert list(tmp_path.iterdir()) == []


def test_filesystem_refusal_is_a_checkpoint_error_and_the_old_checkpoint_survives(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model(), meta={"v": 1})
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}

    def disk_full(tmp_dir):
        raise OSError(28, "No space left on device", str(tmp_dir / WEIGHTS))
    with pytest.raises(CheckpointError, match="writing .*ckpt failed, nothing was written: "
                                              ".*No space left on device"):
        save_checkpoint(tmp_path / "ckpt", tiny_model(), overwrite=True, extra=disk_full)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    (tmp_path / "file").write_text("")  # a parent that is not a directory
    with pytest.raises(CheckpointError, match=f"cannot write {tmp_path}/file/ckpt: .*writable"):
        save_checkpoint(tmp_path / "file" / "ckpt", tiny_model())


def test_missing_truncated_and_mismatched_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    path = save_checkpoint(tmp_path / "ckpt", tiny_model())
    data = (path / WEIGHTS).read_bytes()
    (path / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path / "ckpt2", tiny_model())
    cfg = json.loads((path / CONFIG).read_text())
    (path / CONFIG).write_text(json.dumps({**cfg, "n_kv_head": 4}))
    with pytest.raises(CheckpointError, match=r"k_proj.weight has shape \(16, 32\), config expects \(32, 32\)"):
        load_checkpoint(path)
    (path / CONFIG).unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(path)


def test_bf16_checkpoint_loads_as_bf16_unless_asked(tmp_path):
    model = tiny_model(tie_embeddings=True).to(torch.bfloat16)
    save_checkpoint(tmp_path / "ckpt", model)
    loaded = load_checkpoint(tmp_path / "ckpt").model
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert {t.dtype for t in tensors} == {torch.bfloat16}
    assert not any(t.is_meta for t in tensors)
    assert loaded.lm_head.weight is loaded.embed.weight  # still one tensor after a meta build
    tokens = torch.randint(0, 40, (2, 9))
    assert torch.equal(loaded(tokens), model(tokens))
    as_fp32 = load_checkpoint(tmp_path / "ckpt", dtype=torch.float32).model
    assert {p.dtype for p in as_fp32.parameters()} == {torch.float32}
    assert torch.equal(as_fp32.embed.weight, model.embed.weight.float())


def test_staged_file_publishes_whole_or_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.md"
    write_atomic(path, "old\n")
    with pytest.raises(RuntimeError):
        with staged_file(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    write_atomic(path, b"new\n")
    with staged_file(tmp_path / "latest") as tmp:  # a symlink swaps in one rename too
        os.symlink("results.md", tmp)
    assert path.read_text() == "new\n" and (tmp_path / "latest").read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "results.md"]
