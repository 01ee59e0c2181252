"""Tokenizer loading (data/tokenizer.py): tokenizer.json vs tokenizer.model, special ids,
add_bos, pickling, GPT-2's vocab.json + merges.txt."""

import json
import pickle
import shutil

import pytest

from data.config import DataError
from data.tokenizer import load_tokenizer, tokenizer_files
from test_data_bpe import CODE

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
