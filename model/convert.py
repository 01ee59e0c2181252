"""Convert a checkpoint to fewer KV heads: MHA -> GQA/MQA (Ainslie et al. 2023, §2.1).

The K and V projection heads (and biases) of each contiguous group are mean-pooled into
one head; every other tensor is shared with the source, not copied. Contiguous groups
match attention.py: query head h reads KV head h // group_size, so after pooling a query
head reads the mean of exactly the heads it used to read one of. `first` (keep each
group's first head) and `random` (fresh init) are the paper's Figure 4 baselines.

Before pooling, `group=similar` chooses which heads share a group and `align=procrustes`
rotates each head into its group's basis (model/align.py), both exact rewrites of the
source model fitted on `calib_windows` windows of `calib_seq_len` tokens (default: the
context up to 1024; `calib_tokens` sets a token budget instead) of its training data;
`align=linear` fits each group's shared head by least squares under the wider exact maps
(complex scalars per RoPE plane, any invertible V map) and folds each head's map into its
readers; the held-out K/V reconstruction error of every layer goes into meta.json (for a
plain conversion, when the data is at hand: if it is gone, a note on stderr and meta.json's
kv_error_not_measured say so), with the calibration's time and peak memory.

    python -m model.convert ckpt=runs/mha/checkpoints/final n_kv_head=2 method=mean out=ckpts/gqa2
    python -m model.convert ckpt=... n_kv_head=2 group=similar align=procrustes calib_windows=64 out=...
    python -m model.convert ckpt=<HF dir> n_kv_head=1 data=text_files data.files='[a/*.txt]' out=...
    python -m model.convert --help

ckpt= may be an HF Llama/GPT-2/GPT-NeoX dir: it converts as its import would. A source with
no train_config.yaml calibrates on data=/data.* (as for train.py) tokenized with its own
tokenizer. The command is a Hydra app (configs/convert.yaml, ConvertConfig below).
"""
from __future__ import annotations

import hashlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import cli
from data.config import DataConfig, DataError
from data.tokenizer import tokenizer_files
from model import runs
from model.align import (ALIGNMENTS, GROUPINGS, LINEAR, LayerPlan, attention_input_grams,
                         head_rows, kv_error, move_heads, plan_layer, rope_planes)
from model.runs import TRAIN_CONFIG
from model.checkpoint import (WEIGHTS, check_out, config_of, load_checkpoint,
                              model_from_state, model_state, read_config, read_meta,
                              save_checkpoint)
from model.config import ConfigError, ModelConfig, divisors
from model.hf import (hf_weight_files, import_hf, is_hf_model, read_hf_config,
                      tokenizer_writer)
from model.summary import format_summary
from model.transformer import Transformer

METHODS = ("mean", "first", "random")
KV_TENSORS = ("attn.k_proj.weight", "attn.v_proj.weight", "attn.k_proj.bias", "attn.v_proj.bias")
CALIB_SEQ_LEN = 1024  # default calibration window: a trained model's statistics settle well
                      # before its full context, which would cost minutes per window on a CPU


class ConvertError(cli.UserError):
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
    if align in LINEAR and method != "mean":
        raise ConvertError(f"align={align} fits each group's shared head itself: use "
                           f"method=mean with it (the default)")
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
                    calib: torch.Tensor | None, progress: bool = False) -> list[LayerPlan] | None:
    """Per layer, which source heads to pool together and how to rotate them; None for the
    paper's contiguous, unaligned pooling."""
    if not needs_calibration(group, align):
        return None
    if calib is None or not len(calib):
        raise ConvertError(f"group={group} align={align} fit on calibration data: pass "
                           f"calib_windows=N (e.g. 64) and a source with a data config")
    grams = attention_input_grams(model, calib, progress=progress)
    return plan_from_grams(model, grams, n_kv_head, group, align)


def plan_from_grams(model: Transformer, grams: list[torch.Tensor], n_kv_head: int, group: str,
                    align: str) -> list[LayerPlan]:
    """plan_conversion from the calibration statistic attention_input_grams computes (one
    calibration serves several conversions)."""
    cfg = config_of(model)
    state, rope = model_state(model), rope_planes(cfg)
    return [plan_layer(kv_rows(state, i, "k_proj", cfg.n_kv_head),
                       kv_rows(state, i, "v_proj", cfg.n_kv_head), grams[i], n_kv_head, rope,
                       group, align, readers(state, i, cfg) if align == "linear_readers" else None)
            for i in range(cfg.n_layer)]


