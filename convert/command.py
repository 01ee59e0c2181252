"""Convert a checkpoint to fewer KV heads: MHA -> GQA/MQA (Ainslie et al. 2023, §2.1).

The K and V projection heads (and biases) of each contiguous group are mean-pooled into
one head; every other tensor is shared with the source, not copied. Contiguous groups
match attention.py: query head h reads KV head h // group_size, so after pooling a query
head reads the mean of exactly the heads it used to read one of. `first` (keep each
group's first head) and `random` (fresh init) are the paper's Figure 4 baselines.

Before pooling, `group=similar` chooses which heads share a group and `align=procrustes`
rotates each head into its group's basis (convert/align.py), both exact rewrites of the
source model fitted on `calib_windows` windows of `calib_seq_len` tokens (default: the
context up to 1024; `calib_tokens` sets a token budget instead) of its training data;
`align=linear` fits each group's shared head by least squares under the wider exact maps
(complex scalars per RoPE plane, any invertible V map) and folds each head's map into its
readers; the held-out K/V reconstruction error of every layer goes into meta.json (for a
plain conversion, when the data is at hand: if it is gone, a note on stderr and meta.json's
kv_error_not_measured say so), with the calibration's time and peak memory.

    python -m convert ckpt=runs/mha/checkpoints/final n_kv_head=2 method=mean out=ckpts/gqa2
    python -m convert ckpt=... n_kv_head=2 group=similar align=procrustes calib_windows=64 out=...
    python -m convert ckpt=<HF dir> n_kv_head=1 data=text_files data.files='[a/*.txt]' out=...
    python -m convert --help

ckpt= may be an HF Llama/GPT-2/GPT-NeoX dir (or a Hub id, org/name[@revision]: its meta.json's
converted_from.hub records the commit): it converts as its import would. A source with
no train_config.yaml calibrates on data=/data.* (as for train.py) tokenized with its own
tokenizer. The command is a Hydra app (configs/convert.yaml, ConvertConfig below).
"""
from __future__ import annotations

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
from convert.align import Alignment, Grouping, LayerPlan, attention_input_grams
from convert.heads import (Calibration, ConvertError, Conversion, Method, check_target,
                           kv_errors, plan_conversion, pooled_model)
from convert.latent import LatentConversion, LatentFit, RopeChoice, latent_model, search_split
from model.summary import format_summary
from model.transformer import Transformer
from store import runs
from store.checkpoint import check_out, model_state, read_config, read_meta, save_checkpoint
from store.hf import tokenizer_writer
from store.runs import TRAIN_CONFIG
from store.source import FLOAT, Kind, open_source

SPLIT_WINDOWS = 4  # calibration windows search_split scores each rope_dim on


def convert_checkpoint(src: str | Path, out: str | Path, conversion: Conversion,
                       calibration: Calibration = Calibration(), data: dict | None = None,
                       overwrite: bool = False) -> Path:
    """Write a converted copy of checkpoint src at out, with the same tokenizer, the
    source's train config, and provenance in meta.json. With a data config (the source's
    train_config.yaml's data section, updated by data: DataConfig settings) and
    calibration windows: fit group/align on calibration's train windows and record the
    K/V reconstruction error on as many val windows, with the time and peak memory this
    took (meta.json's calibration, and stderr)."""
    check_out(Path(src), Path(out), overwrite, "gqa")
    opened = open_source(src, "ckpt", FLOAT)  # an HF dir converts as its import would
    src, out, src_cfg, hf = opened.path, Path(out), opened.config, opened.kind is Kind.HF
    fit = conversion.needs_calibration
    check_target(src_cfg.n_kv_head, conversion)  # fail before loading
    data = data_config(src, data or {})
    n_windows, seq_len = calibration.shape(src_cfg.max_seq_len)
    if fit and (data is None or n_windows <= 0):
        raise ConvertError(f"group={conversion.group} align={conversion.align} fit on "
                           f"calibration data: pass calib_windows=N > 0, and data.* settings "
                           f"when {src} has no {TRAIN_CONFIG} with a data section")
    write_tokenizer = tokenizer_writer(src) if hf else None  # a bad one fails before the weights
    source = opened.load()
    windows = lambda split: token_windows(data, split, seq_len, n_windows, src_cfg.vocab_size)
    measured = data is not None and n_windows > 0
    started = time.perf_counter()
    calib = windows("train") if measured and fit else None
    plans = plan_conversion(source, conversion, calib, progress=True)
    model = pooled_model(source, conversion, plans)
    meta = {
        "converted_from": {
            "path": str(src),
            **({"hub": opened.hub.spec} if opened.hub else {}),  # the repo@commit it came from
            "weights_sha256": opened.weights_sha256(),
            "method": str(conversion.method),
            "group": str(conversion.group),
            "align": str(conversion.align),
            "calib_windows": 0 if calib is None else n_windows,
            "calib_seq_len": 0 if calib is None else seq_len,
            "source_n_kv_head": src_cfg.n_kv_head,
            "seed": conversion.seed,
        },
    }
    if measured:
        meta.update(kv_error_meta(source, model, plans, lambda: windows("val"),
                                  required=fit))
        if calib is not None or "kv_error" in meta:  # data was read: what did it cost
            meta["calibration"] = calibration_cost(
                started, 0 if calib is None else calib.numel(),
                n_windows * seq_len if "kv_error" in meta else 0)
    return save_converted(opened, out, model, meta, write_tokenizer, overwrite)


