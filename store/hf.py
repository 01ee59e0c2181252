"""HF import/export for Llama, GPT-2 and GPT-NeoX: file IO and the command.

What differs per family (config.json, tensor names and layouts) is in store/hf_families.py;
this file reads and writes the directories. transformers is not imported here; it is a
test/bench-only dependency.

    python -m store.hf import hf=<hf model dir> out=<our checkpoint dir>
    python -m store.hf import hf=gpt2 out=<our checkpoint dir>   # a Hub id (store/hub.py)
    python -m store.hf export ckpt=<our checkpoint dir> out=<hf model dir>
    python -m store.hf --help

The command is a Hydra app (configs/hf.yaml, HfConfig below); its first word is the action.

The tokenizer travels both ways: import copies the HF dir's tokenizer files (data.tokenizer's
TOKENIZER_FILES); export writes them with a tokenizer_config.json and a
generation_config.json (bos/eos), so AutoTokenizer.from_pretrained loads the dir too.
"""
from __future__ import annotations

import json
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import cli
from data.config import DataError
from data.tokenizer import CONFIG_FILE, Tokenizer, copy_tokenizer, load_tokenizer, tokenizer_files
from store.checkpoint import (CONFIG, WEIGHTS, CheckpointError, check_out, config_of,
                              load_checkpoint, model_from_state, model_state, refuse_existing,
                              save_checkpoint, staged_dir, write_json)
from model.config import ModelConfig
from store.hf_families import family_of, family_of_hf
from store.hub import model_dir
from model.transformer import Transformer

HF_INDEX = "model.safetensors.index.json"
HF_PICKLE = "pytorch_model.bin"
HF_PICKLE_INDEX = "pytorch_model.bin.index.json"