def readers(state: dict, layer: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q rows (H, hd, d+1), O columns (H, hd, d) as rows of O^T) of a layer's query heads."""
    o = state[f"blocks.{layer}.attn.o_proj.weight"].float().T  # (H*hd, d)
    return kv_rows(state, layer, "q_proj", cfg.n_head), o.reshape(cfg.n_head, cfg.head_dim, -1)


def kv_rows(state: dict, layer: int, proj: str, n_heads: int) -> torch.Tensor:
    """(n_heads, hd, d+1): a K or V projection's head rows with the bias as last column."""
    name = f"blocks.{layer}.attn.{proj}"
    return head_rows(state[f"{name}.weight"], state.get(f"{name}.bias"), n_heads)


def aligned_attention(state: dict, layer: int, plan: LayerPlan, n_src: int) -> dict:
    """The layer's attention tensors with KV heads permuted and mapped per plan, their
    query heads and O columns following (by the plan's read maps): the same function, a new
    basis, when each read map is its K/V map's inverse transpose."""
    out = {}
    k_read, v_read = plan.reads()
    for proj, rot in (("q_proj", k_read), ("k_proj", plan.k_rot), ("v_proj", plan.v_rot)):
        for kind in ("weight", "bias"):  # biases are optional rows
            name = f"blocks.{layer}.attn.{proj}.{kind}"
            if name in state:
                out[name] = move_heads(state[name], n_src, plan.order, rot)
    o = f"blocks.{layer}.attn.o_proj.weight"  # (d, H*hd): its columns are the heads' rows
    out[o] = move_heads(state[o].T, n_src, plan.order, v_read).T.contiguous()
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
              plans: list[LayerPlan] | None, windows: torch.Tensor,
              progress: bool = False) -> list[dict]:
    """Per layer, the K and V reconstruction error of a conversion (its state) on windows
    (held out): sum over source heads of |aligned source head - its pooled head|^2 over the
    source's own attention inputs, relative to the source heads' energy; a source head is
    compared with what its query heads now read in its place (model/align.py's kv_error)."""
    grams = attention_input_grams(model, windows, progress=progress)
    return kv_errors_from_grams(model, converted, plans, grams)


