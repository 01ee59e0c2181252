"""Convert a checkpoint to fewer KV heads: MHA -> GQA/MQA (Ainslie et al. 2023, §2.1).

The K and V projection heads (and biases) of each contiguous group are mean-pooled into
one head; every other tensor is shared with the source, not copied. Contiguous groups
match attention.py: query head h reads KV head h // group_size, so after pooling a query
head reads the mean of exactly the heads it used to read one of. `first` (keep each
group's first head) and `random` (fresh init) are the paper's Figure 4 baselines.

Before pooling, `group=similar` chooses which heads share a group and `align=procrustes`
rotates each head into its group's basis (model/align.py), both exact rewrites of the
source model fitted on `calib_windows` windows of its training data; the held-out K/V
reconstruction error of every layer goes into meta.json (for a plain conversion, when the
data is at hand: if it is gone, a note on stderr and meta.json's kv_error_not_measured say so).

    python -m model.convert ckpt=runs/mha/checkpoints/final n_kv_head=2 method=mean out=ckpts/gqa2
    python -m model.convert ckpt=... n_kv_head=2 group=similar align=procrustes calib_windows=64 out=...

ckpt= may be an HF Llama/GPT-2/GPT-NeoX dir: it converts as its import would. A source with
no train_config.yaml calibrates on data.* tokenized with its own tokenizer.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from data.config import DataError
from data.tokenizer import tokenizer_files
from model import runs
from model.runs import TRAIN_CONFIG
from model.align import (ALIGNMENTS, GROUPINGS, LayerPlan, attention_input_grams, head_rows,
                         kv_error, move_heads, plan_layer, rope_planes)
from model.checkpoint import (WEIGHTS, CheckpointError, check_out, config_of, load_checkpoint,
                              model_from_state, model_state, read_config, read_meta,
                              save_checkpoint)
from model.cli_args import ArgError, as_bool, as_int, parse_key_values
from model.config import ConfigError, ModelConfig, divisors
from model.hf import (hf_weight_files, import_hf, is_hf_model, read_hf_config,
                      tokenizer_writer)
from model.summary import format_summary
from model.transformer import Transformer

METHODS = ("mean", "first", "random")
KV_TENSORS = ("attn.k_proj.weight", "attn.v_proj.weight", "attn.k_proj.bias", "attn.v_proj.bias")


class ConvertError(ValueError):
    """A conversion that cannot be done; the message names the fix."""


def pool_kv_heads(weight: torch.Tensor, n_src: int, n_dst: int, head_dim: int,
                  method: str = "mean", generator: torch.Generator | None = None,
                  init_std: float = 0.02) -> torch.Tensor:
    """One K or V projection (n_src*hd, d) -> (n_dst*hd, d), or its bias (n_src*hd,) ->
    (n_dst*hd,), one head per contiguous group of n_src // n_dst source heads."""
    rest = weight.shape[1:]
    heads = weight.view(n_dst, n_src // n_dst, head_dim, *rest)  # (n_dst, group, hd, ...)
    if method == "mean":
        pooled = heads.float().mean(dim=1).to(weight.dtype)  # fp32 sum: bf16 would round
    elif method == "first":
        pooled = heads[:, 0]
    elif method == "random":
        pooled = torch.zeros(n_dst, head_dim, *rest, dtype=torch.float32)
        if rest:  # a fresh weight; a fresh bias starts at zero
            pooled.normal_(0.0, init_std, generator=generator)
        pooled = pooled.to(weight.dtype)
    else:
        raise ConvertError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return pooled.reshape(n_dst * head_dim, *rest).to(weight.device)


def check_target(n_src: int, n_kv_head: int, method: str, group: str = "contiguous",
                 align: str = "none") -> None:
    if method not in METHODS:
        raise ConvertError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if group not in GROUPINGS:
        raise ConvertError(f"unknown group {group!r}: use one of {', '.join(GROUPINGS)}")
    if align not in ALIGNMENTS:
        raise ConvertError(f"unknown align {align!r}: use one of {', '.join(ALIGNMENTS)}")
    if method == "random" and (group, align) != ("contiguous", "none"):
        raise ConvertError("method=random keeps nothing of the source heads: use group="
                           "contiguous align=none with it, or method=mean|first")
    if n_kv_head <= 0:
        raise ConvertError(f"n_kv_head must be a positive integer, got {n_kv_head}")
    if n_kv_head > n_src:
        raise ConvertError(f"n_kv_head={n_kv_head} exceeds the source's {n_src} KV heads: "
                           f"pooling only reduces heads; pick one of {divisors(n_src)}")
    if n_src % n_kv_head:
        raise ConvertError(f"n_kv_head={n_kv_head} does not divide the source's {n_src} KV "
                           f"heads: pick one of {divisors(n_src)}")


def needs_calibration(group: str, align: str) -> bool:
    return (group, align) != ("contiguous", "none")


def convert_model(model: Transformer, n_kv_head: int, method: str = "mean", seed: int = 0,
                  group: str = "contiguous", align: str = "none",
                  calib: torch.Tensor | None = None) -> Transformer:
    """A new model with n_kv_head KV heads, sharing every tensor it does not change with the
    source, which is left untouched. calib (N, T) token windows: needed by group=similar
    and align=procrustes."""
    check_target(config_of(model).n_kv_head, n_kv_head, method, group, align)
    return pooled_model(model, n_kv_head, method, seed,
                        plan_conversion(model, n_kv_head, group, align, calib))


def plan_conversion(model: Transformer, n_kv_head: int, group: str, align: str,
                    calib: torch.Tensor | None) -> list[LayerPlan] | None:
    """Per layer, which source heads to pool together and how to rotate them; None for the
    paper's contiguous, unaligned pooling."""
    if not needs_calibration(group, align):
        return None
    if calib is None or not len(calib):
        raise ConvertError(f"group={group} align={align} fit on calibration data: pass "
                           f"calib_windows=N (e.g. 64) and a source with a data config")
    cfg = config_of(model)
    grams = attention_input_grams(model, calib)
    state, rope = model_state(model), rope_planes(cfg)
    return [plan_layer(kv_rows(state, i, "k_proj", cfg.n_kv_head),
                       kv_rows(state, i, "v_proj", cfg.n_kv_head), grams[i], n_kv_head, rope,
                       group, align) for i in range(cfg.n_layer)]


def kv_rows(state: dict, layer: int, proj: str, n_heads: int) -> torch.Tensor:
    """(n_heads, hd, d+1): a K or V projection's head rows with the bias as last column."""
    name = f"blocks.{layer}.attn.{proj}"
    return head_rows(state[f"{name}.weight"], state.get(f"{name}.bias"), n_heads)


def aligned_attention(state: dict, layer: int, plan: LayerPlan, n_src: int) -> dict:
    """The layer's attention tensors with KV heads permuted and rotated per plan, their
    query heads and O columns following: the same function, a new basis."""
    out = {}
    for proj, rot in (("q_proj", plan.k_rot), ("k_proj", plan.k_rot), ("v_proj", plan.v_rot)):
        for kind in ("weight", "bias"):  # biases are optional rows
            name = f"blocks.{layer}.attn.{proj}.{kind}"
            if name in state:
                out[name] = move_heads(state[name], n_src, plan.order, rot)
    o = f"blocks.{layer}.attn.o_proj.weight"  # (d, H*hd): its columns are the heads' rows
    out[o] = move_heads(state[o].T, n_src, plan.order, plan.v_rot).T.contiguous()
    return out


def pooled_model(model: Transformer, n_kv_head: int, method: str, seed: int,
                 plans: list[LayerPlan] | None) -> Transformer:
    cfg, state = pooled_state(model, n_kv_head, method, seed, plans)
    # holds state's tensors themselves (built on meta): untouched ones stay shared with the source
    return model_from_state(cfg, state, "the converted model").train(model.training)


def pooled_state(model: Transformer, n_kv_head: int, method: str, seed: int,
                 plans: list[LayerPlan] | None) -> tuple[ModelConfig, dict]:
    """(the target config, its state): the source's tensors, the attention ones rewritten
    per plans, then K/V pooled."""
    src_cfg = config_of(model)
    try:
        cfg = src_cfg.with_kv_heads(n_kv_head)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    state = model_state(model)  # detached views of the source's tensors: nothing copied
    for layer, plan in enumerate(plans or []):
        state.update(aligned_attention(state, layer, plan, src_cfg.n_kv_head))
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in state.items():
        if name.endswith(KV_TENSORS):
            state[name] = pool_kv_heads(tensor, src_cfg.n_kv_head, n_kv_head, cfg.head_dim,
                                        method, generator, cfg.init_std)
    return cfg, state


def kv_errors(model: Transformer, converted: dict[str, torch.Tensor],
              plans: list[LayerPlan] | None, windows: torch.Tensor) -> list[dict]:
    """Per layer, the K and V reconstruction error of a conversion (its state) on windows
    (held out): sum over source heads of |aligned source head - its pooled head|^2 over the
    source's own attention inputs, relative to the source heads' energy."""
    src, dst, cfg = model_state(model), converted, config_of(model)
    S, G = cfg.n_kv_head, dst["blocks.0.attn.k_proj.weight"].shape[0] // cfg.head_dim
    rows = []
    for i, gram in enumerate(attention_input_grams(model, windows)):
        plan = plans[i] if plans else LayerPlan(torch.arange(S))
        err = {"layer": i}
        for proj, rot in (("k_proj", plan.k_rot), ("v_proj", plan.v_rot)):
            heads = kv_rows(src, i, proj, S)
            aligned = move_heads(heads.flatten(0, 1), S, plan.order, rot).view_as(heads)
            err[proj[0]] = round(kv_error(aligned, kv_rows(dst, i, proj, G), gram), 6)
        rows.append(err)
    return rows


def sha256_files(paths: list[Path]) -> str:
    """One digest of the files' bytes in order (an HF dir's shards; one file: its sha256)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def convert_checkpoint(src: str | Path, out: str | Path, n_kv_head: int,
                       method: str = "mean", seed: int = 0, overwrite: bool = False,
                       group: str = "contiguous", align: str = "none", calib_windows: int = 64,
                       data_overrides: list[str] = ()) -> Path:
    """Write a converted copy of checkpoint src at out, with the same tokenizer, the
    source's train config, and provenance in meta.json. With a data config (the source's
    train_config.yaml, data_overrides as data.key=value) and calib_windows > 0: fit
    group/align on calib_windows train windows and record the K/V reconstruction error
    on as many val windows."""
    src, out = Path(src), Path(out)
    check_out(src, out, overwrite, "gqa")
    hf = is_hf_model(src)  # an HF dir converts as its import would
    src_cfg = read_hf_config(src) if hf else read_config(src)
    check_target(src_cfg.n_kv_head, n_kv_head, method, group, align)  # fail before loading
    data = data_config(src, list(data_overrides))
    if needs_calibration(group, align) and (data is None or calib_windows <= 0):
        raise ConvertError(f"group={group} align={align} fit on calibration data: pass "
                           f"calib_windows=N > 0, and data.* settings when {src} has no "
                           f"{TRAIN_CONFIG} with a data section")
    write_tokenizer = tokenizer_writer(src) if hf else None  # a bad one fails before the weights
    source = import_hf(src) if hf else load_checkpoint(src).model
    windows = lambda split: token_windows(data, split, src_cfg.max_seq_len, calib_windows,
                                          src_cfg.vocab_size)
    measured = data is not None and calib_windows > 0
    calib = windows("train") if measured and needs_calibration(group, align) else None
    plans = plan_conversion(source, n_kv_head, group, align, calib)
    model = pooled_model(source, n_kv_head, method, seed, plans)
    src_meta = read_meta(src)
    meta = {
        "converted_from": {
            "path": str(src.resolve()),
            "weights_sha256": sha256_files(hf_weight_files(src) if hf else [src / WEIGHTS]),
            "method": method,
            "group": group,
            "align": align,
            "calib_windows": 0 if calib is None else calib_windows,
            "source_n_kv_head": src_cfg.n_kv_head,
            "seed": seed,
        },
        "source_step": src_meta.get("step", src_meta.get("source_step")),
    }
    if "max_steps" in src_meta:
        meta["max_steps"] = src_meta["max_steps"]
    if measured:
        meta.update(kv_error_meta(source, model, plans, lambda: windows("val"),
                                  required=needs_calibration(group, align)))
    files = {} if hf else tokenizer_files(src)  # the tokenizer travels whole: model file, configs
    if (src / TRAIN_CONFIG).is_file():
        files[TRAIN_CONFIG] = src / TRAIN_CONFIG
    return save_checkpoint(out, model, meta, files, overwrite=overwrite,
                           extra=write_tokenizer)


def kv_error_meta(src_model: Transformer, model: Transformer, plans: list[LayerPlan] | None,
                  val_windows, required: bool) -> dict:
    """meta.json's K/V error on val_windows() (N, T). Only a fit needs the data: a plain
    conversion measures when it can, and data that is gone (a checkpoint copied elsewhere)
    or unusable is recorded and noted on stderr instead of failing the conversion."""
    try:
        windows = val_windows()
    except (DataError, ConvertError) as e:
        if required:
            raise
        print(f"note: K/V error not measured: {e}; pass data.* or calib_windows=0",
              file=sys.stderr)
        return {"kv_error_not_measured": str(e)}
    return {"kv_error": {"split": "val", "windows": len(windows),
                         "layers": kv_errors(src_model, model_state(model), plans, windows)}}


def data_config(src: Path, overrides: list[str]) -> dict | None:
    """The data settings src was trained on (its train_config.yaml), with overrides
    ("key=value" under data.); None when there are neither."""
    from data.config import DataConfig  # the data stack is only needed with calibration
    recipe = runs.read_data_config(src)
    if recipe is None and not overrides:
        return None
    try:
        given = OmegaConf.from_dotlist(overrides)
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), recipe or {}, given)
    except OmegaConfBaseException as e:
        raise ConvertError(f"bad data setting: {str(e).splitlines()[0]} (keys as in "
                           f"data/config.py's DataConfig)") from None
    if tokenizer_files(src):  # calibrate on the source's own token ids, as init_from trains on them
        runs.check_tokenizer(given.get("tokenizer"), src, ConvertError)
        if cfg.tokenizer is None and recipe is None:  # an import: no recipe, its tokenizer
            cfg.tokenizer = str(src.resolve())
    return OmegaConf.to_container(cfg)


def token_windows(data_cfg, split: str, length: int, n_windows: int,
                  vocab_size: int | None = None) -> torch.Tensor:
    """n_windows evenly spaced windows of `length` tokens of the prepared train or val split,
    (N, length) int64: the same windows on every call."""
    from data.prepare import prepare_data  # the data stack is only needed with calibration
    import numpy as np

    if n_windows <= 0:
        raise ConvertError(f"calib_windows must be a positive integer, got {n_windows}")

    prepared = prepare_data(data_cfg, progress=False)
    if vocab_size is not None and prepared.vocab_size != vocab_size:
        raise ConvertError(f"the data's tokenizer has {prepared.vocab_size} tokens, the model "
                           f"{vocab_size}: use the source's data settings")
    tokens = np.memmap(prepared.train_bin if split == "train" else prepared.val_bin,
                       dtype=prepared.dtype, mode="r")
    if len(tokens) < length:
        raise ConvertError(f"the {split} split has {len(tokens)} tokens, fewer than one window "
                           f"of {length}: use more data or a larger val_fraction")
    starts = np.linspace(0, len(tokens) - length, n_windows).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))


USAGE = ("usage: python -m model.convert ckpt=<checkpoint dir> n_kv_head=<G> out=<new dir> "
         "[method=mean|first|random] [group=contiguous|similar] [align=none|procrustes] "
         "[calib_windows=64] [data.<key>=<value>] [seed=0] [overwrite=false]")


def parse_args(argv: list[str]) -> dict:
    data = [a[len("data."):] for a in argv if a.startswith("data.")]
    args = parse_key_values([a for a in argv if not a.startswith("data.")],
                            ("ckpt", "n_kv_head", "out"),
                            {"method": "mean", "group": "contiguous", "align": "none",
                             "calib_windows": "64", "seed": "0", "overwrite": "false"}, USAGE)
    return {**args, "n_kv_head": as_int(args, "n_kv_head"), "seed": as_int(args, "seed"),
            "calib_windows": as_int(args, "calib_windows"),
            "overwrite": as_bool(args, "overwrite"), "data_overrides": data}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        out = convert_checkpoint(args["ckpt"], args["out"], args["n_kv_head"], args["method"],
                                 args["seed"], args["overwrite"], args["group"], args["align"],
                                 args["calib_windows"], args["data_overrides"])
    except (ArgError, ConvertError, CheckpointError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = read_config(out)
    print(f"wrote {out} ({args['method']} pooling, group={args['group']}, "
          f"align={args['align']}, of {args['ckpt']})")
    print(format_summary(cfg))
    errors = read_meta(out).get("kv_error")
    if errors:
        print(f"K/V reconstruction error on {errors['windows']} held-out windows "
              f"(|aligned source heads - pooled|^2 / |source heads|^2):")
        for e in errors["layers"]:
            print(f"  layer {e['layer']}: K {e['k']:.4f}  V {e['v']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
