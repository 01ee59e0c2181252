"""Corpora as `datasets.Dataset`s with columns `id` (unique, stable) and `text`.

Each source first computes a content hash cheaply (no documents built yet), so
prepare can decide from the hash alone whether its cache is still good:
  pystdlib    the .py files of the running interpreter's standard library
  text_files  local files or globs, one document per file, line or paragraph
  hub         anything `datasets.load_dataset` opens: a Hub name or a local dir

Dataset.from_generator caches by the generator's code and arguments, not by
the files it reads, so the content hash is passed in gen_kwargs.
"""

import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

import datasets
import numpy as np
import pyarrow.compute as pc

from data.config import SOURCES, SPLIT_BY, DataConfig, DataError

# Folders of the standard library that are tests, third-party code or demos.
STDLIB_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages",
     "idlelib", "turtledemo", "__pycache__"}
)

# A cap of max_tokens reads at most this many bytes per token of text before
# tokenizing (BPE on code or English stays well under it); the exact token cap
# is applied after tokenizing.
BYTES_PER_TOKEN_BOUND = 8

FEATURES = datasets.Features({"id": datasets.Value("string"), "text": datasets.Value("string")})

OFFLINE_HINT = "use data=pystdlib, or data=text_files data.files='[path/*.txt]'"


@dataclass
class Source:
    """A corpus identified by content, with its documents built on demand."""

    name: str
    content_hash: str
    build: Callable[[], datasets.Dataset]
    skipped_files: List[str] = field(default_factory=list)


def open_source(cfg: DataConfig) -> Source:
    if cfg.source == "pystdlib":
        return _files_source("pystdlib", pystdlib_files(), "file", cfg, id_root=pystdlib_dir())
    if cfg.source == "text_files":
        if cfg.split_by not in SPLIT_BY:
            raise DataError(f"data.split_by={cfg.split_by!r} is unknown; use one of {', '.join(SPLIT_BY)}")
        return _files_source("text_files", text_files(cfg.files), cfg.split_by, cfg)
    if cfg.source == "hub":
        return _hub_source(cfg)
    raise DataError(f"data.source={cfg.source!r} is unknown; use data={' or data='.join(SOURCES)}")


def content_hash(cfg: DataConfig) -> str:
    return open_source(cfg).content_hash


def load_documents(cfg: DataConfig) -> datasets.Dataset:
    """The corpus as a Dataset(id, text), empty documents dropped, caps applied."""
    return open_source(cfg).build()


# ----------------------------------------------------------------------------
# local files: pystdlib and text_files


def pystdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def pystdlib_files(root: Optional[Path] = None) -> List[Path]:
    """The standard library's .py files, sorted by path relative to root."""
    root = Path(root) if root is not None else pystdlib_dir()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        files += [Path(dirpath, name) for name in filenames if name.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def text_files(patterns: List[str]) -> List[Path]:
    """Expand paths, globs (** recurses) and directories, in the order given."""
    if not patterns:
        raise DataError("data=text_files needs files: data.files='[notes/*.txt]'")
    seen, files = set(), []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise DataError(
                f"data.files entry {pattern!r} matches no files (from {os.getcwd()}); "
                "fix the path or glob"
            )
        for match in map(Path, matches):
            for path in _files_under(match):
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    files.append(path)
    return files


def _files_under(path: Path) -> List[Path]:
    if not path.is_dir():
        return [path]
    return sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )


