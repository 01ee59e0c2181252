"""Perplexity and bits per byte of any source on a corpus: what a conversion cost, and how
much of it uptraining won back. The one evaluation of the codebase: train.py's validation,
the ablation and the demo score windows through evaluation/scoring.py's `window_scores`.

    python evaluate.py ckpt=runs/x data=text_files data.files='[corpus/*.txt]'
    python evaluate.py ckpts='[hf_mha_dir,ckpts/gqa2,runs/up]' reference=0 out=eval.json
    python evaluate.py ckpt=ckpts/gqa2 seq_len=512 stride=256 max_windows=64
    python evaluate.py ckpts='[mha,gqa2]' reference=0 attention.kl=true
    python evaluate.py ckpt=hf_dir tasks='[arc_easy,piqa]' tasks_dir=../shared/evalsets task_limit=100
    python evaluate.py ckpt=hf_dir attention.prompt="def fib(n):" attention.layer=3 attention.head=1
    python evaluate.py ckpt=hf_dir data=text_files data.files='[wiki.test.raw]' split=all
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \
        evaluate.py ckpt=runs/x                     # windows dealt round-robin over processes

Sources: whatever generate.py loads (a gqalab checkpoint, a run dir's latest, an HF Llama,
GPT-2 or GPT-NeoX dir, an int8 dir). The corpus (`data=` / `data.*`, as train.py takes it)
is tokenized with each model's own tokenizer through data.prepare's cache; split=all
scores every document in order with no train/val split (one file is a corpus).
attention.prompt alone reads no corpus (score=true: the scores too).

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
tokenizer; bits per byte compares any. Each carries its standard error over windows
(evaluation/stats.py); with reference=, a model of the reference's tokenizer is tested
paired over the same windows (beyond noise: |delta| > 1.96 SE).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import cli
from data.config import DataConfig, DataError
from data.prepare import TooFewDocuments, prepare_data
from data.tokenizer import load_tokenizer, tokenizer_files
from evaluation import EvalError
from evaluation.attention import kl_tables, show_prompt_attention
from evaluation.passkey import DEPTHS, check_passkey, default_lengths, passkey_results
from evaluation.ranks import gather_windows, leave_process_group, make_accelerator, window_bar
from evaluation.report import (Row, format_table, gap_closed, make_row, paired_deltas,
                               write_report)
from evaluation.scoring import (TokenBytes, scored_tokens, split_tokens, window_count,
                                window_rows)
from data.chat import chat_template
from evaluation.tasks import add_task_scores, check_tasks
from store.source import SourceError as UsageError
from store.source import Kind, load_model, open_source, pick_device, pick_dtype
from store.source import Source as Opened
from store.checkpoint import CheckpointError
from model.config import ConfigError, ModelConfig
from store.hf import checkpoint_tokenizer

from store.runs import TRAIN_CONFIG
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
class PasskeyOptions:
    """Passkey retrieval (evaluation/passkey.py): a key hidden in filler, asked for at the end."""
    enabled: bool = False
    only: bool = False  # passkey alone, no corpus scored (implies enabled)
    lengths: list[int] = field(default_factory=list)  # prompt tokens; []: 256, 512, .. context
    depths: list[float] = field(default_factory=lambda: list(DEPTHS))  # 0: first, 1: last
    trials: int = 5  # keys per length x depth
    seed: int = 0  # decides every key, so every prompt
    plot: str = "passkey.png"  # accuracy per length x depth (one panel per model)

    @property
    def active(self) -> bool:
        return self.enabled or self.only


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
    # score the corpus? null: yes, unless attention.prompt is all that is asked (a look at
    # one prompt reads no corpus); true: attention.prompt and the scores; false: no scores
    score: Optional[bool] = None
    passkey: PasskeyOptions = field(default_factory=PasskeyOptions)
    # zero-shot tasks through lm-evaluation-harness (evaluation/tasks.py, needs '.[eval]')
    tasks: list[str] = field(default_factory=list)  # e.g. [arc_easy,piqa,winogrande]
    tasks_dir: str = ""  # local originals of LOCAL_TASKS (<dir>/<task>/); "": the Hub
    task_limit: Optional[int] = None  # the first N items of each task; null: all
    tasks_chat: bool = False  # render the tasks' prompts through each source's chat template


ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


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
    nothing_else = cfg.attention.kl or not cfg.attention.prompt
    if not wants_scores(cfg) and not cfg.passkey.only and nothing_else:
        raise EvalError("score=false leaves nothing to do but attention.prompt=... "
                        "(attention.kl reads the corpus's windows)")
    if cfg.passkey.active:
        check_passkey(cfg.passkey, passkey_lengths(cfg, sources), context,
                      {s.name: checkpoint_tokenizer(s.path) for s in sources})
    check_tasks(cfg.tasks, cfg.tasks_dir, cfg.task_limit)
    if cfg.tasks_chat:
        bare = [s.name for s in sources if not chat_template(s.path)]
        if bare:
            raise EvalError(f"tasks_chat=true renders through each source's chat template, and "
                            f"{', '.join(bare)} ships none: drop tasks_chat or those sources")
    if cfg.tasks and not wants_scores(cfg):
        raise EvalError("tasks=... adds columns to the scored rows: drop score=false and "
                        "passkey.only=true")
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
    if cfg.passkey.only:
        raise EvalError("attention.kl compares attention over the corpus, which passkey.only "
                        "skips: use passkey.enabled=true to run both")
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


def wants_scores(cfg: EvaluateConfig) -> bool:
    """Whether the corpus is scored: never with passkey.only; else score=, or by default
    unless attention.prompt alone is asked."""
    if cfg.passkey.only:  # passkey retrieval alone: no corpus
        return False
    if cfg.score is not None:
        return cfg.score
    return not cfg.attention.prompt or cfg.attention.kl


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
    if cfg.passkey.active:
        paths.append(Path(cfg.passkey.plot))
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


# ---------------------------------------------------------------- the command

def evaluate_source(source: Source, cfg: EvaluateConfig, split: str, seq_len: int,
                    stride: int, accelerator, device: torch.device,
                    dtype: torch.dtype) -> tuple[Row, np.ndarray, np.ndarray]:
    """-> (its row, the split's tokens, every window's (NLL, tokens, bytes))."""
    data = corpus_data(cfg, source)
    with accelerator.main_process_first():  # one process tokenizes, the others hit the cache
        prepared = prepare_corpus(data, split, accelerator.is_main_process)
    model, _ = load_model(source.path, device, dtype)
    tokenizer = prepared.tokenizer()
    check_vocab(source.name, data.tokenizer, tokenizer.vocab_size, model.config.vocab_size)
    tokens = split_tokens(prepared, split)
    if len(tokens) < seq_len + 1:
        raise EvalError(f"the {split} split of the corpus has {len(tokens)} tokens with "
                        f"{source.name}'s tokenizer, fewer than one window of seq_len+1="
                        f"{seq_len + 1}: lower seq_len, use split=all, or add data")
    windows = window_count(len(tokens), seq_len, stride, cfg.max_windows)
    if accelerator.is_main_process:  # before a long run starts: what it will cost
        print(f"{source.name}: scoring {windows:,} windows of {seq_len} tokens: "
              f"{scored_tokens(seq_len, stride, windows):,} of the {len(tokens):,} tokens "
              f"of split {split}", flush=True)
    with window_bar(accelerator, windows, source.name) as bar:
        rows = window_rows(model, tokens, seq_len, cfg.batch_size, device, stride=stride,
                           max_windows=cfg.max_windows, rank=accelerator.process_index,
                           world_size=accelerator.num_processes,
                           token_bytes=TokenBytes(tokenizer, model.config.vocab_size, device),
                           bar=bar)
    scores = gather_windows(accelerator, rows, windows)
    return make_row(source, model.config, tokenizer, scores, dtype), tokens, scores


def prepare_corpus(data: DataConfig, split: str, progress: bool):
    """split=all: every document in order, no train/val split (one document will do);
    train or val: the split build, refused in one line for a corpus of one document."""
    try:
        return prepare_data(data, progress=progress, whole=split == "all")
    except TooFewDocuments as e:
        raise EvalError(f"{e}; or score it whole: split=all") from None


def check_vocab(name: str, tokenizer: str, tokenizer_ids: int, model_ids: int) -> None:
    if tokenizer_ids > model_ids:
        raise EvalError(f"data.tokenizer={tokenizer} has {tokenizer_ids} ids, "
                        f"{name} only {model_ids}: use the model's own "
                        f"tokenizer (drop data.tokenizer)")


def score_sources(cfg: EvaluateConfig, sources: list[Source], split: str, seq_len: int,
                  stride: int, accelerator, device, dtype) -> tuple[list[Row], np.ndarray | None]:
    """-> (a row per source, the reference's tokens)."""
    rows, ref_tokens, scores = [], None, []
    for i, source in enumerate(sources):
        row, tokens, windows = evaluate_source(source, cfg, split, seq_len, stride, accelerator,
                                               device, dtype)
        rows.append(row)
        scores.append(windows)
        if i == cfg.reference:
            ref_tokens = tokens
    if cfg.reference is not None:
        gap_closed(rows, cfg.reference)
        paired_deltas(rows, scores, cfg.reference)
    return rows, ref_tokens


def given(settings: dict) -> dict:
    """The settings that were set (the corpus in the JSON)."""
    return {k: v for k, v in settings.items() if v not in (None, [], "")}


def print_settings(cfg: EvaluateConfig, result: dict) -> None:
    processes = result["processes"]
    print(f"corpus {cfg.data.source}, split {result['split']} ({result['split_reason']}); "
          f"windows of "
          f"{result['seq_len']} tokens, stride {result['stride']}"
          f"{f', at most {cfg.max_windows}' if cfg.max_windows else ''}; "
          f"{result['dtype']} on {result['device']}"
          f"{f' x {processes} processes' if processes > 1 else ''}")


def attention_results(cfg: EvaluateConfig, sources: list[Source], ref_tokens, seq_len: int,
                      accelerator, device, dtype) -> dict:
    """The attention options' results: KL tables (every process) and the prompt's matrices
    (the main process)."""
    att, results = cfg.attention, {}
    if att.kl:
        results["attention_kl"] = kl_tables(att, sources, cfg.reference, ref_tokens, seq_len,
                                            accelerator, device, dtype)
    if att.prompt and accelerator.is_main_process:
        results["attention_prompt"] = show_prompt_attention(att, sources, device, dtype)
    return results


def passkey_lengths(cfg: EvaluateConfig, sources: list[Source]) -> list[int]:
    """passkey.lengths, or the ladder up to the smallest model context."""
    return list(cfg.passkey.lengths) or default_lengths(min(s.config.max_seq_len
                                                            for s in sources))


def passkey_result(cfg: EvaluateConfig, sources: list[Source], main: bool, device,
                   dtype) -> dict:
    """The passkey grids (the main process runs them)."""
    if not (cfg.passkey.active and main):
        return {}
    return {"passkey": passkey_results(cfg.passkey, passkey_lengths(cfg, sources), sources,
                                       device, dtype, cfg.batch_size)}


def finish(cfg: EvaluateConfig, result: dict, main: bool) -> dict:
    if cfg.out and main:
        write_report(Path(cfg.out), result)
        print(f"wrote {cfg.out}")
    return result


def run(cfg: EvaluateConfig) -> dict:
    """Evaluate every source; print the table (main process); -> the JSON result."""
    sources = resolve_sources(cfg)
    seq_len, stride = check_settings(cfg, sources)
    accelerator = make_accelerator()
    device = accelerator.device if accelerator.num_processes > 1 else pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    main = accelerator.is_main_process
    result = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "processes": accelerator.num_processes, "rows": []}
    ref_tokens = None
    if wants_scores(cfg):
        split, why = pick_split(cfg, sources)
        rows, ref_tokens = score_sources(cfg, sources, split, seq_len, stride, accelerator,
                                         device, dtype)
        if cfg.tasks and main:
            add_task_scores(rows, [s.path for s in sources], cfg.tasks, cfg.tasks_dir,
                            cfg.task_limit, cfg.batch_size, device, dtype, cfg.tasks_chat)
        result |= {"corpus": given(asdict(cfg.data)), "split": split, "split_reason": why,
                   "seq_len": seq_len, "stride": stride, "max_windows": cfg.max_windows,
                   "reference": cfg.reference, "rows": [asdict(r) for r in rows]}
        if main:
            print_settings(cfg, result)
            print(format_table(rows))
    result |= attention_results(cfg, sources, ref_tokens, seq_len, accelerator, device, dtype)
    result |= passkey_result(cfg, sources, main, device, dtype)
    return finish(cfg, result, main)


@cli.hydra_main(config_path="configs", config_name="evaluate",
                errors=(UsageError, CheckpointError, ConfigError, DataError, ValueError, OSError))
def main(dcfg) -> None:
    run(OmegaConf.to_object(dcfg))


if __name__ == "__main__":
    sys.argv[1:] = cli.quote_prompt_args(sys.argv[1:], "attention.prompt")
    main()
    leave_process_group()
