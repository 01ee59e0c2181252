"""The run dir and checkpoint layout train.py writes, and what every command reads of it.

    <run dir>/
      .lock                       held by the one train.py writing here (model/lock.py)
      .hydra/                     the config it ran with; resume-*-overrides.yaml per resume
      metrics.jsonl, loss.png
      checkpoints/
        step_N/                   a checkpoint (model/checkpoint.py) + train_config.yaml,
                                  trainer_state.json, accelerate/ (optimizer, RNG)
        latest -> step_N          swapped in one rename: always a complete checkpoint
"""
from __future__ import annotations

from pathlib import Path

from data.tokenizer import Tokenizer, load_tokenizer, tokenizer_files


def check_tokenizer(given: Tokenizer | str | Path | None, source: Path,
                    error: type[Exception]) -> None:
    """The tokenizer data is (or will be) tokenized with must be the one source ships, by
    content: its ids are the only ones the model knows. A source without one takes any."""
    if given is None or not tokenizer_files(source):
        return
    given = given if isinstance(given, Tokenizer) else load_tokenizer(given)
    if given.sha256() != load_tokenizer(source).sha256():
        raise error(f"the data's tokenizer differs from the tokenizer {source} ships: the model "
                    f"needs its own token ids; drop data.tokenizer and data.vocab_size "
                    f"overrides, or pass data.tokenizer={source}")
