"""Open whatever a path names: a gqalab checkpoint dir, a train.py run dir (its
checkpoints/latest), an HF Llama / GPT-2 / GPT-NeoX dir, or a quantized dir; and the device
and dtype to run it in.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

import cli
from store import runs
from store.checkpoint import CONFIG, load_checkpoint
from store.hf import checkpoint_tokenizer, import_hf, is_hf_model
from store.quantize import is_quantized, load_quantized

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class SourceError(cli.UserError):
    """A path, device or dtype that cannot be opened as asked; the message names the fix."""


def pick_device(name: str) -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise SourceError(f"device={name!r} is not a torch device: use auto, cpu, cuda, "
                             f"cuda:N or mps") from None
        if str(device) not in usable_devices():
            raise SourceError(f"device={name} is not available here: use auto or one of "
                             f"{', '.join(usable_devices())}")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def usable_devices() -> list[str]:
    """The device names this machine runs: cpu, cuda and cuda:N per GPU, mps."""
    gpus = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return ["cpu", *(["cuda", *gpus] if gpus else []), *mps]


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 on a CPU without bf16 matmul units is several times slower than fp32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise SourceError(f"dtype={name!r} is unknown: use auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint or HF dir as is; a train.py run dir -> its checkpoints/latest."""
    if not path:
        raise SourceError("no checkpoint given: pass ckpt=<checkpoint dir | run dir | HF model dir>")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise SourceError(f"checkpoint {p} not found: pass an existing directory as ckpt=")
    if (p / CONFIG).is_file():
        return p
    latest = runs.latest_link(p)
    if latest.is_dir():  # a directory or a symlink to one
        return latest.resolve()
    if latest.is_symlink():  # pointing at a step that was deleted
        steps = [d for d in runs.step_dirs(latest.parent) if (d / CONFIG).is_file()]
        fix = (f"pass ckpt={steps[-1]} (on disk: {', '.join(d.name for d in steps)})"
               if steps else "no step_N checkpoint is left in it")
        raise SourceError(f"{latest} points at {os.readlink(latest)}, which does not exist "
                         f"(dangling): {fix}")
    if latest.is_file():  # a text file naming the step dir
        target = latest.parent / latest.read_text().strip()
        if target.is_dir():
            return target
    raise SourceError(f"{p} holds no {CONFIG} and no checkpoints/latest: pass a checkpoint dir, "
                     f"a train.py run dir or an HF Llama, GPT-2 or GPT-NeoX dir")


def load_model(path: Path, device: torch.device, dtype: torch.dtype):
    """-> (model, its tokenizer or None)."""
    if is_hf_model(path):
        model = import_hf(path, dtype).to(device)  # rope tables built in dtype, not via bf16
    elif is_quantized(path):  # written by store.quantize: int8 as stored, not re-quantized
        model = load_quantized(path, device, dtype).model
    else:
        model = load_checkpoint(path, device, dtype).model
    return model, checkpoint_tokenizer(path)