def _files_source(name, paths, split_by, cfg, id_root=None) -> Source:
    """Hash every file's id, bytes and mtime (so an edit or a `touch` rebuilds, like
    make); files that are not UTF-8 are reported and skipped."""
    digest = hashlib.sha256(f"{name}\0{split_by}\0".encode())
    kept, ids, skipped = [], [], []
    for path in paths:
        raw = path.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(str(path))
            continue
        doc_id = path.relative_to(id_root).as_posix() if id_root else str(path)
        digest.update(f"{doc_id}\0{path.stat().st_mtime_ns}\0{len(raw)}\0".encode() + raw)
        kept.append(str(path))
        ids.append(doc_id)
    if skipped:
        shown = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        print(f"warning: skipped {len(skipped)} file(s) that are not UTF-8 text: {shown}",
              file=sys.stderr)
    if not kept:
        raise DataError(f"no readable text files in {name} ({len(skipped)} skipped as not UTF-8); "
                        "point data.files at UTF-8 text")
    hash_ = digest.hexdigest()

    def build() -> datasets.Dataset:
        if not any(True for path in kept for _ in split_text(Path(path).read_text("utf-8"), split_by)):
            # datasets cannot build an empty Dataset from a generator; say it our way
            raise DataError(f"the {name} corpus has no documents (all empty); "
                            "add text, or check data.files / data.split_by")
        docs = datasets.Dataset.from_generator(
            file_documents,
            gen_kwargs={"paths": kept, "ids": ids, "split_by": split_by, "content_hash": hash_},
            features=FEATURES,
            cache_dir=str(hf_cache_dir(cfg)),
        )
        return _capped(docs, cfg)

    return Source(name, hash_, build, skipped)


def file_documents(paths, ids, split_by, content_hash) -> Iterator[dict]:
    """Generator for Dataset.from_generator. content_hash is unused here: it is
    an argument only so that the datasets cache changes when the files do."""
    for path, doc_id in zip(paths, ids):
        text = Path(path).read_bytes().decode("utf-8")  # bytes: keep CRLF as is
        for suffix, piece in split_text(text, split_by):
            yield {"id": doc_id + suffix, "text": piece}


def split_text(text: str, split_by: str) -> Iterator[Tuple[str, str]]:
    """(id suffix, document) pairs; empty or blank documents are dropped."""
    if split_by == "file":
        if text:
            yield "", text
    elif split_by == "line":
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if line.strip():
                yield f":{number}", line
    elif split_by == "paragraph":
        # a paragraph ends at one or more blank lines; the next one keeps its indentation
        for number, para in enumerate(re.split(r"\r?\n(?:[ \t]*\r?\n)+", text), start=1):
            para = para.rstrip("\r\n")
            if para.strip():
                yield f"#{number}", para
    else:
        raise DataError(f"data.split_by={split_by!r} is unknown; use one of {', '.join(SPLIT_BY)}")


# ----------------------------------------------------------------------------
# Hub (or any dataset `datasets` can open)


def hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return bool(datasets.config.HF_HUB_OFFLINE) or any(
        f.strip().lower() in ("1", "true", "yes", "on") for f in flags
    )


def _hub_source(cfg: DataConfig) -> Source:
    name = cfg.hub_name
    if not name:
        raise DataError("data=hub needs a dataset: data.hub_name=roneneldan/TinyStories")
    if cfg.streaming and not (cfg.max_documents or cfg.max_tokens):
        raise DataError("data.streaming=true needs a cap: set data.max_documents or data.max_tokens")
    is_local = Path(name).expanduser().exists()
    if not is_local and hub_offline():
        raise DataError(f"data=hub needs the Hugging Face Hub but HF_HUB_OFFLINE=1; {OFFLINE_HINT}")
    try:
        builder = datasets.load_dataset_builder(name, cfg.hub_config, cache_dir=str(hf_cache_dir(cfg)))
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"Hub dataset {name!r} not found; check data.hub_name, or {OFFLINE_HINT}") from e
    except ConnectionError as e:
        raise DataError(f"cannot reach the Hugging Face Hub for {name!r}; {OFFLINE_HINT}") from e
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"cannot open dataset {name!r} (config {cfg.hub_config!r}): "
                        f"{_first_line(e)}; check data.hub_name and data.hub_config") from e
    # builder.hash covers the builder config and the data files (their revision
    # on the Hub, their contents locally), so a changed dataset changes the key.
    identity = dict(name=name, config=cfg.hub_config, split=cfg.hub_split,
                    column=cfg.text_column, builder_hash=builder.hash)
    hash_ = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def build() -> datasets.Dataset:
        if cfg.streaming:
            return _hub_streamed(builder, cfg)
        return _hub_downloaded(builder, cfg)

    return Source("hub", hash_, build)


