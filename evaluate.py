"""Perplexity and bits per byte of any source on a corpus: what a conversion cost, and how
much of it uptraining won back. The one evaluation of the codebase: train.py's validation,
the ablation and the demo score windows through `window_scores` below.

    python evaluate.py ckpt=runs/x data=text_files data.files='[corpus/*.txt]'
    python evaluate.py ckpts='[hf_mha_dir,ckpts/gqa2,runs/up]' reference=0 out=eval.json
    python evaluate.py ckpt=ckpts/gqa2 seq_len=512 stride=256 max_windows=64
    python evaluate.py ckpts='[mha,gqa2]' reference=0 attention.kl=true
    python evaluate.py ckpt=hf_dir attention.prompt="def fib(n):" attention.layer=3 attention.head=1
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \
        evaluate.py ckpt=runs/x                     # windows dealt round-robin over processes

Sources: whatever generate.py loads (a gqalab checkpoint, a run dir's latest, an HF Llama,
GPT-2 or GPT-NeoX dir, an int8 dir). The corpus (`data=` / `data.*`, as train.py takes it)
is tokenized with each model's own tokenizer through data.prepare's cache.

Windows: seq_len inputs, each predicting the next token (so seq_len + 1 tokens are read).
stride = seq_len: non-overlapping, every token of the split from the second to the last
whole window's end scored once. stride < seq_len: windows every stride tokens; window w > 0
scores only its last stride targets, the rest is context (HF's perplexity guide). The tail
after the last whole window is not scored. max_windows: that many windows spread evenly
over the split (data/loader.eval_batches, the training eval's windows).

Bits per byte = total NLL / ln 2 / the UTF-8 bytes of the scored target tokens: each scored
token counts the bytes it spells (BOS/EOS and other special tokens 0, a byte-fallback piece
1, a dummy-prefix space at a document's start 0). So with max_windows (or a sliding stride,
or the dropped tail) the bytes are exactly those of the text that was scored, and over a
whole split they are the documents' bytes. NLL per token compares models that share a
tokenizer; bits per byte compares any.
"""
from __future__ import annotations

import json
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm.auto import tqdm

import cli
from data.config import DataConfig, DataError
from data.loader import IGNORE_INDEX, eval_batches
from data.prepare import prepare_data
from data.tokenizer import load_tokenizer, tokenizer_files
from store.source import SourceError as UsageError
from store.source import Kind, load_model, open_source, pick_device, pick_dtype
from store.source import Source as Opened
from store.checkpoint import CheckpointError
from model.config import ConfigError, ModelConfig
from model.kv_cache import kv_bytes_per_token
from model.summary import param_counts
from evaluation.scoring import TokenBytes, split_tokens, sum_dtype, window_count, window_scores

TRAIN_CONFIG = "train_config.yaml"
SPLITS = ("auto", "val", "train", "all")
# The data settings that decide which documents land in val: equal ones mean the corpus
# (and its held-out part) is the one a checkpoint was trained on.
CORPUS_KEYS = ("source", "files", "split_by", "hub_name", "hub_config", "hub_split",
               "text_column", "max_documents", "max_tokens", "val_fraction", "seed")


@dataclass
class AttentionOptions:
    prompt: str = ""  # print attention.layer/head's matrix over this prompt and plot it
    layer: int = 0
    head: int = 0  # a query head
    plot: str = "attention.png"  # the prompt's heatmap (one panel per model)
    kl: bool = False  # with reference=: mean KL(reference || model) per layer x query head
    kl_windows: int = 4  # windows spread over the split, as max_windows picks them
    kl_seq_len: int = 512  # their length (0: seq_len): each holds n_layer*n_head*len^2 floats
    kl_plot: str = "attention_kl.png"


@dataclass
class EvaluateConfig:
    ckpt: str = ""  # checkpoint dir | run dir (its latest) | HF dir | int8 dir
    ckpts: list[str] = field(default_factory=list)  # several, one table row each
    data: DataConfig = field(default_factory=DataConfig)
    split: str = "auto"  # auto (val for a model's training corpus, else all) | val | train | all
    seq_len: int = 0  # 0: min(2048, the smallest model context)
    stride: int = 0  # 0: seq_len (non-overlapping); smaller: sliding windows
    max_windows: Optional[int] = None  # null: every window of the split
    batch_size: int = 8
    device: str = "auto"  # auto = cuda > mps > cpu (under accelerate launch: the process's)
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 elsewhere
    reference: Optional[int] = None  # index into ckpts: deltas and share of the gap closed
    out: str = ""  # write the results as JSON here
    overwrite: bool = False
    attention: AttentionOptions = field(default_factory=AttentionOptions)


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