def kv_errors_from_grams(model: Transformer, converted: dict[str, torch.Tensor],
                         plans: list[LayerPlan] | None, grams: list[torch.Tensor]) -> list[dict]:
    src, dst, cfg = model_state(model), converted, config_of(model)
    S, G = cfg.n_kv_head, dst["blocks.0.attn.k_proj.weight"].shape[0] // cfg.head_dim
    rows = []
    for i, gram in enumerate(grams):
        plan = plans[i] if plans else LayerPlan(torch.arange(S))
        err = {"layer": i}
        for proj, read in zip(("k_proj", "v_proj"), plan.reads()):
            heads = kv_rows(src, i, proj, S)[plan.order]  # (S, hd, d+1) in plan order
            err[proj[0]] = round(kv_error(heads, kv_rows(dst, i, proj, G), gram, read), 6)
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
                       data: dict | None = None, calib_seq_len: int = 0,
                       calib_tokens: int = 0) -> Path:
    """Write a converted copy of checkpoint src at out, with the same tokenizer, the
    source's train config, and provenance in meta.json. With a data config (the source's
    train_config.yaml's data section, updated by data: DataConfig settings) and
    calib_windows > 0: fit group/align on calib_windows train windows of calib_seq_len
    tokens (calib_shape) and record the K/V reconstruction error on as many val windows,
    with the time and peak memory this took (meta.json's calibration, and stderr)."""
    src, out = Path(src), Path(out)
    check_out(src, out, overwrite, "gqa")
    hf = is_hf_model(src)  # an HF dir converts as its import would
    src_cfg = read_hf_config(src) if hf else read_config(src)
    check_target(src_cfg.n_kv_head, n_kv_head, method, group, align)  # fail before loading
    data = data_config(src, data or {})
    n_windows, seq_len = calib_shape(src_cfg.max_seq_len, calib_windows, calib_seq_len,
                                     calib_tokens)
    if needs_calibration(group, align) and (data is None or n_windows <= 0):
        raise ConvertError(f"group={group} align={align} fit on calibration data: pass "
                           f"calib_windows=N > 0, and data.* settings when {src} has no "
                           f"{TRAIN_CONFIG} with a data section")
    write_tokenizer = tokenizer_writer(src) if hf else None  # a bad one fails before the weights
    source = import_hf(src) if hf else load_checkpoint(src).model
    windows = lambda split: token_windows(data, split, seq_len, n_windows, src_cfg.vocab_size)
    measured = data is not None and n_windows > 0
    started = time.perf_counter()
    calib = windows("train") if measured and needs_calibration(group, align) else None
    plans = plan_conversion(source, n_kv_head, group, align, calib, progress=True)
    model = pooled_model(source, n_kv_head, method, seed, plans)
    src_meta = read_meta(src)
    meta = {
        "converted_from": {
            "path": str(src.resolve()),
            "weights_sha256": sha256_files(hf_weight_files(src) if hf else [src / WEIGHTS]),
            "method": method,
            "group": group,
            "align": align,
            "calib_windows": 0 if calib is None else n_windows,
            "calib_seq_len": 0 if calib is None else seq_len,
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
        if calib is not None or "kv_error" in meta:  # data was read: what did it cost
            meta["calibration"] = calibration_cost(
                started, 0 if calib is None else calib.numel(),
                n_windows * seq_len if "kv_error" in meta else 0)
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
    return {"kv_error": {"split": "val", "windows": len(windows), "seq_len": windows.shape[1],
                         "layers": kv_errors(src_model, model_state(model), plans, windows,
                                             progress=True)}}


def calib_shape(max_seq_len: int, calib_windows: int, calib_seq_len: int = 0,
                calib_tokens: int = 0) -> tuple[int, int]:
    """(windows, tokens per window) that calibration reads: windows of calib_seq_len tokens
    (0: the context up to CALIB_SEQ_LEN), as many as fill calib_tokens when it is given,
    else calib_windows."""
    if calib_seq_len < 0 or calib_tokens < 0 or calib_windows < 0:
        raise ConvertError(f"calib_windows, calib_seq_len and calib_tokens must be >= 0, got "
                           f"{calib_windows}, {calib_seq_len}, {calib_tokens}")
    if calib_seq_len > max_seq_len:
        raise ConvertError(f"calib_seq_len={calib_seq_len} exceeds the model's context "
                           f"{max_seq_len}: pass calib_seq_len={max_seq_len} or less")
    length = calib_seq_len or min(max_seq_len, CALIB_SEQ_LEN)
    return (math.ceil(calib_tokens / length) if calib_tokens else calib_windows), length


def calibration_cost(started: float, fit_tokens: int, error_tokens: int) -> dict:
    """meta.json's calibration: seconds since started (data preparation, forward passes,
    fits), tokens read, and the process's peak resident memory (on Linux and macOS; model
    load included), also noted on stderr."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_mb = peak / (1 << 20 if sys.platform == "darwin" else 1 << 10)
    cost = {"seconds": round(time.perf_counter() - started, 2), "fit_tokens": fit_tokens,
            "kv_error_tokens": error_tokens, "peak_rss_mb": round(peak_mb, 1)}
    print(f"calibration: {cost['seconds']:.1f} s, {fit_tokens:,} tokens fitted, "
          f"{error_tokens:,} measured, peak memory {cost['peak_rss_mb']:,.0f} MB (process RSS)",
          file=sys.stderr)
    return cost


def data_config(src: Path, given: dict) -> dict | None:
    """The data settings src was trained on (its train_config.yaml), updated by given
    (DataConfig keys); None when there are neither. Tokens are the source's own: a corpus
    of the user's choosing is tokenized with the tokenizer src ships."""
    recipe = runs.read_data_config(src)
    if recipe is None and not given:
        return None
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), recipe or {}, given)
    except OmegaConfBaseException as e:
        raise ConvertError(f"bad data setting: {str(e).splitlines()[0]} (keys as in "
                           f"data/config.py's DataConfig)") from None
    if tokenizer_files(src):  # calibrate on the source's own token ids, as init_from trains on them
        runs.check_tokenizer(given.get("tokenizer"), src, ConvertError)
        if cfg.tokenizer is None and (recipe is None or "source" in given):
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


