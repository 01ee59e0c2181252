"""Open whatever a path names: a gqalab checkpoint dir, a train.py run dir (its
checkpoints/latest), an HF Llama / GPT-2 / GPT-NeoX dir, or a quantized dir, or a Hub id
(`org/name[@revision]`, store/hub.py) when no local path has that name; and the device and
dtype to run it in. Every command that reads a model opens it with open_source.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Sequence

import torch

import cli
from data.tokenizer import Tokenizer
from model.config import ModelConfig
from model.transformer import Transformer
from store import runs
from store.checkpoint import CONFIG, WEIGHTS, load_checkpoint, read_config, read_meta
from store.hf import checkpoint_tokenizer, hf_weight_files, import_hf, is_hf_model, read_hf_config
from store.hub import HubOrigin, model_dir
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


class Kind(str, Enum):
    """What a source's weights are (how it was named, e.g. by a run dir, is Source.run_dir)."""
    CHECKPOINT = "checkpoint"  # gqalab float weights (store/checkpoint.py)
    HF = "hf"  # an HF Llama / GPT-2 / GPT-NeoX dir: imported on load
    QUANTIZED = "quantized"  # int8 / int4 weights (store/quantize.py): loaded as stored


FLOAT = (Kind.CHECKPOINT, Kind.HF)  # what training and conversion take: float weights


@dataclass(frozen=True)
class Source:
    """An opened source: what its config.json and meta.json say. No weights are read until
    load(). path: the dir holding the weights (for a run dir, its latest step), resolved."""
    path: Path
    kind: Kind
    config: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    run_dir: Path | None = None  # the train.py run dir it was named by
    hub: HubOrigin | None = None  # the Hub repo and commit it was named by

    @property
    def spec(self) -> str:
        """What names these weights again: `org/name@<commit>` for a Hub id, else the path."""
        return self.hub.spec if self.hub else str(self.path)

    def load(self, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> Transformer:
        """The model in eval mode on device, in dtype (None: the stored one)."""
        if self.kind is Kind.HF:  # rope tables built in dtype, not via bf16
            return import_hf(self.path, dtype).to(device)
        if self.kind is Kind.QUANTIZED:  # as stored, not quantized again
            return load_quantized(self.path, device, dtype).model
        return load_checkpoint(self.path, device, dtype).model

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer it ships, or None."""
        return checkpoint_tokenizer(self.path)

    def weight_files(self) -> list[Path]:
        """The files its weights are in (an HF dir's shards, in order)."""
        return hf_weight_files(self.path) if self.kind is Kind.HF else [self.path / WEIGHTS]

    def weights_sha256(self) -> str:
        """One digest of its weights' bytes: what a conversion records of its source."""
        return sha256_files(self.weight_files())


def sha256_files(paths: list[Path]) -> str:
    """One digest of the files' bytes in order (an HF dir's shards; one file: its sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def open_source(path: str | Path | None, option: str = "ckpt",
                kinds: Sequence[Kind] = tuple(Kind)) -> Source:
    """path as the command's `option=` names it: a checkpoint, HF or quantized dir as is, a
    train.py run dir as its checkpoints/latest, a Hub id as its snapshot in the Hub cache.
    Reads config.json and meta.json only. kinds: those the command takes; another is refused
    with the fix (refusals name option)."""
    given, hub = existing_dir(path, option)
    weights = given if (given / CONFIG).is_file() else latest_step(given, option)
    kind = kind_of(weights)
    if kind not in kinds:
        refuse(weights, kind, option)
    config = read_hf_config(weights) if kind is Kind.HF else read_config(weights)
    run_dir = None if weights == given else given.resolve()
    return Source(weights.resolve(), kind, config, read_meta(weights), run_dir, hub)


def existing_dir(path: str | Path | None, option: str) -> tuple[Path, HubOrigin | None]:
    """The dir path names, local or a Hub id's snapshot, and its Hub origin (None: local)."""
    if not path:
        raise SourceError(f"no checkpoint given: pass {option}=<checkpoint dir | run dir | "
                          f"HF model dir | Hub id org/name>")
    p, hub = model_dir(str(path), option)
    if not p.is_dir():
        raise SourceError(f"checkpoint {p} not found: pass an existing directory as {option}=")
    return p, hub


def latest_step(run_dir: Path, option: str) -> Path:
    """A train.py run dir's checkpoints/latest; a dangling one is refused, naming the step
    dirs left to pass instead."""
    latest = runs.latest_checkpoint(run_dir)
    if latest is not None:
        return latest
    link = runs.latest_link(run_dir)
    if link.is_symlink():  # pointing at a step that was deleted
        steps = [d for d in runs.step_dirs(link.parent) if (d / CONFIG).is_file()]
        fix = (f"pass {option}={steps[-1]} (on disk: {', '.join(d.name for d in steps)})"
               if steps else "no step_N checkpoint is left in it")
        raise SourceError(f"{link} points at {os.readlink(link)}, which does not exist "
                          f"(dangling): {fix}")
    raise SourceError(f"{run_dir} holds no {CONFIG} and no checkpoints/latest (not a gqalab "
                      f"checkpoint, run dir or HF model dir): pass {option}=<a checkpoint dir, a "
                      f"train.py run dir or an HF Llama, GPT-2 or GPT-NeoX dir>")


def kind_of(path: Path) -> Kind:
    if is_hf_model(path):
        return Kind.HF
    return Kind.QUANTIZED if is_quantized(path) else Kind.CHECKPOINT


def refuse(path: Path, kind: Kind, option: str) -> None:
    """Raise the refusal of a source the command cannot take, with what to pass instead."""
    if kind is Kind.HF:
        read_config(path)  # refuses an HF dir, naming its family and the import command
    origin = read_meta(path).get("quantized_from", "<the float checkpoint it was quantized from>")
    raise SourceError(f"{path} is already quantized, for generation only: pass "
                      f"{option}={origin}")


def load_model(path: str | Path, device: torch.device,
               dtype: torch.dtype) -> tuple[Transformer, Tokenizer | None]:
    """-> (model, its tokenizer or None), for callers that hold a path, not a Source."""
    source = open_source(path)
    return source.load(device, dtype), source.tokenizer()