def is_hf_model(path: str | Path) -> bool:
    """A directory whose config.json is an HF transformers config, of any family: import_hf
    reads Llama, GPT-2 and GPT-NeoX and names them when it refuses another."""
    try:
        d = json.loads((Path(path) / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(d, dict) and bool(d.get("model_type") or d.get("architectures"))


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an HF dir of any family, from its config.json alone."""
    config = Path(path) / CONFIG
    try:
        d = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config} is unreadable: {e}") from None
    return family_of_hf(d, config).config_from_hf(d, config)


# ---------------------------------------------------------------- config

def tokenizer_special_ids(tok: Tokenizer | None) -> dict[str, int]:
    """bos/eos/pad ids for config.json (absent ids are left out)."""
    if tok is None:
        return {}
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {k: v for k, v in ids.items() if v is not None}


def hf_tokenizer_config(tok: Tokenizer) -> dict:
    """tokenizer_config.json for a tokenizer that came without one (gqalab's own): the class
    transformers builds it with, its special tokens and whether it adds BOS."""
    config = {"tokenizer_class": tok.hf_class, "add_bos_token": tok.add_bos, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    if tok.file_name == "tokenizer.model" and not tok.adds_dummy_prefix:
        config["add_prefix_space"] = False  # no dummy prefix (gqalab's own): no leading space
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tok, f"{name}_id")
        if token_id is not None:
            config[f"{name}_token"] = tok.token_text(token_id)
    return config


def checkpoint_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer a checkpoint or HF dir ships, or None."""
    if not tokenizer_files(path):
        return None
    try:
        return load_tokenizer(path)
    except DataError as e:
        raise CheckpointError(str(e)) from None


def tokenizer_writer(path: Path):
    """save_checkpoint's extra that writes the tokenizer a checkpoint or HF dir ships (its
    files and the special ids of its config.json, see copy_tokenizer), or None."""
    tok = checkpoint_tokenizer(Path(path))
    return tok and (lambda tmp: copy_tokenizer(tok, tmp))


# ---------------------------------------------------------------- weights

def hf_weight_files(path: Path) -> list[Path]:
    """The files holding an HF dir's weights: one file or the shards its index names,
    safetensors before pickled .bin when a dir ships both."""
    for single, index in ((WEIGHTS, HF_INDEX), (HF_PICKLE, HF_PICKLE_INDEX)):
        if (path / single).is_file():
            return [path / single]
        if (path / index).is_file():
            shards = json.loads((path / index).read_text())["weight_map"].values()
            return [path / shard for shard in sorted(set(shards))]
    raise CheckpointError(f"{path} has no {WEIGHTS}, {HF_INDEX}, {HF_PICKLE} or "
                          f"{HF_PICKLE_INDEX}: not an HF model directory")


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF dir (hf_weight_files), in their stored dtype. Each file is
    memory-mapped, shard by shard: nothing is read into memory until used, so the whole
    model is never held twice."""
    state, file = {}, path
    try:
        for file in hf_weight_files(path):
            if file.suffix == ".safetensors":
                state.update(load_file(file))
            else:
                state.update(read_pickled(file))
    except pickle.UnpicklingError:
        raise CheckpointError(f"{file} is unreadable as plain weights (it holds objects that "
                              f"would run code): convert it to safetensors from a trusted "
                              f"environment") from None
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError, json.JSONDecodeError,
            RuntimeError) as e:
        raise CheckpointError(f"{path}: weights are unreadable ({type(e).__name__}: {e})") from None
    return state


def read_pickled(file: Path) -> dict[str, torch.Tensor]:
    """A pytorch_model.bin's tensors; weights_only refuses any pickle that would run code.
    The zip format (torch >= 1.6) is memory-mapped; the legacy one cannot be, so is read."""
    return torch.load(file, map_location="cpu", weights_only=True,
                      mmap=zipfile.is_zipfile(file))


def import_hf(path: str | Path, dtype: torch.dtype | None = None) -> Transformer:
    """An HF Llama, GPT-2 or GPT-NeoX directory -> our Transformer (cpu, eval mode) in dtype,
    by default the stored one: a bf16 model stays bf16 and is not copied (model_from_state)."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} has no {CONFIG}: pass an HF model directory")
    try:
        hf_config = json.loads((path / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG} is unreadable: {e}") from None
    if not is_hf_model(path) and (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is already a gqalab checkpoint, not an HF model dir: "
                              f"use it as it is (ckpt={path})")
    family = family_of_hf(hf_config, path / CONFIG)
    cfg = family.config_from_hf(hf_config, path / CONFIG)
    state = family.state_from_hf(read_hf_weights(path), cfg, path)
    return model_from_state(cfg, state, path, dtype).eval()


def export_hf(source: str | Path | torch.nn.Module, out: str | Path,
              tokenizer: str | Path | None = None, overwrite: bool = False) -> Path:
    """Our checkpoint dir (or a model) -> an HF dir of its family (Llama, GPT-2 or GPT-NeoX)
    that transformers loads, AutoTokenizer included: config.json, model.safetensors, and the
    tokenizer (a file or a dir; default the checkpoint's) with tokenizer_config.json and
    generation_config.json. Written atomically."""
    out = Path(out)
    refuse_existing(out, overwrite)
    if isinstance(source, torch.nn.Module):
        model = source
    else:
        ckpt = load_checkpoint(source)
        model, tokenizer = ckpt.model, tokenizer or ckpt.path
    tok = None
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer) if Path(tokenizer).is_file() else checkpoint_tokenizer(
            Path(tokenizer))
    cfg = config_of(model)
    family = family_of(cfg)
    state = family.state_to_hf({k: v.cpu() for k, v in model_state(model).items()}, cfg)
    dtype = next(iter(state.values())).dtype
    with staged_dir(out) as tmp:
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        write_json(tmp / CONFIG, {**family.config_to_hf(cfg), **tokenizer_special_ids(tok),
                                  "dtype": str(dtype).removeprefix("torch.")})
        if tok is not None:
            copy_tokenizer(tok, tmp)
            if not (tmp / CONFIG_FILE).is_file():
                write_json(tmp / CONFIG_FILE, hf_tokenizer_config(tok))
    return out


# ---------------------------------------------------------------- command

ACTIONS = ("import", "export")


@dataclass
class HfConfig:
    """python -m store.hf's options (configs/hf.yaml; --help describes them)."""
    action: str = ""  # import | export; also the first word: python -m store.hf export ...
    hf: Optional[str] = None  # import: an HF Llama/GPT-2/GPT-NeoX dir, or a Hub id org/name[@rev]
    ckpt: Optional[str] = None  # export: a gqalab checkpoint dir
    out: str = MISSING  # the new dir
    overwrite: bool = False  # replace an existing out


ConfigStore.instance().store(name="hf_schema", node=HfConfig)


def action_as_key(argv: list[str]) -> list[str]:
    """`import hf=...` -> `action=import hf=...`: the first word names the action."""
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        return [f"action={argv[0]}", *argv[1:]]
    return argv


@cli.hydra_main(config_path="../configs", config_name="hf", errors=(OSError,))
def command(cfg: DictConfig) -> None:
    if cfg.action not in ACTIONS:
        got = f"unknown command {cfg.action!r}" if cfg.action else "no command"
        raise cli.UserError(f"{got}: python -m store.hf import hf=<HF dir> out=<checkpoint "
                            f"dir>, or export ckpt=<checkpoint dir> out=<HF dir> (see --help)")
    source, other = ("hf", "ckpt") if cfg.action == "import" else ("ckpt", "hf")
    if cfg[source] is None or cfg[other] is not None:
        wrong = (f"{other}= is for the other action" if cfg[other] is not None
                 else f"missing {source}=...")
        raise cli.UserError(f"{wrong}: python -m store.hf {cfg.action} {source}=<dir> "
                            f"out=<dir> (see --help)")
    cli.require(cfg)
    args: HfConfig = OmegaConf.to_object(cfg)
    if args.action == "import":
        check_out(Path(args.hf), Path(args.out), args.overwrite, "gqalab")
        hf_dir, hub = model_dir(args.hf, "hf")  # a local dir, or a Hub id's cache snapshot
        write_tokenizer = tokenizer_writer(hf_dir)  # a bad one fails before the weights
        origin = {"hub": hub.spec} if hub else {}
        out = save_checkpoint(args.out, import_hf(hf_dir),
                              meta={"imported_from": args.hf, **origin},
                              extra=write_tokenizer, overwrite=args.overwrite)
    else:
        check_out(Path(args.ckpt), Path(args.out), args.overwrite, "hf")
        out = export_hf(args.ckpt, args.out, overwrite=args.overwrite)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    """`python -m store.hf import|export key=value ...` (argv: those arguments); the exit
    status."""
    return cli.run_app(command, action_as_key(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
