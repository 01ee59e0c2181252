"""The BPE tokenizer: exact round trip, long documents, ids, streaming decode."""

import json
import pickle
import random
import shutil

import pytest

from data.config import DataError
from data.tokenizer import (IncrementalDecoder, Tokenizer, chunk_document, load_tokenizer,
                            tokenizer_files, train_tokenizer)

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


# ---------------------------------------------------------------- tokenizer.json, special ids

def test_special_ids_follow_the_order_of_authority(tmp_path, bpe_json_path):
    """tokenizer_config.json > special_tokens_map.json > generation_config.json > config.json;
    each file is removed in turn and the next one decides."""
    shutil.copyfile(bpe_json_path, tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)
    a, b, c, d = (tok.token_id(t) for t in ("a", "b", "c", "d"))
    files = [("tokenizer_config.json", {"eos_token": {"content": "a"}, "bos_token": "b"}),
             ("special_tokens_map.json", {"eos_token": "b"}),
             ("generation_config.json", {"eos_token_id": [c, a], "pad_token_id": d}),
             ("config.json", {"eos_token_id": d, "bos_token_id": a})]
    for name, content in files:
        (tmp_path / name).write_text(json.dumps(content))
    expected = [(a, b, d), (b, a, d), (c, a, d), (d, a, None), (None, None, None)]
    for i, (eos, bos, pad) in enumerate(expected):
        tok = load_tokenizer(tmp_path / "tokenizer.json")
        assert (tok.eos_id, tok.bos_id, tok.pad_id) == (eos, bos, pad), files[i:]
        if i < len(files):
            (tmp_path / files[i][0]).unlink()


def test_add_bos_from_config_else_post_processor(tmp_path, bpe_json_path):
    spec = json.loads(bpe_json_path.read_text())
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": "<|endoftext|>"}')
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path).add_bos is False  # GPT-2 style: nothing added
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [], "special_tokens": {"<|endoftext|>": {
                                  "id": "<|endoftext|>", "ids": [spec["added_tokens"][0]["id"]],
                                  "tokens": ["<|endoftext|>"]}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path).add_bos is True
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<|endoftext|>", "add_bos_token": false}')
    assert load_tokenizer(tmp_path).add_bos is False  # the config has the last word


def _post_processors():
    from tokenizers import processors as p
    template = p.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return {"template": template,
            "sequence": p.Sequence([p.ByteLevel(trim_offsets=False), template]),
            "nested": p.Sequence([p.Sequence([template]), p.ByteLevel()]),
            "roberta": p.RobertaProcessing(("</s>", 1), ("<s>", 0)),
            "bert": p.BertProcessing(("</s>", 1), ("<s>", 0)),
            "not_bos_first": p.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 1)]),
            "eos_last": p.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)]),
            "two_prefixes": p.Sequence([template, p.TemplateProcessing(
                single="</s> $A", special_tokens=[("</s>", 1)])]),
            "two_prefixes_eos_first": p.Sequence([p.TemplateProcessing(
                single="</s> $A", special_tokens=[("</s>", 1)]), template]),
            "byte_level": p.ByteLevel(), "none": None}


@pytest.mark.parametrize("kind", list(_post_processors()))
def test_add_bos_agrees_with_tokenizers_post_processor(tmp_path, kind):
    """add_bos (no add_bos_token in any config) is True iff tokenizers' own
    encode(add_special_tokens=True) puts BOS before the text."""
    from tokenizers import Tokenizer as HFTokenizer, models
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abc ")}}
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.add_special_tokens(["<s>", "</s>"])
    if _post_processors()[kind] is not None:
        tk.post_processor = _post_processors()[kind]
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens_map.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    plain, full = tk.encode("abc", add_special_tokens=False), tk.encode("abc")
    assert plain.ids and 0 not in plain.ids
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 0 and tok.add_bos == (full.ids[0] == tok.bos_id)


def test_tokenizer_json_wins_over_tokenizer_model(tmp_path, spm_model_path, bpe_json_path):
    shutil.copyfile(spm_model_path, tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).file_name == "tokenizer.model"
    shutil.copyfile(bpe_json_path, tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path).file_name == "tokenizer.json"
    assert load_tokenizer(tmp_path / "tokenizer.model").file_name == "tokenizer.model"
    with pytest.raises(DataError, match="not found: pass a tokenizer.model, a tokenizer.json"):
        load_tokenizer(tmp_path / "tok")


@pytest.mark.parametrize("kind", ["spm", "json"])
def test_tokenizer_pickles_by_content(kind, spm_model_path, bpe_json_path):
    tok = load_tokenizer(spm_model_path if kind == "spm" else bpe_json_path)
    text = "def f(x):\n\treturn 'é日本'  \n"
    tok.encode(text)  # builds the backend, which must not travel
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(text) == tok.encode(text) and again.decode(tok.encode(text)) == text
    assert again.identity() == tok.identity()


def test_gpt2_vocab_and_merges_pair(tmp_path, bpe_json_path):
    """GPT-2's slow-tokenizer files alone make the same tokenizer as its tokenizer.json, with
    <|endoftext|> as BOS and EOS unless a config says otherwise; the pair is one model."""
    from tokenizers import Tokenizer as HFTokenizer
    reference = load_tokenizer(bpe_json_path)
    (tmp_path / "vocab.json").write_text(json.dumps(HFTokenizer.from_file(
        str(bpe_json_path)).get_vocab(with_added_tokens=False)))
    with pytest.raises(DataError, match="holds no tokenizer.model, tokenizer.json or vocab.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(DataError, match="has no merges.txt beside it"):
        load_tokenizer(tmp_path / "vocab.json")
    HFTokenizer.from_file(str(bpe_json_path)).model.save(str(tmp_path))  # the real pair
    assert set(tokenizer_files(tmp_path)) == {"vocab.json", "merges.txt"}
    tok = load_tokenizer(tmp_path)
    assert tok.file_name == "vocab.json" and not tok.add_bos
    assert tok.bos_id == tok.eos_id == reference.token_id("<|endoftext|>") and tok.pad_id is None
    assert tok.encode(CODE) == reference.encode(CODE) and tok.decode(tok.encode(CODE)) == CODE
    assert tok.decode([tok.eos_id, *tok.encode("x")]) == "x"  # special: dropped
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(CODE) == tok.encode(CODE) and again.identity() == tok.identity()
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert load_tokenizer(tmp_path).eos_id == 5  # config.json outranks the model's default

    merges = (tmp_path / "merges.txt").read_text()
    (tmp_path / "merges.txt").write_text(merges.rsplit("\n", 2)[0] + "\n")  # one merge less
    assert load_tokenizer(tmp_path).sha256() != tok.sha256()
    (tmp_path / "merges.txt").write_text(merges + "a b c\n")
    with pytest.raises(DataError, match="not a readable vocab.json [+] merges.txt: merges.txt"):
        load_tokenizer(tmp_path)
    shutil.copyfile(bpe_json_path, tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path).file_name == "tokenizer.json"  # as AutoTokenizer does
