"""prepare_data: packing, split, cache, caps, bad input and the CLI, on tiny corpora."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import data.prepare as prepare_module
from data.config import DataConfig, DataError
from data.prepare import prepare_data
from data.tokenizer import Tokenizer
from hf_fixtures import byte_bpe_tokenizer, llama_spm_model

REPO = Path(__file__).resolve().parents[1]

SNIPPET = '''\
def {name}(items, limit={n}):
\t"""Tabs, CRLF, trailing spaces and unicode must survive: é 日本 🎉"""\r
    total = 0   \n
    for item in items:
        if item > limit:
            total += item  # keep  two  spaces
    return total
'''


def make_corpus(root: Path, n_docs: int = 40) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc{i:03d}.py").write_bytes(SNIPPET.format(name=f"f{i}", n=i).encode())
    (root / "long.py").write_text("x = '" + "long line " * 5000 + "'\n")  # 50 kB, one line
    return root


def files_cfg(corpus: Path, cache: Path, **kw) -> DataConfig:
    return DataConfig(source="text_files", files=[str(corpus / "*.py")], cache_dir=str(cache), **kw)


def documents_in(bin_path: Path, prepared) -> list:
    """Decode a bin back into documents, splitting at EOS."""
    tokens = np.fromfile(bin_path, dtype=prepared.dtype)
    tok = prepared.tokenizer()
    assert tokens[-1] == tok.eos_id  # every document, the last too, ends in EOS
    ends = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode(tokens[s:e].tolist()) for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    corpus = make_corpus(root / "corpus")
    cfg = files_cfg(corpus, root / "cache", val_fraction=0.2)
    return corpus, cfg, prepare_data(cfg, progress=False)


def test_bins_decode_to_the_documents_in_order(prepared):
    corpus, cfg, out = prepared
    originals = {str(p): p.read_bytes().decode() for p in sorted(corpus.glob("*.py"))}
    train, val = documents_in(out.train_bin, out), documents_in(out.val_bin, out)
    assert train and val
    assert sorted(train + val) == sorted(originals.values())  # nothing lost, nothing twice
    assert not set(train) & set(val)
    order = list(originals.values())
    for part in (train, val):  # each split keeps the corpus order
        positions = [order.index(doc) for doc in part]
        assert positions == sorted(positions)


def test_meta_records_what_was_built(prepared):
    _, cfg, out = prepared
    meta = json.loads((out.dir / "meta.json").read_text())
    assert meta == out.meta and not out.cached
    assert meta["dtype"] == "uint16" and out.dtype is np.uint16
    tok = Tokenizer.load(out.tokenizer_path)
    assert meta["vocab_size"] == out.vocab_size == tok.vocab_size
    assert meta["tokenizer_sha256"] == tok.sha256()
    assert (meta["bos_id"], meta["eos_id"], meta["pad_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert meta["tokens"]["train"] == os.path.getsize(out.train_bin) // 2
    assert meta["tokens"]["val"] == os.path.getsize(out.val_bin) // 2
    assert meta["documents"]["train"] + meta["documents"]["val"] == 41
    assert 0 < meta["tokens_per_byte"] < 1
    assert re.match(r"data text_files: prepared in [\d.]+ s: 41 documents \(\d+ train / \d+ val\)",
                    out.summary)


def test_split_is_deterministic_and_per_document(prepared, tmp_path):
    corpus, cfg, out = prepared
    # an independent run elsewhere builds byte-identical files
    again = prepare_data(files_cfg(corpus, tmp_path / "cache2", val_fraction=0.2), progress=False)
    for name in ("train.bin", "val.bin", "tokenizer.model"):
        assert (again.dir / name).read_bytes() == (out.dir / name).read_bytes()


def test_more_documents_do_not_move_old_ones_between_splits(tmp_path):
    # the split hashes each document's id (its path), not its position in the corpus
    corpus = make_corpus(tmp_path / "corpus", n_docs=30)
    small = prepare_data(files_cfg(corpus, tmp_path / "cache", val_fraction=0.2), progress=False)
    make_corpus(corpus, n_docs=80)  # docs 30..79 join the same folder
    grown = prepare_data(files_cfg(corpus, tmp_path / "cache", val_fraction=0.2), progress=False)
    old_train, old_val = documents_in(small.train_bin, small), documents_in(small.val_bin, small)
    new_train, new_val = documents_in(grown.train_bin, grown), documents_in(grown.val_bin, grown)
    assert set(old_train) <= set(new_train) and set(old_val) <= set(new_val)
    assert len(new_val) > len(old_val)


def test_second_prepare_does_no_work_and_touch_rebuilds(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus", n_docs=10)
    cfg = files_cfg(corpus, tmp_path / "cache")
    first = prepare_data(cfg, progress=False)
    stamp = first.train_bin.stat().st_mtime_ns

    def no_work(*args, **kwargs):
        raise AssertionError("a cache hit must not build")

    with monkeypatch.context() as m:
        m.setattr(prepare_module, "build", no_work)
        second = prepare_data(cfg, progress=False)
    assert second.cached and "cached, nothing to do" in second.summary
    assert second.dir == first.dir and second.train_bin.stat().st_mtime_ns == stamp
    assert second.meta == first.meta

    os.utime(corpus / "doc003.py")  # same bytes, new mtime: rebuilt like make would
    touched = prepare_data(cfg, progress=False)
    assert not touched.cached and touched.dir != first.dir
    (corpus / "doc003.py").write_text("def changed():\n    pass\n")
    edited = prepare_data(cfg, progress=False)
    assert not edited.cached and edited.dir not in (first.dir, touched.dir)
    assert "def changed():\n    pass\n" in documents_in(edited.train_bin, edited) + \
        documents_in(edited.val_bin, edited)


def test_a_build_published_side_by_side_first_is_kept(tmp_path, monkeypatch):
    """Another process published the same key while we built: its files stay untouched
    (same inodes, so open readers keep them) and our build leaves nothing behind."""
    corpus = make_corpus(tmp_path / "corpus", n_docs=10)
    cfg = files_cfg(corpus, tmp_path / "cache")
    first = prepare_data(cfg, progress=False)
    files = sorted(first.dir.iterdir())
    stamps = [(f.name, f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
    real_lookup = prepare_module.load_prepared
    lookups = []

    def not_there_yet(out_dir, key):  # the cache lookup ran before the other one finished
        lookups.append(out_dir)
        return None if len(lookups) == 1 else real_lookup(out_dir, key)

    monkeypatch.setattr(prepare_module, "load_prepared", not_there_yet)
    second = prepare_data(cfg, progress=False)
    assert [(f.name, f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == stamps
    assert lookups and second.dir == first.dir and second.meta == first.meta
    assert leftovers(tmp_path / "cache") == [first.dir.name]


def test_settings_that_change_the_output_change_the_cache(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=10)
    base = prepare_data(files_cfg(corpus, tmp_path / "cache"), progress=False)
    other_seed = prepare_data(files_cfg(corpus, tmp_path / "cache", seed=1), progress=False)
    more_procs = prepare_data(files_cfg(corpus, tmp_path / "cache", num_proc=3), progress=False)
    assert other_seed.dir != base.dir
    assert more_procs.cached and more_procs.dir == base.dir  # num_proc does not change output


def test_max_tokens_keeps_whole_documents(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=40)
    out = prepare_data(files_cfg(corpus, tmp_path / "cache", max_tokens=600), progress=False)
    docs = documents_in(out.train_bin, out) + documents_in(out.val_bin, out)
    total = out.meta["tokens"]["train"] + out.meta["tokens"]["val"]
    assert 0 < total <= 600 and len(docs) < 41
    assert all(doc.startswith("def f") for doc in docs)  # whole snippets, the first ones


def leftovers(cache: Path) -> list:
    return sorted(p.name for p in cache.iterdir() if p.name != "hf") if cache.exists() else []


def test_bad_input_is_one_line_and_leaves_nothing_behind(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=5)
    cache = tmp_path / "cache"
    cases = {
        "too large": files_cfg(corpus, cache, vocab_size=60000),
        "matches no files": DataConfig(source="text_files", files=[str(tmp_path / "nope/*.txt")],
                                       cache_dir=str(cache)),
        "no documents": DataConfig(source="text_files", files=[str(tmp_path / "empty*.txt")],
                                   cache_dir=str(cache)),
        "2 or more": DataConfig(source="text_files", files=[str(corpus / "doc000.py")],
                                cache_dir=str(cache)),
        "val_fraction": files_cfg(corpus, cache, val_fraction=0.0),
    }
    (tmp_path / "empty1.txt").write_text("")
    (tmp_path / "empty2.txt").write_text("")
    for expected, cfg in cases.items():
        with pytest.raises(DataError, match=expected) as e:
            prepare_data(cfg, progress=False)
        assert "\n" not in str(e.value)
        assert leftovers(cache) == [], expected


def test_accepts_a_dictconfig(tmp_path):
    from omegaconf import OmegaConf

    corpus = make_corpus(tmp_path / "corpus", n_docs=4)
    cfg = OmegaConf.structured(files_cfg(corpus, tmp_path / "cache"))
    assert prepare_data(cfg, progress=False).meta["source"] == "text_files"


def run_cli(*overrides, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "data.prepare", *overrides], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_prepares_then_says_cached_and_errors_exit_2(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=6)
    args = ["data=text_files", f"data.files=[{corpus}/*.py]", "data.cache_dir=cache"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip().splitlines()[-1].startswith("data text_files: prepared in")
    second = run_cli(*args, cwd=tmp_path)
    assert "cached, nothing to do" in second.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "corpus"]  # no hydra litter

    bad = run_cli("data=text_files", "data.files=[missing/*.txt]", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: data.files entry 'missing/*.txt' matches no files (from {tmp_path}); fix the path or glob"
    ]


def test_compose_rejects_bad_types():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "configs")):
            for group in ("pystdlib", "text_files", "hub"):
                cfg = compose("prepare", overrides=[f"data={group}"])
                assert cfg.data.source == group
            with pytest.raises(ConfigCompositionException, match="vocab_size"):
                compose("prepare", overrides=["data.vocab_size=abc"])
    finally:
        GlobalHydra.instance().clear()


# ---------------------------------------------------------------- a given tokenizer

def test_given_tokenizer_frames_documents_as_transformers_and_caches_by_bytes(tmp_path, hf_llama):
    """data.tokenizer=<HF dir>: each document is transformers' encoding (BOS first exactly
    when the tokenizer adds one: the Llama sentencepiece one does, the byte-level BPE not)
    followed by EOS; the bins decode back to the documents; the key is the tokenizer's
    bytes: the same file elsewhere is a hit, a different one a miss."""
    kind, hf_dir, _, hf_tok = hf_llama
    corpus = make_corpus(tmp_path / "corpus", n_docs=12)
    cfg = files_cfg(corpus, tmp_path / "cache", val_fraction=0.2, tokenizer=str(hf_dir))
    out = prepare_data(cfg, progress=False)
    assert out.meta["add_bos"] is (kind == "spm") and not (out.dir / "config.json").exists()
    docs = {p.read_bytes().decode() for p in corpus.glob("*.py")}
    expected = {}
    for doc in docs:  # transformers' own framing: its BOS (Llama only), the text, EOS
        ids = hf_tok(doc)["input_ids"] + [hf_tok.eos_token_id]
        expected[tuple(ids)] = doc
    found = []
    for bin_path in (out.train_bin, out.val_bin):
        tokens = np.fromfile(bin_path, dtype=out.dtype).tolist()
        ends = [i for i, t in enumerate(tokens) if t == hf_tok.eos_token_id]
        start = 0
        for end in ends:
            found.append(tuple(tokens[start:end + 1]))
            start = end + 1
    assert sorted(found) == sorted(expected)  # every document once, framed as transformers
    assert sorted(documents_in(out.train_bin, out) + documents_in(out.val_bin, out)) == sorted(docs)

    moved = tmp_path / "elsewhere"
    shutil.copytree(hf_dir, moved)
    again = prepare_data(files_cfg(corpus, tmp_path / "cache", val_fraction=0.2,
                                   tokenizer=str(moved)), progress=False)
    assert again.cached and again.dir == out.dir
    other = tmp_path / "other"
    (llama_spm_model if kind == "spm" else byte_bpe_tokenizer)(other, vocab_size=380 if kind == "spm" else 300)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, other / name)
    miss = prepare_data(files_cfg(corpus, tmp_path / "cache", val_fraction=0.2,
                                  tokenizer=str(other)), progress=False)
    assert not miss.cached and miss.dir != out.dir
    assert miss.meta["tokenizer_sha256"] != out.meta["tokenizer_sha256"]


def test_given_tokenizer_over_65535_ids_writes_uint32(tmp_path, bpe_json_path):
    spec = json.loads(bpe_json_path.read_text())
    spec["model"]["vocab"]["<big>"] = 70_000  # an added token far above 2**16
    spec["added_tokens"].append({"id": 70_000, "content": "<big>", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": False})
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(json.dumps(spec))
    (tmp_path / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.py").write_text(f"x = {i}  # <big> id\n")
    out = prepare_data(files_cfg(corpus, tmp_path / "cache", val_fraction=0.3,
                                 tokenizer=str(tmp_path / "tok" / "tokenizer.json")),
                       progress=False)
    tokens = np.fromfile(out.train_bin, dtype=out.dtype)
    assert out.dtype is np.uint32 and out.meta["vocab_size"] == 70_001
    assert 70_000 in tokens.tolist()
    assert sorted(documents_in(out.train_bin, out) + documents_in(out.val_bin, out)) == \
        sorted(p.read_text() for p in corpus.glob("*.py"))


def test_given_tokenizer_errors_are_one_line(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=4)
    with pytest.raises(DataError, match="holds no tokenizer.model, tokenizer.json or vocab.json"):
        prepare_data(files_cfg(corpus, tmp_path / "cache", tokenizer=str(corpus)), progress=False)
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="not a readable tokenizer.model"):
        prepare_data(files_cfg(corpus, tmp_path / "cache", tokenizer=str(tmp_path / "bad.model")),
                     progress=False)
    assert not (tmp_path / "cache").exists()  # nothing written


def test_whole_build_is_every_document_in_order_and_one_document_is_enough(tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_docs=3)
    cfg = files_cfg(corpus, tmp_path / "cache")
    whole = prepare_data(cfg, progress=False, whole=True)
    in_order = [p.read_bytes().decode() for p in sorted(corpus.glob("*.py"))]
    assert documents_in(whole.bin("all"), whole) == in_order
    assert whole.dir != prepare_data(cfg, progress=False).dir  # cached apart from the split
    one = DataConfig(source="text_files", files=[str(corpus / "doc001.py")],
                     cache_dir=cfg.cache_dir)
    single = prepare_data(one, progress=False, whole=True)
    assert documents_in(single.bin("all"), single) == [in_order[1]]
    with pytest.raises(DataError, match="holds the all part"):
        single.bin("val")
    with pytest.raises(prepare_module.TooFewDocuments, match="1 document"):
        prepare_data(one, progress=False)
