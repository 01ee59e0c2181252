"""Hub ids as sources (store/hub.py), offline: a Hub cache built here in huggingface_hub's own
layout (models--org--name/{blobs, snapshots/<commit>, refs/<branch>}) from tiny HF dirs
resolves to the same tensors, tokenizer and logits as the dirs themselves; @revision picks
that commit; the commit is recorded by convert, import and train.py's config; an id absent
from the cache under HF_HUB_OFFLINE=1 is one `error:` line, exit 2, nothing written; and a
repo of pickled weights is refused from its file list, never unpickled."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import constants

from hf_fixtures import tiny_hf_llama
from test_never_unpickles import plant
from store.checkpoint import read_meta
from store.hub import WANTED, HubError, HubOrigin
from store.source import Kind, open_source

ROOT = Path(__file__).resolve().parents[1]
OLD, NEW = "a" * 40, "b" * 40  # the two commits of org/tiny: refs/v1 and refs/main
PICKLED = "c" * 40
TOKENS = torch.arange(24)[None] % 7


def add_snapshot(cache: Path, repo: str, commit: str, files: Path, refs: tuple[str, ...]) -> Path:
    """files' contents as repo's snapshot at commit, as huggingface_hub stores one: each
    file a blob named by its hash, linked from snapshots/<commit>/; refs name the commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    for f in sorted(files.iterdir()):
        blob = root / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(cache dir, {commit: the local HF dir its snapshot was made from}, the marker a
    pickled repo's unpickling would create)."""
    tmp = tmp_path_factory.mktemp("hub")
    dirs = {OLD: tmp / "v1", NEW: tmp / "main"}
    for seed, (commit, local) in enumerate(dirs.items()):
        tiny_hf_llama(local, "bpe", seed=seed)
        add_snapshot(tmp / "cache", "org/tiny", commit, local, ("v1",) if commit == OLD
                     else ("main",))
    pickled = tmp / "pickled"
    shutil.copytree(dirs[OLD], pickled)
    (pickled / "model.safetensors").unlink()
    plant(pickled / "pytorch_model.bin", tmp / "marker")
    add_snapshot(tmp / "cache", "org/pickled", PICKLED, pickled, ("main",))
    return tmp / "cache", dirs, tmp / "marker"


@pytest.fixture(autouse=True)
def hub_cache(hub, monkeypatch):
    """The cache above is this process's Hub cache (and a child's, by the environment)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def logits(source):
    with torch.no_grad():
        return source.load()(TOKENS)


def test_an_id_opens_as_the_dir_it_was_made_from(hub):
    cache, dirs, _ = hub
    source, local = open_source("org/tiny"), open_source(dirs[NEW])
    assert source.kind is Kind.HF and source.hub == HubOrigin("org/tiny", NEW)
    assert source.path == (cache / "models--org--tiny" / "snapshots" / NEW).resolve()
    assert source.config == local.config and source.weights_sha256() == local.weights_sha256()
    assert torch.equal(logits(source), logits(local))
    assert source.tokenizer().sha256() == local.tokenizer().sha256()
    assert source.spec == f"org/tiny@{NEW}" and local.spec == str(local.path)


@pytest.mark.parametrize("revision", ["v1", OLD])
def test_a_revision_picks_that_commit(hub, revision):
    _, dirs, _ = hub
    source = open_source(f"org/tiny@{revision}")
    assert source.hub == HubOrigin("org/tiny", OLD)
    assert torch.equal(logits(source), logits(open_source(dirs[OLD])))
    assert not torch.equal(logits(source), logits(open_source("org/tiny@main")))


def test_a_local_path_wins_over_an_id(hub, tmp_path, monkeypatch):
    shutil.copytree(hub[1][OLD], tmp_path / "org" / "tiny")
    monkeypatch.chdir(tmp_path)
    source = open_source("org/tiny")
    assert source.hub is None and source.path == (tmp_path / "org" / "tiny").resolve()


def test_an_absent_id_offline_is_one_line_exit_2(hub, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub[0]),
           "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, str(ROOT / "generate.py"), "ckpt=org/absent",
                           "prompt=x"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: org/absent not found: not a local directory, and not in the Hub cache "
        f"({hub[0]}) while HF_HUB_OFFLINE=1: run once online to download it, or pass an "
        f"existing directory as ckpt="]
    assert list(tmp_path.iterdir()) == []  # nothing written, not even Hydra's outputs/


@pytest.mark.parametrize("module, args", [
    ("store.hf", ["import", "hf=org/absent@v2"]),
    ("convert.command", ["ckpt=org/absent", "n_kv_head=2"]),
])
def test_an_absent_id_writes_nothing(module, args, tmp_path, capsys):
    import importlib
    code = importlib.import_module(module).main([*args, f"out={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "HF_HUB_OFFLINE=1: run once online" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_a_repo_of_pickled_weights_is_refused_unopened(hub, tmp_path, capsys):
    from store.hf import main
    marker = hub[2]
    with pytest.raises(HubError, match=r"org/pickled .* holds its weights only as pickles "
                                       r"\(pytorch_model.bin\)"):
        open_source("org/pickled")
    assert main(["import", "hf=org/pickled", f"out={tmp_path / 'out'}"]) == 2
    assert "only as pickles" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_online_the_file_list_is_checked_before_any_download(hub, monkeypatch):
    """Online, a pickles-only repo is refused from its file list (nothing downloaded), and
    otherwise only WANTED's files are fetched, at the commit the listing named."""
    cache, _, _ = hub
    fetched = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: (
        fetched.append(kw) or str(cache / "models--org--tiny" / "snapshots" / kw["revision"])))
    listing = {"org/binonly": ["config.json", "pytorch_model.bin"],
               "org/tiny": ["config.json", "model.safetensors", "pytorch_model.bin",
                            "tokenizer.json"]}
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo, **kw: (
        SimpleNamespace(sha=NEW, siblings=[SimpleNamespace(rfilename=f) for f in listing[repo]])))
    with pytest.raises(HubError, match=r"^org/binonly holds its weights only as pickles"):
        open_source("org/binonly")
    assert fetched == []
    assert open_source("org/tiny@main").hub == HubOrigin("org/tiny", NEW)
    assert fetched[0]["revision"] == NEW and fetched[0]["allow_patterns"] == WANTED
    import fnmatch
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in WANTED)


