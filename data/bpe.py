"""gqalab's own tokenizer: a sentencepiece BPE trained on the corpus.

train_tokenizer trains gqalab's own sentencepiece BPE, which round-trips source code
exactly: sentencepiece's defaults normalise text (collapse spaces, drop the leading one,
NFKC), which destroys indentation. The options below keep every byte: identity
normalisation, no whitespace removal, no dummy prefix, whitespace-only pieces,
and byte fallback for any character outside the learned vocabulary. Training
reads documents from an iterator, so newlines inside a document are ordinary
characters that BPE can merge (":\n", "\n\n"); when trained from a file each
line would be a separate sentence and newlines would never be learned.
"""

import io
import re
from pathlib import Path
from typing import Iterable, Iterator

import sentencepiece as spm

from data.config import DataError
from data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIAL_IDS, UNK_ID, Tokenizer, load_tokenizer

# sentencepiece silently skips sentences longer than this many bytes;
# documents are cut into chunks below it instead (see chunk_document).
MAX_SENTENCE_BYTES = 16384

TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,  # else decode(encode(a) + encode(b)) loses a space
    allow_whitespace_only_pieces=True,
    split_by_whitespace=False,  # pieces may span words: ~11% fewer tokens on code
    character_coverage=0.9995,  # rarer characters go through byte fallback
    max_sentence_length=MAX_SENTENCE_BYTES,
    unk_id=UNK_ID,
    bos_id=BOS_ID,
    eos_id=EOS_ID,
    pad_id=PAD_ID,
)


def chunk_document(text: str, max_bytes: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Cut a document into pieces of at most max_bytes UTF-8 bytes, at line ends
    where possible, so sentencepiece trains on all of it instead of skipping it."""
    if len(text) * 4 <= max_bytes or len(text.encode("utf-8")) <= max_bytes:
        yield text
        return
    chunk, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if chunk and size + n > max_bytes:
            yield "".join(chunk)
            chunk, size = [], 0
        if n > max_bytes:  # one very long line: cut it by characters (<= 4 bytes each)
            step = max_bytes // 4
            for i in range(0, len(line), step):
                yield line[i : i + step]
            continue
        chunk.append(line)
        size += n
    if chunk:
        yield "".join(chunk)


def train_tokenizer(
    documents: Iterable[str], vocab_size: int, out_path, *, hard_vocab_limit: bool = True
) -> Tokenizer:
    """Train a BPE tokenizer on documents and write it to out_path.

    With hard_vocab_limit=False (auto vocab on a tiny corpus) sentencepiece may
    stop short of vocab_size; with True, a vocab the corpus cannot fill is a
    DataError naming the largest size that fits.
    """
    sentences = (chunk for doc in documents for chunk in chunk_document(doc))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            vocab_size=vocab_size,
            hard_vocab_limit=hard_vocab_limit,
            num_threads=2,
            minloglevel=2,  # warnings and errors only
            **TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        raise _vocab_error(str(e), vocab_size) from e
    out_path = Path(out_path)
    out_path.write_bytes(model.getvalue())
    return load_tokenizer(out_path)


# sentencepiece's trainer message -> (the bound it names, what data.vocab_size does wrong,
# the bound's sign, a word when the message names none)
VOCAB_BOUNDS = (
    # "... Vocabulary size too high (5000). Please set it to a value <= 304."
    ("Vocabulary size too high", r"<= (\d+)", "is too large for this corpus", "<=", " smaller"),
    # "... Vocabulary size is smaller than required_chars. 100 vs 273. ..."
    ("smaller than required_chars", r"\d+ vs (\d+)",
     "cannot hold this corpus's characters and byte pieces", ">=", " larger"),
)


def _vocab_error(message: str, vocab_size: int) -> Exception:
    """sentencepiece's trainer errors, reworded as one-line fixes."""
    for marker, number, problem, sign, word in VOCAB_BOUNDS:
        if marker in message:
            found = re.search(number, message)
            bound = f"{sign}{found.group(1)}" if found else word
            return DataError(f"data.vocab_size={vocab_size} {problem}; set "
                             f"data.vocab_size{bound}, or data.vocab_size=0 for auto")
    if "insert_id" in message:  # "... [insert_id(trainer_spec_.pad_id(), ...)]"
        return DataError(
            f"data.vocab_size={vocab_size} is below the {len(SPECIAL_IDS)} special ids "
            f"(unk, bos, eos, pad) alone; set data.vocab_size=0 for auto, or e.g. 4096"
        )
    if "sentences_.empty()" in message:
        return DataError("the train split has no text to train a tokenizer on; add documents")
    return RuntimeError(f"sentencepiece training failed: {message.strip()}")
