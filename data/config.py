"""Typed configuration of the data pipeline, and the error users can fix.

DataConfig is the Hydra structured-config schema for the `data=...` group:
configs/data/{pystdlib,text_files,hub}.yaml only set its fields, so a typo or a
wrong type (`data.vocab_size=abc`) fails when the config is composed.
"""

from dataclasses import dataclass, field
from typing import List, Optional

import cli

SOURCES = ("pystdlib", "text_files", "hub")
SPLIT_BY = ("file", "line", "paragraph")


class DataError(cli.UserError):
    """A problem with the user's data or data settings. The message is one line
    that says what is wrong and how to fix it; CLIs print it without a traceback."""


@dataclass
class DataConfig:
    # which corpus: "pystdlib" (offline default), "text_files" or "hub"
    source: str = "pystdlib"

    # text_files: paths or globs, and how a file becomes documents
    files: List[str] = field(default_factory=list)
    split_by: str = "file"  # "file" | "line" | "paragraph" (blank-line separated)

    # hub: any dataset `datasets.load_dataset` can open (a Hub name or a local dir)
    hub_name: str = ""
    hub_config: Optional[str] = None
    hub_split: str = "train"
    text_column: str = "text"
    streaming: bool = False  # needs max_documents or max_tokens

    # caps, applied in document order before the train/val split
    max_documents: Optional[int] = None
    max_tokens: Optional[int] = None  # whole documents are kept until this many tokens

    # tokenizer and split
    # an existing tokenizer to encode with (tokenizer.model | tokenizer.json | checkpoint or
    # HF dir); null = train gqalab's BPE on the train split, of vocab_size pieces
    tokenizer: Optional[str] = None
    vocab_size: int = 0  # 0 = auto, suited to the corpus size (4096 for pystdlib)
    val_fraction: float = 0.05
    seed: int = 0  # salts the document-id hash that assigns train/val

    # execution
    num_proc: int = 0  # tokenizing processes; 0 = auto (cpu count, at most 8)
    cache_dir: str = ".cache/gqalab/data"  # relative to the working directory