def test_the_commit_is_recorded_by_import_convert_and_train(hub, tmp_path):
    from convert.command import convert_checkpoint
    from convert.heads import Conversion
    from store.hf import main
    from test_train import compose_cfg
    from training.distill import teacher_source
    from training.start import uptrain_config
    assert main(["import", "hf=org/tiny@v1", f"out={tmp_path / 'imported'}"]) == 0
    assert read_meta(tmp_path / "imported")["hub"] == f"org/tiny@{OLD}"
    out = convert_checkpoint("org/tiny", tmp_path / "gqa", Conversion(2))
    assert read_meta(out)["converted_from"]["hub"] == f"org/tiny@{NEW}"
    meta = read_meta(out)  # the snapshot dir it read is gone: the teacher is found by its id
    meta["converted_from"]["path"] = str(tmp_path / "elsewhere")
    (out / "meta.json").write_text(json.dumps(meta))
    assert teacher_source(out).hub == HubOrigin("org/tiny", NEW)
    args = ["init_from=org/tiny", "seq_len=32", "logger=none", "max_steps=2",
            f"run_dir={tmp_path / 'up'}"]
    cfg = uptrain_config(compose_cfg(args), "org/tiny", args)
    assert cfg.init_from == f"org/tiny@{NEW}"  # train_config.yaml names the very weights
    assert cfg.data.tokenizer == str(open_source(cfg.init_from).path)
