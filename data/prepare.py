"""Corpus -> tokenizer -> packed train/val token files, cached by content.

    python -m data.prepare                                  # pystdlib
    python -m data.prepare data=text_files data.files='[notes/*.md]'
    python -m data.prepare data=hub data.hub_name=roneneldan/TinyStories
    python -m data.prepare data=text_files data.files='[corpus/*.txt]' data.tokenizer=<HF dir>

Output, in <cache_dir>/<source>-<key>/:
    tokenizer.model   sentencepiece BPE, trained on the train split only; or, with
                      data.tokenizer=<tokenizer.model | tokenizer.json | checkpoint or HF
                      dir>, a copy of that tokenizer's files (nothing is trained)
    train.bin         train documents' tokens, flat uint16 (uint32 above 65,536 ids)
    val.bin           the same for val documents
    all.bin           instead of train.bin and val.bin, for a whole corpus (whole=True:
                      evaluate.py's split=all): every document in corpus order, no split,
                      so one document is enough; cached apart from the split build
    meta.json         source, content hash, tokenizer hash, counts, dtype, ...

Each document is framed as the tokenizer's models were trained: BOS first when the
tokenizer adds one (add_bos: Llama's add_bos_token), then its tokens, then EOS. gqalab's
own tokenizers and GPT-2-style ones add no BOS: documents are only separated by EOS.

The key hashes the source's content hash and every setting that changes the
output (a given tokenizer by its bytes and special ids, not its path); a second
prepare with the same key finds meta.json and does nothing.
Everything is built in a temporary folder renamed into place when complete, so
an error or Ctrl-C never leaves partial bins behind.
"""

import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import datasets
import numpy as np
import sentencepiece as spm
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import cli
from data.config import DataConfig, DataError
from data.sources import Source, open_source, text_bytes
from data.bpe import TRAINER_OPTIONS, train_tokenizer
from data.tokenizer import Tokenizer, copy_tokenizer, load_tokenizer, tokenizer_files

FORMAT_VERSION = 1
MAX_TOKENIZER_TRAIN_BYTES = 64 * 2**20  # the tokenizer learns from the first 64 MiB of train
BYTES_PER_PROCESS = 4 * 2**20  # extra tokenizing processes only pay off on several MB each


@dataclass
class PreparedData:
    dir: Path
    train_bin: Path
    val_bin: Path
    tokenizer_path: Path  # tokenizer.model or tokenizer.json
    meta: dict
    dtype: type  # np.uint16 or np.uint32
    vocab_size: int  # the tokenizer's real size (auto or tiny corpora may differ from the request)
    summary: str  # one line for the log
    cached: bool = False

    def bin(self, split: str) -> Path:
        """The packed ids of split: train | val (a split build) or all (a whole one)."""
        if split not in self.meta["tokens"]:
            raise DataError(f"{self.dir} holds the {'/'.join(self.meta['tokens'])} part(s), "
                            f"not {split}")
        return self.dir / f"{split}.bin"

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.dir)

    @property
    def tokenizer_files(self) -> dict:
        """{name: path} of the tokenizer's files: copy them next to every checkpoint."""
        return tokenizer_files(self.dir)


def prepare_data(cfg: DataConfig, progress: bool = True, whole: bool = False) -> PreparedData:
    """Build (or find in the cache) the tokenizer and packed bins for cfg: train.bin and
    val.bin, or with whole=True all.bin (every document in order, no split).
    Call from the main process only; other ranks wait at a barrier, then call again
    (a cache hit) or read the paths."""
    cfg = as_data_config(cfg)
    check_settings(cfg)
    started = time.time()
    given = given_tokenizer(cfg)
    source = open_source(cfg)
    key = cache_key(cfg, source.content_hash, given, whole)
    out_dir = Path(cfg.cache_dir) / f"{cfg.source}-{key[:16]}"
    found = load_prepared(out_dir, key)
    if found is not None:
        return found
    tmp_dir = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        with datasets_progress(progress):
            meta = build(cfg, source, key, tmp_dir, progress, given, whole)
        meta["prepare_seconds"] = round(time.time() - started, 2)
        write_json(tmp_dir / "meta.json", meta)  # written last: its presence marks a complete build
        publish(tmp_dir, out_dir, key)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return prepared_from(out_dir, load_meta(out_dir), cached=False)