@dataclass
class ConvertConfig:
    """python -m model.convert's options (configs/convert.yaml; --help describes them)."""
    ckpt: str = MISSING  # a gqalab checkpoint dir or an HF Llama/GPT-2/GPT-NeoX dir
    n_kv_head: int = MISSING  # KV heads of the result: a divisor of the source's
    out: str = MISSING  # the new checkpoint dir
    method: str = "mean"  # mean | first | random (METHODS)
    group: str = "contiguous"  # contiguous | similar (model/align.py's GROUPINGS)
    align: str = "none"  # none | procrustes | linear | linear_readers (model/align.py's ALIGNMENTS)
    calib_windows: int = 64  # train windows to fit on, val windows to measure; 0: none
    calib_seq_len: int = 0  # tokens per calibration window; 0: the context up to 1024
    calib_tokens: int = 0  # a calibration token budget (windows it fills) instead of calib_windows
    seed: int = 0  # for method=random
    overwrite: bool = False  # replace an existing out
    # the calibration corpus; only the settings the user gives count (given_data)
    data: DataConfig = field(default_factory=DataConfig)


ConfigStore.instance().store(name="convert_schema", node=ConvertConfig)


def given_data(cfg: DictConfig) -> dict:
    """The data settings given on the command line: all of cfg.data after data=<group>, else
    the data.<key> ones; the rest comes from the source's train config (data_config)."""
    keys = cli.user_keys()
    data = OmegaConf.to_container(cfg.data)
    if "data" in keys:
        return data
    return {k.removeprefix("data."): data[k.removeprefix("data.")] for k in keys
            if k.startswith("data.")}


@cli.hydra_main(config_path="../configs", config_name="convert")
def command(cfg: DictConfig) -> None:
    cli.require(cfg)
    args: ConvertConfig = OmegaConf.to_object(cfg)
    out = convert_checkpoint(args.ckpt, args.out, args.n_kv_head, args.method, args.seed,
                             args.overwrite, args.group, args.align, args.calib_windows,
                             given_data(cfg), args.calib_seq_len, args.calib_tokens)
    print(f"wrote {out} ({args.method} pooling, group={args.group}, align={args.align}, "
          f"of {args.ckpt})")
    print(format_summary(read_config(out)))
    errors = read_meta(out).get("kv_error")
    if errors:
        print(f"K/V reconstruction error on {errors['windows']} held-out windows "
              f"(|aligned source heads - pooled|^2 / |source heads|^2):")
        for e in errors["layers"]:
            print(f"  layer {e['layer']}: K {e['k']:.4f}  V {e['v']:.4f}")


def main(argv: list[str] | None = None) -> int:
    """`python -m model.convert key=value ...` (argv: those arguments); the exit status."""
    return cli.run_app(command, argv)


if __name__ == "__main__":
    sys.exit(main())


# ---- sources for experiments: the same function with more KV heads, or reordered ----------

def expand_kv_heads(model: Transformer, repeats: int) -> Transformer:
    """The same function with each KV head repeated `repeats` times (repeats = the group
    size gives MHA): query head h then reads its own copy of the head it read. Pooling the
    copies back by mean recovers the source exactly."""
    cfg = config_of(model)
    if repeats <= 0 or cfg.n_head % (cfg.n_kv_head * repeats):
        raise ConvertError(f"repeats={repeats}: {cfg.n_kv_head} KV heads x repeats must divide "
                           f"the {cfg.n_head} query heads")
    state = model_state(model)
    for name, t in state.items():
        if name.endswith(KV_TENSORS):  # (n_kv*hd, ...) -> (n_kv*repeats*hd, ...)
            heads = t.view(cfg.n_kv_head, cfg.head_dim, *t.shape[1:])
            state[name] = heads.repeat_interleave(repeats, dim=0).reshape(-1, *t.shape[1:])
    return model_from_state(cfg.with_kv_heads(cfg.n_kv_head * repeats), state,
                            "the expanded model").train(model.training)


def permute_kv_heads(model: Transformer, orders: list[torch.Tensor]) -> Transformer:
    """The same function with layer i's KV head j taken from source head orders[i][j], the
    query heads that read it (Q rows) and their O columns moved along."""
    cfg = config_of(model)
    state = model_state(model)
    for layer, order in enumerate(orders):
        if sorted(order.tolist()) != list(range(cfg.n_kv_head)):
            raise ConvertError(f"orders[{layer}] = {order.tolist()} is not a permutation of "
                               f"the {cfg.n_kv_head} KV heads")
        state.update(aligned_attention(state, layer, LayerPlan(order), cfg.n_kv_head))
    return model_from_state(cfg, state, "the permuted model").train(model.training)
