"""Streaming decode (data/streaming.py): pushes + flush == the full decode, text as soon
as it is final, byte runs held back until they end."""

import random

from data.streaming import IncrementalDecoder
from test_data_bpe import HOSTILE, tokenizer  # noqa: F401  (the trained BPE fixture)


def stream_decode(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


def test_incremental_decoder_matches_full_decode(tokenizer):
    ids = tokenizer.encode(HOSTILE[:3000])
    pieces, tail = stream_decode(tokenizer, ids)
    assert "".join(pieces) + tail == tokenizer.decode(ids) == HOSTILE[:3000]
    # multi-byte characters come out whole, never as replacement characters
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(ids) // 2  # and it really streams


def test_incremental_decoder_on_random_ids(tokenizer):
    # arbitrary ids, including lone and unfinished byte-fallback sequences
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        pieces, tail = stream_decode(tokenizer, ids)
        assert "".join(pieces) + tail == tokenizer.decode(ids)


def test_incremental_decoder_holds_back_byte_runs(tokenizer):
    ids = tokenizer.encode("🎉")  # not in this vocab: four byte-fallback pieces
    assert len(ids) == 4
    x = tokenizer.encode("e")
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in ids + x] == ["", "", "", "", "🎉e"]
    assert decoder.flush() == ""
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in ids] == ["", "", "", ""] and decoder.flush() == "🎉"


def test_broken_byte_run_decodes_as_transformers_and_streams_the_same(tokenizer):
    """A byte run that is not UTF-8 is one U+FFFD per byte, the valid bytes in it too
    (transformers' ByteFallback), and the stream, which emits a run only once it ends,
    never prints a character the final text does not have."""
    byte_a = tokenizer.sp.piece_to_id("<0x41>")  # "A" as a byte piece, valid alone
    head = tokenizer.encode("🎉")[:2]  # half a character
    ids = tokenizer.encode("e") + [byte_a] + head + tokenizer.encode("s")
    assert tokenizer.decode(ids) == "e\ufffd\ufffd\ufffds"
    decoder = IncrementalDecoder(tokenizer)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == tokenizer.decode(ids)
