"""Quantized checkpoint dirs (int8 / int4 weights as stored, the mode in meta.json) and
`python -m store.quantize`, which writes one from a float checkpoint.

    python -m store.quantize ckpt=runs/x/checkpoints/step_1000 out=ckpts/x-int8 [mode=int8_head]
    python -m store.quantize ckpt=... out=ckpts/x-int4 mode=int4 group_size=64
    python -m store.quantize --help  (a Hydra app: configs/quantize.yaml, QuantizeConfig below)

The layers and the arithmetic are model/quantized.py's.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

import cli
from data.tokenizer import tokenizer_files
from model.quantized import (Int4Linear, Int8Linear, QuantizeError, QuantMode, QuantSpec,
                             describe, join_projections, quantize_model, quantized_layers,
                             replace_linears, spec_of, weight_bytes)
from model.transformer import Transformer
from store.checkpoint import (QUANTIZED, Checkpoint, CheckpointError, check_out,
                              model_from_state, read_config, read_meta, read_weights,
                              save_checkpoint)
from store.runs import TRAIN_CONFIG


def is_quantized(path: str | Path) -> bool:
    return QUANTIZED in read_meta(path)


def save_quantized(path: str | Path, model: Transformer, meta: dict | None = None,
                   files: dict | None = None, overwrite: bool = False) -> Path:
    """A checkpoint dir of model as quantize_model left it: the quantized weights, scales
    (and int4 zeros, as plain nibbles) in model.safetensors, the mode in meta.json, so
    loading does not quantize again."""
    spec = spec_of(model)
    if spec is None:
        raise CheckpointError("the model is not quantized: call quantize_model first")
    info = {"mode": str(spec.mode), "layers": len(quantized_layers(model))}
    if spec.int4:
        info |= {"group_size": spec.group_size,
                 "scheme": "int4 weight-only, asymmetric per group: (q - 8) * scale + zero, "
                           "even inputs in the low nibble" + (
                               "; the head int8, symmetric per-channel"
                               if spec.head_bits == 8 else "")}
    else:
        info["scheme"] = "int8 weight-only, symmetric per-channel"
    meta = {**(meta or {}), QUANTIZED: info}
    return save_checkpoint(path, model, meta, files, overwrite=overwrite)


def load_quantized(path: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> Checkpoint:
    """Load a save_quantized checkpoint: quantized weights as stored (never re-quantized),
    floats converted to dtype. Executes no code: safetensors and JSON only."""
    path = Path(path)
    meta = read_meta(path)
    info = meta.get(QUANTIZED, {})
    try:
        spec = QuantSpec.parse(info.get("mode"), info.get("group_size", 64))
    except QuantizeError:
        raise CheckpointError(f"{path} is not a quantized checkpoint (meta.json has no "
                              f"{QUANTIZED}.mode in {[str(m) for m in QuantMode]}, or a "
                              f"group_size that fits it)") from None
    state = read_weights(path)

    def build(cfg):  # quantized layers where the checkpoint has them: no float copy is made
        model = Transformer(cfg)
        for name in replace_linears(model, spec, empty=True):
            stored = torch.int8 if spec.bits(name) == 8 else torch.uint8
            if state.get(f"{name}.weight", torch.empty(0, dtype=stored)).dtype != stored:
                raise CheckpointError(f"{path}: {name}.weight is {state[f'{name}.weight'].dtype}"
                                      f", a {spec.mode} checkpoint stores it as {stored}")
        return model
    model = model_from_state(read_config(path), state, path, dtype, build).to(device)
    for layer in model.modules():
        if isinstance(layer, Int4Linear):
            layer.pack_for_cpu()
        elif isinstance(layer, Int8Linear):
            if layer.weight.data_ptr() % 64:
                # a view into the file's bytes at whatever offset the tensors before it left:
                # _weight_int8pack_mm's aligned loads fault on it (a fresh tensor is 64-aligned)
                layer.weight = layer.weight.clone()
            layer.pack_for_cpu()
    join_projections(model)
    return Checkpoint(model.eval(), model.config, path, meta)


def quantize_checkpoint(src: str | Path, out: str | Path, mode: str = "int8",
                        overwrite: bool = False, group_size: int = 64) -> Path:
    """Write a quantized copy of float checkpoint src at out, tokenizer and train config
    included, provenance in meta.json. Nothing is written when mode or group_size do not
    fit the model (a ValueError)."""
    from store.source import Kind, open_source  # imports this module (load_quantized)
    spec = QuantSpec.parse(mode, group_size)
    check_out(Path(src), Path(out), overwrite, spec.mode)
    source = open_source(src, "ckpt", [Kind.CHECKPOINT])  # refuses quantized and HF dirs
    src, out = source.path, Path(out)
    model = quantize_model(source.load().float(), spec)
    meta = {**source.meta, "quantized_from": str(src)}
    files = tokenizer_files(src)  # the tokenizer travels whole: model file and its configs
    if (src / TRAIN_CONFIG).is_file():
        files[TRAIN_CONFIG] = src / TRAIN_CONFIG
    return save_quantized(out, model, meta, files, overwrite=overwrite)


@dataclass
class QuantizeConfig:
    """python -m store.quantize's options (configs/quantize.yaml; --help describes them)."""
    ckpt: str = MISSING  # a float gqalab checkpoint dir
    out: str = MISSING  # the new, quantized checkpoint dir
    mode: QuantMode = QuantMode.int8  # int8 | int8_head | int4 | int4_head | int4_int8head (_head: the head too)
    group_size: int = 64  # int4: inputs per scale/zero pair (GROUP_SIZES)
    overwrite: bool = False  # replace an existing out


ConfigStore.instance().store(name="quantize_schema", node=QuantizeConfig)


@cli.hydra_main(config_path="../configs", config_name="quantize")
def command(cfg: DictConfig) -> None:
    cli.require(cfg)
    args: QuantizeConfig = OmegaConf.to_object(cfg)
    out = quantize_checkpoint(args.ckpt, args.out, args.mode, args.overwrite, args.group_size)
    model = load_quantized(out).model
    print(f"wrote {out}: {describe(model)} weights, {weight_bytes(model) / 2**20:,.2f} MiB "
          f"(from {args.ckpt})")


def main(argv: list[str] | None = None) -> int:
    """`python -m store.quantize key=value ...` (argv: those arguments); the exit status."""
    return cli.run_app(command, argv)


if __name__ == "__main__":
    sys.exit(main())
