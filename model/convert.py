"""Convert a checkpoint to fewer KV heads: MHA -> GQA/MQA (Ainslie et al. 2023, §2.1).

The K and V projection heads of each contiguous group are mean-pooled into one head;
Q, O and every other weight are copied unchanged. Contiguous groups match attention.py:
query head h reads KV head h // group_size, so after pooling a query head reads the mean
of exactly the heads it used to read one of. `first` (keep each group's first head) and
`random` (fresh init) are the paper's Figure 4 baselines.

    python -m model.convert ckpt=runs/mha/checkpoints/final n_kv_head=2 method=mean out=ckpts/gqa2
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from model.checkpoint import (TOKENIZER, WEIGHTS, CheckpointError, load_checkpoint,
                              load_state, model_state, read_config, read_meta,
                              save_checkpoint)
from model.cli_args import ArgError, as_bool, as_int, parse_key_values
from model.config import ConfigError, divisors
from model.summary import format_summary
from model.transformer import Transformer

METHODS = ("mean", "first", "random")
TRAIN_CONFIG = "train_config.yaml"  # the resolved train config the train loop saves


class ConvertError(ValueError):
    """A conversion that cannot be done; the message names the fix."""


def pool_kv_heads(weight: torch.Tensor, n_src: int, n_dst: int, head_dim: int,
                  method: str = "mean", generator: torch.Generator | None = None,
                  init_std: float = 0.02) -> torch.Tensor:
    """One K or V projection (n_src*hd, d) -> (n_dst*hd, d), one head per contiguous
    group of n_src // n_dst source heads."""
    d = weight.shape[1]
    heads = weight.view(n_dst, n_src // n_dst, head_dim, d)  # (n_dst, group, hd, d)
    if method == "mean":
        pooled = heads.float().mean(dim=1).to(weight.dtype)  # fp32 sum: bf16 would round
    elif method == "first":
        pooled = heads[:, 0]
    elif method == "random":
        pooled = torch.empty(n_dst, head_dim, d, dtype=torch.float32)
        pooled.normal_(0.0, init_std, generator=generator)
        pooled = pooled.to(weight.dtype)
    else:
        raise ConvertError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return pooled.reshape(n_dst * head_dim, d).to(weight.device)


def check_target(n_src: int, n_kv_head: int, method: str) -> None:
    if method not in METHODS:
        raise ConvertError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if n_kv_head <= 0:
        raise ConvertError(f"n_kv_head must be a positive integer, got {n_kv_head}")
    if n_kv_head > n_src:
        raise ConvertError(f"n_kv_head={n_kv_head} exceeds the source's {n_src} KV heads: "
                           f"pooling only reduces heads; pick one of {divisors(n_src)}")
    if n_src % n_kv_head:
        raise ConvertError(f"n_kv_head={n_kv_head} does not divide the source's {n_src} KV "
                           f"heads: pick one of {divisors(n_src)}")


def convert_model(model: Transformer, n_kv_head: int, method: str = "mean",
                  seed: int = 0) -> Transformer:
    """A new model with n_kv_head KV heads; the source is left untouched."""
    src_cfg = model_config(model)
    check_target(src_cfg.n_kv_head, n_kv_head, method)
    try:
        cfg = src_cfg.with_kv_heads(n_kv_head)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    generator = torch.Generator().manual_seed(seed)
    state = model_state(model)
    for name, weight in state.items():
        if name.endswith(("attn.k_proj.weight", "attn.v_proj.weight",
                          "attn.k_proj.bias", "attn.v_proj.bias")):
            rows = weight.reshape(weight.shape[0], -1)  # a bias pools as a weight of width 1
            pooled = pool_kv_heads(rows, src_cfg.n_kv_head, n_kv_head, cfg.head_dim, method,
                                   generator, cfg.init_std)
            state[name] = pooled.reshape(-1, *weight.shape[1:])
        else:
            state[name] = weight.clone()
    ref = next(iter(state.values()))
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not shift the caller's RNG
        new = Transformer(cfg).to(device=ref.device, dtype=ref.dtype)
    load_state(new, state, "converted model")
    return new.train(model.training)


def model_config(model: torch.nn.Module):
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model.config


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_paths(src: Path, out: Path, overwrite: bool) -> None:
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r:
        raise ConvertError(f"out={out} is the source checkpoint itself: converting in place "
                           f"would destroy it; write to a new dir, e.g. out={src}-gqa")
    if src_r in out_r.parents:
        raise ConvertError(f"out={out} is inside the source checkpoint {src}: "
                           f"write the converted checkpoint elsewhere")
    if out_r in src_r.parents:
        raise ConvertError(f"out={out} contains the source checkpoint {src}: "
                           f"replacing it would delete the source; pick another out")
    if out.exists() and not overwrite:
        raise ConvertError(f"out={out} already exists: choose a new path or pass overwrite=true")


def convert_checkpoint(src: str | Path, out: str | Path, n_kv_head: int,
                       method: str = "mean", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a converted copy of checkpoint src at out, with the same tokenizer, the
    source's train config, and provenance in meta.json."""
    src, out = Path(src), Path(out)
    check_paths(src, out, overwrite)
    check_target(read_config(src).n_kv_head, n_kv_head, method)  # fail before loading
    ckpt = load_checkpoint(src)
    model = convert_model(ckpt.model, n_kv_head, method, seed)
    src_meta = read_meta(src)
    meta = {
        "converted_from": {
            "path": str(src.resolve()),
            "weights_sha256": sha256_file(src / WEIGHTS),
            "method": method,
            "source_n_kv_head": ckpt.config.n_kv_head,
            "seed": seed,
        },
        "source_step": src_meta.get("step", src_meta.get("source_step")),
    }
    if "max_steps" in src_meta:
        meta["max_steps"] = src_meta["max_steps"]
    files = {name: src / name for name in (TOKENIZER, TRAIN_CONFIG) if (src / name).is_file()}
    return save_checkpoint(out, model, meta, files, overwrite=overwrite)


USAGE = ("usage: python -m model.convert ckpt=<checkpoint dir> n_kv_head=<G> "
         "[method=mean|first|random] out=<new dir> [seed=0] [overwrite=false]")


def parse_args(argv: list[str]) -> dict:
    args = parse_key_values(argv, ("ckpt", "n_kv_head", "out"),
                            {"method": "mean", "seed": "0", "overwrite": "false"}, USAGE)
    return {**args, "n_kv_head": as_int(args, "n_kv_head"), "seed": as_int(args, "seed"),
            "overwrite": as_bool(args, "overwrite")}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        out = convert_checkpoint(args["ckpt"], args["out"], args["n_kv_head"], args["method"],
                                 args["seed"], args["overwrite"])
    except (ArgError, ConvertError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = read_config(out)
    print(f"wrote {out} ({args['method']} pooling of {args['ckpt']})")
    print(format_summary(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