def as_data_config(cfg) -> DataConfig:
    """Accept a DataConfig, a structured DictConfig, or a plain dict/DictConfig."""
    if isinstance(cfg, DataConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        obj = OmegaConf.to_object(cfg)
        return obj if isinstance(obj, DataConfig) else DataConfig(**obj)
    return DataConfig(**cfg)


def check_settings(cfg: DataConfig) -> None:
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be between 0 and 1; e.g. 0.05")
    if cfg.vocab_size < 0 or cfg.vocab_size > 2**32:
        raise DataError(f"data.vocab_size={cfg.vocab_size} is out of range; use 0 (auto) or e.g. 4096")
    for name in ("max_documents", "max_tokens"):
        value = getattr(cfg, name)
        if value is not None and value <= 0:
            raise DataError(f"data.{name}={value} must be positive, or null for no cap")


def given_tokenizer(cfg: DataConfig) -> Optional[Tokenizer]:
    """data.tokenizer's tokenizer, or None when prepare trains one."""
    if not cfg.tokenizer:
        return None
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.eos_id is None:
        raise DataError(f"data.tokenizer={cfg.tokenizer} defines no EOS token to end documents "
                        f"with: give its tokenizer_config.json an eos_token")
    return tokenizer


def cache_key(cfg: DataConfig, content_hash: str, given: Optional[Tokenizer] = None,
              whole: bool = False) -> str:
    """Everything that changes the output, and nothing that does not (num_proc, cache_dir;
    for a whole build, val_fraction and seed)."""
    trained = dict(TRAINER_OPTIONS, max_train_bytes=MAX_TOKENIZER_TRAIN_BYTES,
                   sentencepiece=spm.__version__, vocab_size=cfg.vocab_size)
    settings = dict(
        format_version=FORMAT_VERSION,
        source=cfg.source,
        content_hash=content_hash,  # covers paths, contents, split_by / hub name, config, column
        max_documents=cfg.max_documents,
        max_tokens=cfg.max_tokens,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        tokenizer=given.identity() if given is not None else trained,
    )
    if whole:  # split builds keep the keys they always had
        settings.update(whole=True, val_fraction=None, seed=None)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------
# the build


def build(cfg: DataConfig, source: Source, key: str, out_dir: Path, progress: bool,
          given: Optional[Tokenizer] = None, whole: bool = False) -> dict:
    log = print if progress else (lambda *a, **k: None)
    docs = source.build()
    if len(docs) == 0:
        raise DataError(f"the {cfg.source} corpus has no documents (all empty); "
                        "add text, or check data.files / data.max_documents")
    is_val = [False] * len(docs) if whole else split_assignment(
        docs.with_format("arrow")["id"].to_pylist(), cfg.val_fraction, cfg.seed)
    docs = docs.add_column("is_val", is_val)
    doc_bytes = text_bytes(docs)

    if given is not None:
        copy_tokenizer(given, out_dir)
        tokenizer = given
        log(f"tokenizer {given.path}: {tokenizer.vocab_size} ids, "
            f"{'BOS + ' if tokenizer.add_bos else ''}document + EOS")
        vocab_size = tokenizer.vocab_size
    else:
        vocab_size, tokenizer = train_on(cfg, docs, is_val, doc_bytes, out_dir, log)

    tokens = tokenize(docs, tokenizer, resolve_num_proc(cfg.num_proc, int(doc_bytes.sum())))
    if cfg.max_tokens is not None:
        cumulative = np.cumsum(column(tokens, "n_tokens"))
        n_docs = int(np.searchsorted(cumulative, cfg.max_tokens, side="right"))
        tokens = tokens.select(range(max(n_docs, 1)))
        if not whole and len(set(column(tokens, "is_val").tolist())) < 2:
            # the cap kept only one side of the hash split: split_assignment's fallback
            # moves one kept document across, deterministically
            is_val = split_assignment(tokens.with_format("arrow")["id"].to_pylist(),
                                      cfg.val_fraction, cfg.seed)
            tokens = tokens.remove_columns("is_val").add_column("is_val", is_val)
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    counts = {}
    for split, want_val in (("all", False),) if whole else (("train", False), ("val", True)):
        part = tokens.filter(lambda b: [v == want_val for v in b["is_val"]], batched=True,
                             desc=f"{split} split")
        if len(part) == 0:
            raise DataError(f"the {split} split is empty after the caps; raise data.max_tokens "
                            "or data.max_documents")
        n_tokens = write_bin(part, out_dir / f"{split}.bin", dtype, progress)
        part_bytes = int(doc_bytes[column(part, "doc_index")].sum())
        counts[split] = dict(documents=len(part), tokens=n_tokens, bytes=part_bytes)

    total_tokens = sum(c["tokens"] for c in counts.values())
    total_bytes = sum(c["bytes"] for c in counts.values())
    return dict(
        format_version=FORMAT_VERSION,
        key=key,
        source=cfg.source,
        settings=asdict(cfg),
        content_hash=source.content_hash,
        skipped_files=source.skipped_files,
        tokenizer_file=tokenizer.file_name,
        tokenizer_given=str(given.path) if given is not None else None,
        tokenizer_sha256=tokenizer.sha256(),
        tokenizer_options=TRAINER_OPTIONS if given is None else None,
        add_bos=tokenizer.add_bos,
        vocab_size=tokenizer.vocab_size,
        vocab_size_requested=cfg.vocab_size or vocab_size,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        unk_id=tokenizer.unk_id,
        dtype=np.dtype(dtype).name,
        documents={s: c["documents"] for s, c in counts.items()},
        tokens={s: c["tokens"] for s, c in counts.items()},  # EOS separators included
        bytes={s: c["bytes"] for s, c in counts.items()},
        tokens_per_byte=round(total_tokens / max(total_bytes, 1), 4),
        python=sys.version.split()[0],
    )


def train_on(cfg: DataConfig, docs: datasets.Dataset, is_val: list, doc_bytes: np.ndarray,
             out_dir: Path, log) -> tuple:
    """Train gqalab's sentencepiece BPE on the train split. -> (requested size, tokenizer)"""
    train_texts = docs.filter(lambda b: [not v for v in b["is_val"]], batched=True, desc="train split")
    train_bytes = int(doc_bytes[~np.array(is_val)].sum())
    vocab_size, hard_limit = resolve_vocab_size(cfg.vocab_size, train_bytes)
    log(f"training BPE tokenizer: vocab {vocab_size}{' (auto)' if not cfg.vocab_size else ''}, "
        f"{train_bytes / 1e6:.1f} MB of train text")
    t0 = time.time()
    tokenizer = train_tokenizer(first_texts(train_texts, MAX_TOKENIZER_TRAIN_BYTES), vocab_size,
                                out_dir / "tokenizer.model", hard_vocab_limit=hard_limit)
    log(f"tokenizer trained in {time.time() - t0:.1f} s: {tokenizer.vocab_size} pieces")
    return vocab_size, tokenizer


def column(ds: datasets.Dataset, name: str) -> np.ndarray:
    return ds.with_format("arrow")[name].to_numpy()


class TooFewDocuments(DataError):
    """A train/val split of a corpus of one document: scoring it whole needs no split."""


def split_assignment(doc_ids, val_fraction: float, seed: int) -> list:
    """is_val per document, from a hash of (seed, document id): the same document
    lands in the same split on every run, whatever else is in the corpus. Tiny
    corpora still get at least one document on each side."""
    scores = np.array([_unit_hash(f"{seed}\0{doc_id}") for doc_id in doc_ids])
    if len(scores) < 2:
        raise TooFewDocuments(f"the corpus has {len(scores)} document(s); a train/val split needs 2 or more "
                        "(add files, or data.split_by=line/paragraph)")
    is_val = scores < val_fraction
    if not is_val.any():
        is_val[scores.argmin()] = True
    if is_val.all():
        is_val[scores.argmax()] = False
    return is_val.tolist()


def _unit_hash(text: str) -> float:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def resolve_vocab_size(requested: int, train_bytes: int) -> tuple:
    """(vocab_size, hard_limit). Auto: one piece per 2 KB of train text as a power
    of two in [512, 8192] (4096 for pystdlib), and a tiny corpus may stop short of
    it; an explicit size must be reachable or it is an error naming the largest."""
    if requested:
        return requested, True
    pieces = max(train_bytes // 2048, 1)
    return int(min(max(2 ** int(np.log2(pieces)), 512), 8192)), False


def resolve_num_proc(requested: int, n_bytes: int) -> int:
    wanted = requested or min(os.cpu_count() or 1, 8)
    return max(1, min(wanted, n_bytes // BYTES_PER_PROCESS))


def first_texts(docs: datasets.Dataset, max_bytes: int) -> Iterator[str]:
    """Texts in order until max_bytes (UTF-8) have been given."""
    given = 0
    for batch in docs.iter(batch_size=256):
        for text in batch["text"]:
            if given >= max_bytes:
                return
            given += len(text.encode("utf-8"))
            yield text


class EncodeDocuments:
    """Batched map function: each text framed as [BOS if add_bos] + ids + [EOS]. The
    tokenizer pickles as its model bytes, so this goes to worker processes and
    fingerprints by content for the datasets cache."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.head = [tokenizer.bos_id] if tokenizer.add_bos else []

    def __call__(self, batch, indices):
        ids = [self.head + doc + [self.tokenizer.eos_id]
               for doc in self.tokenizer.encode_batch(batch["text"])]
        return {"ids": ids, "n_tokens": [len(doc) for doc in ids], "doc_index": indices}


def tokenize(docs: datasets.Dataset, tokenizer: Tokenizer, num_proc: int) -> datasets.Dataset:
    features = datasets.Features({
        "id": datasets.Value("string"),
        "is_val": datasets.Value("bool"),
        "ids": datasets.Sequence(datasets.Value("int32")),
        "n_tokens": datasets.Value("int64"),
        "doc_index": datasets.Value("int64"),
    })
    return docs.map(
        EncodeDocuments(tokenizer), batched=True, batch_size=256, with_indices=True,
        num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"],
        features=features, desc="tokenizing",
    )


def write_bin(tokens: datasets.Dataset, path: Path, dtype, progress: bool) -> int:
    """Concatenate the documents' ids (EOS included) into a flat memmap, in order."""
    total = int(column(tokens, "n_tokens").sum())
    out = np.memmap(path, dtype=dtype, mode="w+", shape=(total,))
    pos = 0
    with tqdm(total=total, unit="tok", unit_scale=True, desc=f"writing {path.name}",
              disable=not progress) as bar:
        for batch in tokens.with_format("arrow").iter(batch_size=1024):
            flat = batch["ids"].combine_chunks().flatten().to_numpy()
            out[pos : pos + len(flat)] = flat
            pos += len(flat)
            bar.update(len(flat))
    assert pos == total, (pos, total)
    out.flush()
    del out
    return total


# ----------------------------------------------------------------------------
# the cache


def publish(tmp_dir: Path, out_dir: Path, key: str) -> None:
    """Atomically move a finished build into place (a rename within one folder). When a
    process running side by side published the same key first, its build stays (readers
    may have its bins open) and ours is left for the caller to discard."""
    if out_dir.exists() and load_prepared(out_dir, key) is None:  # stale or foreign
        shutil.rmtree(out_dir)
    try:
        os.replace(tmp_dir, out_dir)  # fails on a non-empty out_dir: never clobbers one
    except OSError:
        if load_prepared(out_dir, key) is None:
            raise


def load_prepared(out_dir: Path, key: str) -> Optional[PreparedData]:
    """The cached build for key, or None when absent or incomplete."""
    try:
        meta = load_meta(out_dir)
    except (OSError, ValueError):
        return None
    if meta.get("key") != key or meta.get("format_version") != FORMAT_VERSION:
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in meta["tokens"]:
        path = out_dir / f"{split}.bin"
        if not path.exists() or path.stat().st_size != meta["tokens"][split] * itemsize:
            return None
    if not (out_dir / meta.get("tokenizer_file", "tokenizer.model")).exists():
        return None
    return prepared_from(out_dir, meta, cached=True)


def load_meta(out_dir: Path) -> dict:
    return json.loads((Path(out_dir) / "meta.json").read_text())


def prepared_from(out_dir: Path, meta: dict, cached: bool) -> PreparedData:
    return PreparedData(
        dir=out_dir,
        train_bin=out_dir / "train.bin",
        val_bin=out_dir / "val.bin",
        tokenizer_path=out_dir / meta.get("tokenizer_file", "tokenizer.model"),
        meta=meta,
        dtype=np.dtype(meta["dtype"]).type,
        vocab_size=meta["vocab_size"],
        summary=summary_line(out_dir, meta, cached),
        cached=cached,
    )


def summary_line(out_dir: Path, meta: dict, cached: bool) -> str:
    docs, tokens = meta["documents"], meta["tokens"]
    parts = " / ".join(f"{n:,} {split}" for split, n in docs.items())
    stats = (f"{sum(docs.values()):,} documents ({parts}), "
             f"{' + '.join(f'{n:,} {split}' for split, n in tokens.items())} tokens, "
             f"{meta['tokens_per_byte']:.3f} tokens/byte, vocab {meta['vocab_size']} {meta['dtype']}")
    how = "cached, nothing to do" if cached else f"prepared in {meta['prepare_seconds']:.1f} s"
    return f"data {meta['source']}: {how}: {stats} -> {out_dir}"


def write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def datasets_progress(enabled: bool):
    was_enabled = datasets.is_progress_bar_enabled()
    (datasets.enable_progress_bars if enabled else datasets.disable_progress_bars)()
    try:
        yield
    finally:
        (datasets.enable_progress_bars if was_enabled else datasets.disable_progress_bars)()


# ----------------------------------------------------------------------------
# CLI


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)


ConfigStore.instance().store(name="prepare_schema", node=PrepareConfig)


@cli.hydra_main(config_path="../configs", config_name="prepare", errors=(OSError,))
def main(cfg: PrepareConfig) -> None:
    print(prepare_data(as_data_config(cfg.data)).summary)


if __name__ == "__main__":
    main()