def _hub_downloaded(builder, cfg: DataConfig) -> datasets.Dataset:
    builder.download_and_prepare()
    try:
        ds = builder.as_dataset(split=cfg.hub_split)
    except (KeyError, ValueError) as e:
        raise DataError(f"{cfg.hub_name!r} has no split {cfg.hub_split!r} ({_first_line(e)}); "
                        "set data.hub_split") from e
    _check_text_column(ds.column_names, ds.features, cfg)
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    ds = ds.select_columns([cfg.text_column])
    ds = ds.map(
        lambda batch, idx: {"id": [str(i) for i in idx], "text": batch[cfg.text_column]},
        batched=True, with_indices=True, remove_columns=[cfg.text_column], features=FEATURES,
        desc="hub documents",
    )
    return _capped(ds.filter(lambda b: [bool(t) for t in b["text"]], batched=True), cfg)


def _hub_streamed(builder, cfg: DataConfig) -> datasets.Dataset:
    try:
        stream = builder.as_streaming_dataset(split=cfg.hub_split)
    except (KeyError, ValueError) as e:
        raise DataError(f"{cfg.hub_name!r} has no split {cfg.hub_split!r} ({_first_line(e)}); "
                        "set data.hub_split") from e
    budget = _byte_budget(cfg)
    ids, texts, n_bytes = [], [], 0
    for index, row in enumerate(stream):
        if index == 0:
            _check_text_column(list(row), stream.features, cfg)
        if cfg.max_documents is not None and index >= cfg.max_documents:
            break
        if budget is not None and n_bytes >= budget:
            break
        text = row[cfg.text_column]
        if text:
            ids.append(str(index))
            texts.append(text)
            n_bytes += len(text.encode("utf-8"))
    return datasets.Dataset.from_dict({"id": ids, "text": texts}, features=FEATURES)


def _check_text_column(columns, features, cfg: DataConfig) -> None:
    if cfg.text_column not in columns:
        raise DataError(f"column {cfg.text_column!r} not in {cfg.hub_name!r} (columns: "
                        f"{', '.join(columns)}); set data.text_column=<one of them>")
    feature = (features or {}).get(cfg.text_column)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"column {cfg.text_column!r} of {cfg.hub_name!r} holds {feature}, not text; "
                        "set data.text_column to a string column")


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ----------------------------------------------------------------------------
# caps and helpers


def hf_cache_dir(cfg: DataConfig) -> Path:
    """datasets' own cache lives inside ours, not in ~/.cache/huggingface."""
    return Path(cfg.cache_dir) / "hf"


def text_bytes(docs: datasets.Dataset) -> np.ndarray:
    """UTF-8 length of every document, computed in Arrow (no Python loop)."""
    column = docs.with_format("arrow")["text"]
    return pc.binary_length(column).to_numpy(zero_copy_only=False).astype(np.int64)


def _byte_budget(cfg: DataConfig) -> Optional[int]:
    return cfg.max_tokens * BYTES_PER_TOKEN_BOUND if cfg.max_tokens else None


def _capped(docs: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    """First max_documents documents, then only as many as max_tokens can use."""
    if cfg.max_documents is not None and cfg.max_documents < len(docs):
        docs = docs.select(range(cfg.max_documents))
    budget = _byte_budget(cfg)
    if budget is not None and len(docs):
        # keep documents until the one that reaches the budget, inclusive
        n = int(np.searchsorted(np.cumsum(text_bytes(docs)), budget)) + 1
        docs = docs.select(range(min(n, len(docs))))
    return docs