def save_converted(opened, out: Path, model: Transformer, meta: dict, write_tokenizer,
                   overwrite: bool) -> Path:
    """Write model at out with meta (plus the source's step), the source's tokenizer and its
    train config."""
    src, src_meta = opened.path, opened.meta
    meta["source_step"] = src_meta.get("step", src_meta.get("source_step"))
    if "max_steps" in src_meta:
        meta["max_steps"] = src_meta["max_steps"]
    files = {} if opened.kind is Kind.HF else tokenizer_files(src)  # the tokenizer travels whole
    if (src / TRAIN_CONFIG).is_file():
        files[TRAIN_CONFIG] = src / TRAIN_CONFIG
    return save_checkpoint(out, model, meta, files, overwrite=overwrite,
                           extra=write_tokenizer)


def convert_to_latent(src: str | Path, out: str | Path, conversion: LatentConversion,
                      calibration: Calibration = Calibration(), data: dict | None = None,
                      overwrite: bool = False) -> Path:
    """Write an MLA copy of checkpoint src at out (convert/latent.py), fitted on
    calibration's train windows of the data (as align= is) when there is data, else on the
    weights alone (C = I, noted on stderr); meta.json records the shape, each layer's
    left-out shares (latent_error, rope_residual) and the time and peak memory."""
    check_out(Path(src), Path(out), overwrite, "mla")
    opened = open_source(src, "ckpt", FLOAT)
    src, out, src_cfg, hf = opened.path, Path(out), opened.config, opened.kind is Kind.HF
    kv_rank, rope_dim = conversion.shape(src_cfg)  # refused before loading or calibrating
    data = data_config(src, data or {})
    n_windows, seq_len = calibration.shape(src_cfg.max_seq_len)
    write_tokenizer = tokenizer_writer(src) if hf else None
    source = opened.load()
    started = time.perf_counter()
    calib = None
    if data is not None and n_windows > 0:
        calib = token_windows(data, "train", seq_len, n_windows, src_cfg.vocab_size)
    else:
        print("note: no calibration data (calib_windows=0 or no data settings): factoring the "
              "weights unweighted (C = I)", file=sys.stderr)
    grams = None if calib is None else attention_input_grams(source, calib, progress=True)
    scored = None if calib is None else calib[::max(1, len(calib) // SPLIT_WINDOWS)]
    conversion, split = search_split(source, conversion, grams, scored)
    kv_rank, rope_dim = conversion.shape(src_cfg)
    model, layers = latent_model(source, conversion, grams)
    meta = {"converted_from": {
        "path": str(src), "weights_sha256": opened.weights_sha256(), "target": "mla",
        "kv_rank": kv_rank, "rope_dim": rope_dim, "rope": str(conversion.rope),
        "fit": str(conversion.fit), "balance": conversion.balance,
        "budget": conversion.budget, "split_search": split,
        "source_attention": src_cfg.attention_type,
        "calib_windows": 0 if calib is None else n_windows,
        "calib_seq_len": 0 if calib is None else seq_len},
        "latent_fit": layers,
        "calibration": calibration_cost(started, 0 if calib is None else calib.numel(), 0)}
    return save_converted(opened, out, model, meta, write_tokenizer, overwrite)


def kv_error_meta(src_model: Transformer, model: Transformer, plans: list[LayerPlan] | None,
                  val_windows, required: bool) -> dict:
    """meta.json's K/V error on val_windows() (N, T). Only a fit needs the data: a plain
    conversion measures when it can, and data that is gone (a checkpoint copied elsewhere)
    or unusable is recorded and noted on stderr instead of failing the conversion. A corpus
    of one document holds nothing out: noted, never an error (the fit used all of it)."""
    from data.prepare import TooFewDocuments
    try:
        windows = val_windows()
    except (DataError, ConvertError) as e:
        if required and not isinstance(e, TooFewDocuments):
            raise
        print(f"note: K/V error not measured: {e}; pass data.* or calib_windows=0",
              file=sys.stderr)
        return {"kv_error_not_measured": str(e)}
    return {"kv_error": {"split": "val", "windows": len(windows), "seq_len": windows.shape[1],
                         "layers": kv_errors(src_model, model_state(model), plans, windows,
                                             progress=True)}}


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
    (N, length) int64: the same windows on every call. A corpus of one document has no
    split: train windows come from all of it, and val (held-out text) raises
    TooFewDocuments, which kv_error_meta notes."""
    from data.prepare import TooFewDocuments, prepare_data  # only calibration needs the data stack
    import numpy as np

    if n_windows <= 0:
        raise ConvertError(f"calib_windows must be a positive integer, got {n_windows}")

    try:
        prepared = prepare_data(data_cfg, progress=False)
    except TooFewDocuments:
        if split != "train":
            raise
        prepared, split = prepare_data(data_cfg, progress=False, whole=True), "all"
    if vocab_size is not None and prepared.vocab_size != vocab_size:
        raise ConvertError(f"the data's tokenizer has {prepared.vocab_size} tokens, the model "
                           f"{vocab_size}: use the source's data settings")
    tokens = np.memmap(prepared.bin(split), dtype=prepared.dtype, mode="r")
    if len(tokens) < length:
        raise ConvertError(f"the {split} split has {len(tokens)} tokens, fewer than one window "
                           f"of {length}: use more data or a larger val_fraction")
    starts = np.linspace(0, len(tokens) - length, n_windows).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))


@dataclass
class LatentOptions:
    """mla.*: convert to MLA (convert/latent.py) instead of to n_kv_head heads."""
    kv_rank: int = 0  # the latent's width
    rope_dim: int = 0  # the shared RoPE key's width; 0: one source head's rotary width
    budget: int = 0  # fp32 KV bytes per token, split into kv_rank + rope_dim (instead of kv_rank)
    rope: RopeChoice = RopeChoice.rorope  # rorope | select: which RoPE components are kept
    fit: LatentFit = LatentFit.readers  # readers | activation: the latent's error as read, or raw
    balance: float = 0.1  # fit=readers: a key's score error against a value's output error

    @property
    def wanted(self) -> bool:
        return bool(self.kv_rank or self.budget)


@dataclass
class ConvertConfig:
    """python -m convert's options (configs/convert.yaml; --help describes them)."""
    ckpt: str = MISSING  # a gqalab checkpoint dir or an HF Llama/GPT-2/GPT-NeoX dir
    n_kv_head: int = 0  # KV heads of the result: a divisor of the source's (or mla.*)
    out: str = MISSING  # the new checkpoint dir
    method: Method = Method.mean  # mean | first | random
    group: Grouping = Grouping.contiguous  # contiguous | similar (convert/align.py)
    align: Alignment = Alignment.none  # none | procrustes | linear | linear_readers (convert/align.py)
    calib_windows: int = 64  # train windows to fit on, val windows to measure; 0: none
    calib_seq_len: int = 0  # tokens per calibration window; 0: the context up to 1024
    calib_tokens: int = 0  # a calibration token budget (windows it fills) instead of calib_windows
    seed: int = 0  # for method=random
    mla: LatentOptions = field(default_factory=lambda: LatentOptions())  # to MLA instead
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
    calibration = Calibration(args.calib_windows, args.calib_seq_len, args.calib_tokens)
    if args.mla.wanted or args.mla.rope_dim:
        return latent_command(args, calibration, given_data(cfg))
    if args.n_kv_head == 0:
        raise ConvertError("missing n_kv_head=...: python -m convert ckpt=<dir> n_kv_head=<G> "
                           "out=<dir>, or mla.kv_rank=<r> | mla.budget=<bytes/token> for MLA "
                           "(--help lists the options)")
    conversion = Conversion(args.n_kv_head, args.method, args.group, args.align, args.seed)
    out = convert_checkpoint(args.ckpt, args.out, conversion, calibration, given_data(cfg),
                             args.overwrite)
    print(f"wrote {out} ({args.method} pooling, group={args.group}, align={args.align}, "
          f"of {args.ckpt})")
    print(format_summary(read_config(out)))
    errors = read_meta(out).get("kv_error")
    if errors:
        print(f"K/V reconstruction error on {errors['windows']} held-out windows "
              f"(|aligned source heads - pooled|^2 / |source heads|^2):")
        for e in errors["layers"]:
            print(f"  layer {e['layer']}: K {e['k']:.4f}  V {e['v']:.4f}")


def latent_command(args: ConvertConfig, calibration: Calibration, data: dict) -> None:
    if args.n_kv_head:
        raise ConvertError(f"n_kv_head={args.n_kv_head} with mla.*: MLA has no KV heads; drop "
                           f"n_kv_head to convert to MLA, or drop mla.* to pool heads")
    m = args.mla
    conversion = LatentConversion(m.kv_rank, m.rope_dim, m.budget, m.rope, m.fit, m.balance)
    out = convert_to_latent(args.ckpt, args.out, conversion, calibration, data, args.overwrite)
    cfg = read_config(out)
    print(f"wrote {out} (MLA: kv_rank {cfg.kv_rank}, rope_dim {cfg.rope_dim}, rope={m.rope}, "
          f"fit={m.fit}, of {args.ckpt})")
    print(format_summary(cfg))
    for e in read_meta(out)["latent_fit"]:
        rope = f"  RoPE K left position-free {e['rope_residual']:.4f}" if "rope_residual" in e else ""
        print(f"  layer {e['layer']}: [K_nope; V] activation energy left out "
              f"{e['latent_error']:.4f}{rope}")


def main(argv: list[str] | None = None) -> int:
    """`python -m convert key=value ...` (argv: those arguments); the exit status."""
    return cli.run_app(command, argv)


if __name__ == "__main__":
    sys.exit(main())
