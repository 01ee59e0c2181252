"""Checkpoint directories: model.safetensors + config.json (+ meta.json, tokenizer.model).

Loading never executes code: tensors come from safetensors and the config from JSON.
Saving writes a sibling temporary directory and renames it into place when complete
(staged_dir); staged_file and write_atomic do the same for single files, for every module.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cli
from store import lock
from model.config import ConfigError, ModelConfig
from model.transformer import Transformer

WEIGHTS, CONFIG, META, TOKENIZER = "model.safetensors", "config.json", "meta.json", "tokenizer.model"
QUANTIZED = "quantization"  # meta.json key of an int8 checkpoint (store.quantize)


class CheckpointError(cli.UserError):
    """A checkpoint that cannot be read or written; the message names the problem."""


@dataclass
class Checkpoint:
    model: Transformer
    config: ModelConfig
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.path / TOKENIZER
        return path if path.is_file() else None


def unwrap(model: torch.nn.Module) -> Transformer:
    """The model inside torch.compile (_orig_mod) and DDP/Accelerate (module) wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def model_state(model: torch.nn.Module,
                state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Plain tensor names: no torch.compile/DDP wrapper prefixes, tied head dropped.
    state: the model's full state dict when it was gathered elsewhere (FSDP)."""
    model = unwrap(model)
    state = model.state_dict() if state is None else state
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | Path, model: torch.nn.Module, meta: dict | None = None,
                    files: dict[str, str | Path] | None = None, overwrite: bool = False,
                    extra: "callable | None" = None,
                    state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint dir atomically. files: name -> source path copied in (e.g. the
    tokenizer); extra(tmp_dir) may add more files before the rename; state: the weights,
    if not model.state_dict() (see model_state)."""
    path = Path(path)
    refuse_existing(path, overwrite)
    with staged_dir(path) as tmp:
        unwrapped = model_state(model, state)
        save_file({k: v.cpu() for k, v in unwrapped.items()}, tmp / WEIGHTS)
        write_json(tmp / CONFIG, config_of(model).to_dict())
        write_json(tmp / META, meta or {})
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        if extra is not None:
            extra(tmp)
    return path


@contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """A temporary name beside path to write a file (or a symlink) at, renamed onto path in
    one step when the block completes and removed when it fails: readers of path see the
    old file or the new one, never a half-written one. For a directory: staged_dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # a leftover of a killed run with this pid
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write path's new contents in one step (staged_file)."""
    with staged_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """A temporary dir beside path, renamed onto it when the block completes and deleted
    when it fails, so path is never half-written; one writer at a time (a second is
    refused, naming the first). A filesystem refusal (no such parent,
    read-only, disk full) is a CheckpointError naming path, not a traceback."""
    lock_file = output_lock(path)
    held = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        held = lock.acquire(lock_file, f"out={path}", BUSY_FIX, CheckpointError)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        if held is not None:
            lock.release(lock_file, held)
        where = path.parent if str(e.filename).startswith(str(path.parent / ".")) else e.filename
        raise CheckpointError(f"cannot write {path}: {e.strerror} ({where}): choose an "
                              f"output path in a writable directory") from None
    try:
        yield tmp
        replace_dir(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"writing {path} failed, nothing was written: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        lock.release(lock_file, held)


BUSY_FIX = "wait for it to finish, or choose another out"
RUN_LOCK = ".lock"  # inside a train.py run dir, held by the run for its whole life


def output_lock(path: Path) -> Path:
    """The lock of an output dir, beside it: the dir itself is replaced when published."""
    return path.parent / f".{path.name}.lock"


def replace_dir(src: Path, dst: Path) -> None:
    """Move a complete directory into place; an old one is removed only afterwards."""
    open_permissions(src)
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def open_permissions(root: Path) -> None:
    """mkdtemp (and safetensors) create owner-only entries; a published checkpoint gets
    the modes the user's umask gives any new file, so others on a shared machine can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for entry in root.rglob("*"):
        if not entry.is_symlink():
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)


def check_out(src: Path, out: Path, overwrite: bool, suffix: str) -> None:
    """Refuse an out that would destroy the source dir src (itself, inside it, or holding
    it: the atomic replace deletes what out held) or an existing out without overwrite.
    suffix names a fresh dir in the message, e.g. "gqa" -> out=<src>-gqa."""
    src_r, out_r = Path(src).resolve(), Path(out).resolve()
    if out_r == src_r:
        raise CheckpointError(f"out={out} is the source checkpoint itself: writing there would "
                              f"destroy it; write to a new dir, e.g. out={src}-{suffix}")
    if src_r in out_r.parents:
        raise CheckpointError(f"out={out} is inside the source checkpoint {src}: write elsewhere, "
                              f"e.g. out={src}-{suffix}")
    if out_r in src_r.parents:
        raise CheckpointError(f"out={out} contains the source checkpoint {src}: replacing it would "
                              f"delete the source; pick another out, e.g. out={src}-{suffix}")
    refuse_existing(Path(out), overwrite)
    for held in (output_lock(Path(out)), Path(out) / RUN_LOCK):  # before any work
        lock.check_free(held, f"out={out}", BUSY_FIX, CheckpointError)


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise CheckpointError(f"out={out} already exists: choose a new path or pass "
                              f"overwrite=true")


def config_of(model: torch.nn.Module) -> ModelConfig:
    return unwrap(model).config


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} not found: pass a directory holding "
                              f"{WEIGHTS} and {CONFIG}")
    try:
        d = json.loads((path / CONFIG).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {CONFIG}: not a gqalab checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / CONFIG} is not a valid model config: {e}") from None
    if isinstance(d, dict) and (d.get("model_type") or d.get("architectures")):
        family = d.get("model_type") or d["architectures"][0]
        raise CheckpointError(f"{path} is an HF {family} model dir: import it first with "
                              f"`python -m store.hf import hf={path} out=<new dir>`")
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"{path / CONFIG} is not a valid model config: {e}") from None


def read_meta(path: str | Path) -> dict[str, Any]:
    meta = Path(path) / META
    return json.loads(meta.read_text()) if meta.is_file() else {}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS}: the checkpoint is incomplete")
    try:
        return load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path / WEIGHTS} is unreadable (truncated or corrupt): {e}") from None


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None) -> Checkpoint:
    """dtype None keeps the stored dtype (a bf16 checkpoint loads as bf16)."""
    path = Path(path)
    cfg = read_config(path)
    if QUANTIZED in read_meta(path):
        raise CheckpointError(f"{path} holds quantized (int8 or int4) weights for generation: load it "
                              f"with store.quantize.load_quantized or generate.py")
    model = model_from_state(cfg, read_weights(path), path, dtype).to(device)
    return Checkpoint(model.eval(), cfg, path, read_meta(path))


def stored_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most float weights are stored in (an HF file may keep a few norms in fp32;
    int8 weights of a quantized checkpoint do not count)."""
    elements = Counter()
    for tensor in state.values():
        if tensor.is_floating_point():
            elements[tensor.dtype] += tensor.numel()
    return elements.most_common(1)[0][0]


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path | str,
                     dtype: torch.dtype | None = None,
                     build: Callable[[ModelConfig], Transformer] = Transformer) -> Transformer:
    """A model from build(cfg) that holds state's tensors themselves, float ones cast to
    dtype (None: the stored one; integer ones, e.g. int8 weights, kept). Built on the meta
    device, so there is no random init and no second copy: tensors from read_weights stay
    mapped from the file until something writes to them."""
    dtype = dtype or stored_dtype(state)
    with torch.device("meta"):
        model = build(cfg)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    load_state(model, state, source, assign=True)
    model.init_rope()  # its buffers were built on meta too
    return model.to(dtype=dtype)  # rope tables in the weights' dtype, as .to(dtype) gives


def load_state(model: Transformer, state: dict[str, torch.Tensor], source: Path | str,
               assign: bool = False) -> None:
    """Load state into model after checking names and shapes. assign: the model takes the
    tensors themselves (dtype included) instead of copying them into its own."""
    expected = model_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, config "
                                  f"expects {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=assign)
    model.tie_weights()  # assign replaced the embedding the head pointed to
