"""gqalab's BPE (data/bpe.py): exact round trip, long documents, ids, one-line vocab errors."""

import pytest

from data.bpe import chunk_document, train_tokenizer
from data.config import DataError
from data.tokenizer import Tokenizer

CODE = '''\
import os


class Greeter:
    """Says hello."""

    def __init__(self, name: str) -> None:
        self.name = name

    def greet(self, times=1):
        for _ in range(times):
            print(f"hello, {self.name}!")
        return None
'''

HOSTILE = (
    "def f(x):\n\tif x:\n\t\treturn  x   \n    else:\t# a tab\n        pass\n\n\n\n"
    "windows line\r\nendings\r\n\r\n"
    "trailing spaces   \n   \n \t \n"
    "unicode: héllo wörld — naïve café, e\u0301, 日本語, Ελληνικά, русский\n"
    "emoji: 🎉👍🏽 👨\u200d👩\u200d👧 \U0001F600\n"
    "odd: zero width \u200b, nbsp\u00a0, bom \ufeff, form feed \x0c, nul \x00, esc \x1b[0m\n"
    "    indented after blank lines\n"
    + "very_long_line = '" + "spam and eggs " * 3000 + "'\n"
    + "x" * 20000  # one 20 kB line without a newline at the end
)

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    docs = [CODE.replace("Greeter", f"Greeter{i}") for i in range(40)]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(docs, vocab_size=400, out_path=path, hard_vocab_limit=False)

def test_round_trip_is_exact_on_hostile_text(tokenizer):
    assert tokenizer.decode(tokenizer.encode(HOSTILE)) == HOSTILE
    for line in HOSTILE.splitlines(keepends=True):  # also piece by piece
        assert tokenizer.decode(tokenizer.encode(line)) == line


def test_encodings_concatenate(tokenizer):
    # packing joins documents' ids; that must decode to the joined texts
    parts = ["  def f():", "\n\treturn 1\n", "  🎉 trailing  ", "\r\n"]
    ids = [i for part in parts for i in tokenizer.encode(part)]
    assert tokenizer.decode(ids) == "".join(parts)


def test_newlines_and_indentation_are_learned(tokenizer):
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert any("\n" in p and len(p) > 1 for p in pieces), "no merge contains a newline"
    assert any(set(p) == {"▁"} and len(p) >= 4 for p in pieces), "no indentation piece"


def test_special_ids_and_no_bos_eos_added(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, 3)
    ids = tokenizer.encode("hello")
    assert ids and not {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id} & set(ids)
    assert tokenizer.decode(ids + [tokenizer.eos_id]) == "hello"


def test_load_gives_the_same_tokenizer(tokenizer):
    loaded = Tokenizer.load(tokenizer.path)
    assert loaded.encode(HOSTILE) == tokenizer.encode(HOSTILE)
    assert loaded.sha256() == tokenizer.sha256()


def test_documents_longer_than_the_sentence_limit_are_learned(tmp_path):
    # the only occurrences of "qwzx" are in one 200 kB single-line document, far above
    # sentencepiece's sentence limit: it must be chunked and learned, not skipped
    short_docs = [f"item {i} = value {i}\n" for i in range(50)]
    long_doc = "qwzx " * 40000
    tok = train_tokenizer(short_docs + [long_doc], 400, tmp_path / "t.model", hard_vocab_limit=False)
    assert len(tok.encode("qwzx")) == 1


def test_chunk_document_keeps_every_character():
    text = "short line\n" * 3000 + "y" * 50000 + "\nend é🎉\n"
    chunks = list(chunk_document(text, max_bytes=1000))
    assert "".join(chunks) == text
    assert all(len(c.encode("utf-8")) <= 1000 for c in chunks)


def test_vocab_too_large_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match=r"data.vocab_size=5000 is too large.*data.vocab_size<=\d+") as e:
        train_tokenizer([CODE], 5000, tmp_path / "t.model")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"data.vocab_size=100 cannot hold.*>=\d+"):
        train_tokenizer([CODE], 100, tmp_path / "t.model")