class EvalError(UsageError):
    """Bad input from the user; printed as one line."""


# ---------------------------------------------------------------- sources and settings

# the table's kind column, as evaluate.py has always named them
KIND_NAMES = {Kind.CHECKPOINT: "gqalab", Kind.QUANTIZED: "int8", Kind.HF: "hf"}


@dataclass
class Source:
    name: str  # as given
    opened: Opened  # what it names: a run dir's latest checkpoint

    @property
    def path(self) -> Path:
        return self.opened.path

    @property
    def config(self) -> ModelConfig:
        return self.opened.config

    @property
    def kind(self) -> str:
        return KIND_NAMES[self.opened.kind]


def resolve_sources(cfg: EvaluateConfig) -> list[Source]:
    if cfg.ckpt and cfg.ckpts:
        raise EvalError("give ckpt= or ckpts=[...], not both")
    names = list(cfg.ckpts) or ([cfg.ckpt] if cfg.ckpt else [])
    if not names:
        raise EvalError("no checkpoint given: pass ckpt=<checkpoint | run | HF | int8 dir> or "
                        "ckpts='[a,b,...]'")
    option = "ckpts" if cfg.ckpts else "ckpt"
    return [Source(name, open_source(name, option)) for name in names]


def check_settings(cfg: EvaluateConfig, sources: list[Source]) -> tuple[int, int]:
    """-> (seq_len, stride) once every setting is valid."""
    if cfg.split not in SPLITS:
        raise EvalError(f"split={cfg.split!r} is not one of {', '.join(SPLITS)}")
    context = min(s.config.max_seq_len for s in sources)
    seq_len = cfg.seq_len or min(2048, context)
    if not 0 < seq_len <= context:
        raise EvalError(f"seq_len={cfg.seq_len} must be in [1, {context}] (the smallest model "
                        f"context), or 0 for min(2048, context)")
    stride = cfg.stride or seq_len
    if not 0 < stride <= seq_len:
        raise EvalError(f"stride={cfg.stride} must be in [1, seq_len={seq_len}]: windows may "
                        f"overlap, not leave tokens out; 0 means stride = seq_len")
    for key in ("batch_size", "max_windows"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise EvalError(f"{key}={value} must be a positive integer")
    if cfg.reference is not None and not 0 <= cfg.reference < len(sources):
        raise EvalError(f"reference={cfg.reference} must index the {len(sources)} checkpoints "
                        f"(0..{len(sources) - 1})")
    check_attention(cfg, sources)
    for out in outputs(cfg, len(sources)):
        check_out(out, cfg.overwrite)
    return seq_len, stride


def check_attention(cfg: EvaluateConfig, sources: list[Source]) -> None:
    att = cfg.attention
    if att.prompt:
        for s in sources:
            if not (0 <= att.layer < s.config.n_layer and 0 <= att.head < s.config.n_head):
                raise EvalError(f"attention.layer={att.layer} attention.head={att.head}: "
                                f"{s.name} has layers 0..{s.config.n_layer - 1} and query heads "
                                f"0..{s.config.n_head - 1}")
    if not att.kl:
        return
    if cfg.reference is None or len(sources) < 2:
        raise EvalError("attention.kl=true compares each model with the reference: pass "
                        "ckpts='[reference,other,...]' and reference=<its index>")
    if att.kl_windows <= 0 or att.kl_seq_len < 0:
        raise EvalError("attention.kl_windows must be positive and attention.kl_seq_len >= 0")
    ref = sources[cfg.reference]
    shape = lambda s: (s.config.n_layer, s.config.n_head)
    sha = lambda s: load_tokenizer(cfg.data.tokenizer or s.path).sha256()
    for s in sources:
        if shape(s) != shape(ref):
            raise EvalError(f"attention.kl compares layer by layer, query head by query head: "
                            f"{s.name} has {shape(s)} (layers, query heads), the reference "
                            f"{ref.name} {shape(ref)}")
        if not cfg.data.tokenizer and tokenizer_files(s.path) and tokenizer_files(ref.path) \
                and sha(s) != sha(ref):
            raise EvalError(f"attention.kl needs the same tokens for both models: {s.name}'s "
                            f"tokenizer differs from the reference {ref.name}'s")


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise EvalError(f"{out} already exists: choose a new path or pass overwrite=true")
    if not out.parent.is_dir():
        raise EvalError(f"cannot write {out}: {out.parent} is not a directory")


def outputs(cfg: EvaluateConfig, n_sources: int) -> list[Path]:
    """Every file this run writes."""
    paths = [Path(cfg.out)] if cfg.out else []
    if cfg.attention.prompt:
        paths.append(Path(cfg.attention.plot))
    if cfg.attention.kl:
        paths.append(Path(cfg.attention.kl_plot))
    return paths


def corpus_data(cfg: EvaluateConfig, source: Source) -> DataConfig:
    """cfg.data tokenized with the source's own tokenizer (or data.tokenizer, when given)."""
    data = DataConfig(**{k: getattr(cfg.data, k) for k in DataConfig.__dataclass_fields__})
    if not data.tokenizer:
        if not tokenizer_files(source.path):
            raise EvalError(f"{source.name} ships no tokenizer (tokenizer.model, tokenizer.json "
                            f"or vocab.json + merges.txt): pass data.tokenizer=<its tokenizer>")
        data.tokenizer = str(source.path)
    return data


def trained_on(source: Source, data: DataConfig) -> bool:
    """Whether data is the corpus source was trained on (its train_config.yaml's data, as
    far as the documents and their train/val split go)."""
    path = source.path / TRAIN_CONFIG
    if not path.is_file():
        return False
    saved = OmegaConf.to_container(OmegaConf.load(path).get("data") or {}, resolve=True)
    return all(saved.get(k, getattr(DataConfig(), k)) == getattr(data, k) for k in CORPUS_KEYS)


def pick_split(cfg: EvaluateConfig, sources: list[Source]) -> tuple[str, str]:
    """(split, why)."""
    seen = [s.name for s in sources if trained_on(s, cfg.data)]
    if cfg.split != "auto":
        warn = f"; note: {', '.join(seen)} trained on its train split" if seen and \
            cfg.split != "val" else ""
        return cfg.split, f"as asked{warn}"
    if seen:
        return "val", (f"auto: the training corpus of {', '.join(seen)}, so its held-out val "
                       f"documents")
    return "all", "auto: no model here was trained on this corpus, so every document"


# ---------------------------------------------------------------- attention

@contextmanager
def attention_hook(model, on_attention):
    """Every layer calls on_attention(layer, log-probabilities (B, H, T, T)) during the
    forwards inside (model/attention.py's opt-in hook; SDPA still computes the output)."""
    layers = [block.attn for block in model.blocks]
    for attn in layers:
        attn.on_attention = on_attention
    try:
        yield
    finally:
        for attn in layers:
            attn.on_attention = None


@torch.no_grad()
def prompt_attention(model, ids: list[int], layer: int) -> torch.Tensor:
    """One layer's attention probabilities over ids, (H, T, T): row t is query t."""
    got = {}
    with attention_hook(model, lambda i, logp: got.setdefault(i, logp)):
        model(torch.tensor([ids], device=model.device))
    return got[layer][0].exp()


@torch.no_grad()
def attention_kl(reference, model, batches, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sums over every query position of the real rows of batches of KL(reference's
    attention || model's), (n_layer, n_head) in nats, and the number of positions."""
    cfg = model.config
    kl = torch.zeros(cfg.n_layer, cfg.n_head, device=device, dtype=sum_dtype(device))
    positions = 0
    for x, y in batches:
        x, real = x.to(device), (y != IGNORE_INDEX).any(1).to(device)  # padding rows: none
        ref_logp = {}
        with attention_hook(reference, lambda i, logp: ref_logp.__setitem__(i, logp)):
            reference(x)

        def compare(i: int, logp: torch.Tensor) -> None:
            r = ref_logp.pop(i)  # (B, H, T, T)
            per_row = torch.where(r.isfinite(), r.exp() * (r - logp), 0).sum((2, 3))  # (B, H)
            kl[i] += (per_row * real[:, None]).sum(0).to(kl.dtype)

        with attention_hook(model, compare):
            model(x)
        positions += int(real.sum()) * x.shape[1]
    return kl, positions


def token_label(tokenizer, token: int) -> str:
    return repr(tokenizer.decode([token]) if tokenizer is not None else str(token))[1:-1][:12]


def show_prompt_attention(cfg: EvaluateConfig, sources: list[Source], device, dtype) -> dict:
    """Print attention.layer/head's matrix over the prompt for every source; plot them side
    by side. -> {name: {tokens, matrix}}."""
    att, shown = cfg.attention, {}
    for source in sources:
        model, tokenizer = load_model(source.path, device, dtype)
        if tokenizer is None:
            raise EvalError(f"{source.name} ships no tokenizer to read attention.prompt with")
        ids = ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(att.prompt)
        if len(ids) > model.config.max_seq_len:
            raise EvalError(f"attention.prompt is {len(ids)} tokens, above {source.name}'s "
                            f"context of {model.config.max_seq_len}: shorten it")
        probs = prompt_attention(model, ids, att.layer)[att.head].cpu()  # (T, T)
        labels = [token_label(tokenizer, i) for i in ids]
        print(f"\n{source.name}: layer {att.layer}, query head {att.head} (KV head "
              f"{att.head // (model.config.n_head // model.config.n_kv_head)}); row = query "
              f"token, columns = the keys it attends to")
        for t, label in enumerate(labels):
            print(f"{t:>4} {label:<12} " + " ".join(f"{p:.2f}" for p in probs[t, : t + 1].tolist()))
        shown[source.name] = {"tokens": labels, "matrix": probs.tolist()}
        del model
    plot_panels(Path(att.plot), {n: torch.tensor(v["matrix"]) for n, v in shown.items()},
                f"attention, layer {att.layer} head {att.head}: \"{att.prompt[:40]}\"",
                ticks={n: v["tokens"] for n, v in shown.items()}, xlabel="key", ylabel="query")
    print(f"wrote {att.plot}")
    return shown


def kl_tables(cfg: EvaluateConfig, sources: list[Source], ref_tokens: np.ndarray, seq_len: int,
              accelerator, device, dtype) -> dict:
    """KL(reference || model) per layer x query head for every other source, printed and
    plotted. -> {name: (n_layer, n_head) nested list}."""
    att = cfg.attention
    length = min(seq_len, att.kl_seq_len or seq_len)
    reference, _ = load_model(sources[cfg.reference].path, device, dtype)
    tables = {}
    for i, source in enumerate(sources):
        if i == cfg.reference:
            continue
        model, _ = load_model(source.path, device, dtype)
        batches = eval_batches(ref_tokens, None, length, 1, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, max_windows=att.kl_windows)
        kl, positions = attention_kl(reference, model, batches, device)
        kl = accelerator.reduce(kl, "sum") / accelerator.reduce(
            torch.tensor(float(positions), device=device, dtype=kl.dtype), "sum")
        tables[source.name] = kl.cpu().tolist()
        del model
    if accelerator.is_main_process:
        windows = window_count(len(ref_tokens), length, length, att.kl_windows)
        print(f"\nattention KL(reference {sources[cfg.reference].name} || model), nats, mean "
              f"over the query positions of {windows} windows of {length} tokens; rows: layers, "
              f"columns: query heads")
        for name, table in tables.items():
            print(f"{name}:")
            print("layer " + " ".join(f"{f'h{h}':>7}" for h in range(len(table[0]))))
            for layer, row in enumerate(table):
                print(f"{layer:>5} " + " ".join(f"{v:7.4f}" for v in row))
        plot_panels(Path(att.kl_plot), {n: torch.tensor(t) for n, t in tables.items()},
                    f"attention KL to {sources[cfg.reference].name} (nats)", xlabel="query head",
                    ylabel="layer", colorbar=True)
        print(f"wrote {att.kl_plot}")
    return tables


def plot_panels(path: Path, panels: dict[str, torch.Tensor], title: str, ticks=None,
                xlabel: str = "", ylabel: str = "", colorbar: bool = False) -> None:
    """One heatmap per name, side by side, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n + 1, 4.5), squeeze=False)
    for ax, (name, matrix) in zip(axes[0], panels.items()):
        image = ax.imshow(matrix.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        labels = (ticks or {}).get(name)
        if labels is not None and len(labels) <= 40:
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
        elif labels is None:  # layers x heads: whole numbers
            ax.set_xticks(range(0, matrix.shape[1], max(1, matrix.shape[1] // 16)))
            ax.set_yticks(range(0, matrix.shape[0], max(1, matrix.shape[0] // 16)))
        ax.set(title=Path(name).name or name, xlabel=xlabel, ylabel=ylabel)
        if colorbar:
            fig.colorbar(image, ax=ax)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------- the command

@dataclass
class Row:
    name: str
    path: str
    kind: str  # gqalab | hf | int8
    attention: str
    n_kv_head: int
    params: int
    kv_bytes_per_token: int
    tokenizer: str
    nll: float  # nats per scored token
    ppl: float
    bits_per_byte: float
    tokens: int
    windows: int
    bytes: int
    delta_nll: Optional[float] = None  # minus the reference's (same tokenizer only)
    delta_bits_per_byte: Optional[float] = None
    gap_closed: Optional[float] = None  # see gap_closed()


def evaluate_source(source: Source, cfg: EvaluateConfig, split: str, seq_len: int,
                    stride: int, accelerator, device: torch.device,
                    dtype: torch.dtype) -> tuple[Row, np.ndarray]:
    main = accelerator.is_main_process
    data = corpus_data(cfg, source)
    with accelerator.main_process_first():  # one process tokenizes, the others hit the cache
        prepared = prepare_data(data, progress=main)
    model, _ = load_model(source.path, device, dtype)
    tokenizer = prepared.tokenizer()
    if tokenizer.vocab_size > model.config.vocab_size:
        raise EvalError(f"data.tokenizer={data.tokenizer} has {tokenizer.vocab_size} ids, "
                        f"{source.name} only {model.config.vocab_size}: use the model's own "
                        f"tokenizer (drop data.tokenizer)")
    tokens = split_tokens(prepared, split)
    if len(tokens) < seq_len + 1:
        raise EvalError(f"the {split} split of the corpus has {len(tokens)} tokens with "
                        f"{source.name}'s tokenizer, fewer than one window of seq_len+1="
                        f"{seq_len + 1}: lower seq_len, use split=all, or add data")
    windows = window_count(len(tokens), seq_len, stride, cfg.max_windows)
    bar = tqdm(total=-(-windows // accelerator.num_processes) * accelerator.num_processes
               if accelerator.num_processes > 1 else windows, disable=not main, unit="window",
               desc=f"{source.name}", dynamic_ncols=True, leave=False)
    totals = window_scores(model, tokens, seq_len, cfg.batch_size, device, stride=stride,
                           max_windows=cfg.max_windows, rank=accelerator.process_index,
                           world_size=accelerator.num_processes,
                           token_bytes=TokenBytes(tokenizer, model.config.vocab_size, device),
                           bar=_RankBar(bar, accelerator.num_processes))
    bar.close()
    totals = accelerator.reduce(totals, "sum").tolist()
    nll = totals[0] / totals[1]
    mc = model.config
    row = Row(name=source.name, path=str(source.path), kind=source.kind,
              attention=mc.attention_type, n_kv_head=mc.n_kv_head,
              params=param_counts(mc)["total"], kv_bytes_per_token=kv_bytes_per_token(mc, dtype),
              tokenizer=f"{tokenizer.file_name} {tokenizer.sha256()[:12]}", nll=nll,
              ppl=math.exp(nll), bits_per_byte=totals[0] / math.log(2) / totals[2],
              tokens=int(totals[1]), windows=int(totals[3]), bytes=int(totals[2]))
    return row, tokens


class _RankBar:
    """Counts one process's windows as all processes' (they advance in step)."""

    def __init__(self, bar: tqdm, world_size: int) -> None:
        self.bar, self.world_size = bar, world_size

    def update(self, n: int) -> None:
        self.bar.update(n * self.world_size)


def gap_closed(rows: list[Row], reference: int) -> None:
    """Fill delta_* and, for three rows or more, gap_closed on bits per byte (defined across
    tokenizers; with one tokenizer and the same windows it is the NLL's share too):
    gap = worst row's bits/byte - the reference's, and a row closes
    (worst - row) / gap of it: the worst row 0, one as good as the reference 1 (above 1:
    better than the reference). The worst row, not the first, so the order of ckpts does
    not matter; None when no row is worse than the reference."""
    ref = rows[reference]
    for row in rows:
        row.delta_bits_per_byte = row.bits_per_byte - ref.bits_per_byte
        row.delta_nll = row.nll - ref.nll if row.tokenizer == ref.tokenizer else None
    worst = max(r.bits_per_byte for r in rows)
    if len(rows) >= 3 and worst > ref.bits_per_byte:
        for row in rows:
            row.gap_closed = (worst - row.bits_per_byte) / (worst - ref.bits_per_byte)


def format_table(rows: list[Row]) -> str:
    head = ["model", "kind", "attn", "params", "KV B/tok", "tokens", "windows", "NLL", "PPL",
            "bits/byte"]
    with_ref = any(r.delta_bits_per_byte is not None for r in rows)
    if with_ref:
        head += ["ΔNLL", "Δbits/byte", "gap closed"]
    fmt = lambda v, f: "—" if v is None else format(v, f)
    table = [head]
    for r in rows:
        cells = [r.name, r.kind, r.attention, f"{r.params:,}", f"{r.kv_bytes_per_token:,}",
                 f"{r.tokens:,}", str(r.windows), f"{r.nll:.4f}", f"{r.ppl:.3f}",
                 f"{r.bits_per_byte:.4f}"]
        if with_ref:
            cells += [fmt(r.delta_nll, "+.4f"), fmt(r.delta_bits_per_byte, "+.4f"),
                      fmt(r.gap_closed, ".1%")]
        table.append(cells)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths))) for row in table)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def make_accelerator():
    from accelerate import Accelerator
    return Accelerator()


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate every source; print the table (main process); -> the JSON result."""
    sources = resolve_sources(cfg)
    seq_len, stride = check_settings(cfg, sources)
    accelerator = make_accelerator()
    distributed = accelerator.num_processes > 1
    device = accelerator.device if distributed else pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    split, why = pick_split(cfg, sources)
    main = accelerator.is_main_process
    rows, ref_tokens = [], None
    for i, source in enumerate(sources):
        row, tokens = evaluate_source(source, cfg, split, seq_len, stride, accelerator, device,
                                      dtype)
        rows.append(row)
        if i == cfg.reference:
            ref_tokens = tokens
    if cfg.reference is not None:
        gap_closed(rows, cfg.reference)
    corpus = {k: v for k, v in asdict(cfg.data).items() if v not in (None, [], "")}
    result = {"corpus": corpus, "split": split, "split_reason": why, "seq_len": seq_len,
              "stride": stride, "max_windows": cfg.max_windows, "device": str(device),
              "dtype": str(dtype).removeprefix("torch."),
              "processes": accelerator.num_processes, "reference": cfg.reference,
              "rows": [asdict(r) for r in rows]}
    if main:
        print(f"corpus {cfg.data.source}, split {split} ({why}); windows of {seq_len} tokens, "
              f"stride {stride}{f', at most {cfg.max_windows}' if cfg.max_windows else ''}; "
              f"{result['dtype']} on {device}"
              f"{f' x {accelerator.num_processes} processes' if distributed else ''}")
        print(format_table(rows))
    if cfg.attention.kl:
        result["attention_kl"] = kl_tables(cfg, sources, ref_tokens, seq_len, accelerator,
                                           device, dtype)
    if cfg.attention.prompt and main:
        result["attention_prompt"] = show_prompt_attention(cfg, sources, device, dtype)
    if cfg.out and main:
        write_json_atomic(Path(cfg.out), result)
        print(f"wrote {cfg.out}")
    return result


@cli.hydra_main(config_path="configs", config_name="evaluate",
                errors=(UsageError, CheckpointError, ConfigError, DataError, ValueError, OSError))
def main(dcfg) -> None:
    run(OmegaConf.to_object(dcfg))


def leave_process_group() -> None:
    """End a finished multi-process run (torchrun, accelerate launch) without the
    interpreter's teardown: once in CI a gloo rank that had printed its
    results aborted there ("terminate called without an active exception", a C++ thread
    destroyed while joinable) and turned a good run into exit 134."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # no rank leaves while another still needs it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.argv[1:] = cli.quote_prompt_args(sys.argv[1:], "attention.prompt")
    main()
    leave_process_group()
