"""Corpus sources: stdlib enumeration, local files, Hub errors and local datasets."""

import json
import os
from pathlib import Path

import pytest

from data.config import DataConfig, DataError
from data.sources import (
    STDLIB_EXCLUDED_DIRS,
    content_hash,
    load_documents,
    pystdlib_dir,
    pystdlib_files,
    split_text,
)


def rows(ds):
    return list(zip(ds["id"], ds["text"]))


def test_pystdlib_enumerates_the_same_sorted_files_twice():
    first, second = pystdlib_files(), pystdlib_files()
    assert first == second
    relative = [p.relative_to(pystdlib_dir()).as_posix() for p in first]
    assert relative == sorted(relative)
    assert {"os.py", "json/__init__.py", "asyncio/events.py"} <= set(relative)
    assert len(first) > 300
    for p in first:
        assert p.suffix == ".py"
        assert not STDLIB_EXCLUDED_DIRS & set(p.relative_to(pystdlib_dir()).parts[:-1]), p


def test_pystdlib_skips_tests_site_packages_and_demos(tmp_path):
    kept = ["a.py", "pkg/__init__.py", "pkg/mod.py", "pkg/sub/deep.py", "testing.py"]
    dropped = ["test/test_a.py", "pkg/tests/t.py", "site-packages/x/y.py", "idlelib/run.py",
               "idlelib/idle_test/t.py", "turtledemo/demo.py", "__pycache__/a.py", "notes.txt"]
    for name in kept + dropped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    found = [p.relative_to(tmp_path).as_posix() for p in pystdlib_files(tmp_path)]
    assert found == sorted(kept)


def test_pystdlib_content_hash_is_stable():
    cfg = DataConfig(source="pystdlib")
    assert content_hash(cfg) == content_hash(cfg)


def test_pystdlib_content_hash_follows_every_document(tmp_path, monkeypatch):
    """On a stand-in stdlib: the hash is the same while nothing changes, and differs when one
    document's bytes change (same length, same mtime), one is renamed, added or removed."""
    import data.sources as sources
    root = tmp_path / "lib"
    for name in ("a.py", "pkg/__init__.py", "pkg/mod.py"):
        write(root / name, f"# {name}\nx = 1\n")
    monkeypatch.setattr(sources, "pystdlib_dir", lambda: root)
    cfg = DataConfig(source="pystdlib")
    first = content_hash(cfg)
    assert content_hash(cfg) == first
    seen = {first}

    def changed() -> str:
        h = content_hash(cfg)
        assert h not in seen
        seen.add(h)
        return h

    mod = root / "pkg/mod.py"
    stat = mod.stat()
    mod.write_text(mod.read_text().replace("x = 1", "x = 2"))  # one byte, same length
    os.utime(mod, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    assert mod.stat().st_size == stat.st_size and mod.stat().st_mtime_ns == stat.st_mtime_ns
    changed()
    (root / "a.py").rename(root / "b.py")
    changed()
    write(root / "pkg/new.py", "y = 3\n")
    changed()
    (root / "pkg/new.py").unlink()
    (root / "b.py").rename(root / "a.py")
    mod.write_text(mod.read_text().replace("x = 2", "x = 1"))
    os.utime(mod, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert content_hash(cfg) == first  # the same files again: the same corpus


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    return path


def files_cfg(tmp_path, patterns, **kw) -> DataConfig:
    return DataConfig(source="text_files", files=patterns, cache_dir=str(tmp_path / "cache"), **kw)


def test_text_files_one_document_per_file_bytes_intact(tmp_path):
    a = write(tmp_path / "docs/a.txt", b"first\r\nwith CRLF  \r\n\ttab\n")
    b = write(tmp_path / "docs/sub/b.md", "second 🎉\n\n\n")
    write(tmp_path / "docs/empty.txt", "")  # empty documents are dropped
    ds = load_documents(files_cfg(tmp_path, [str(tmp_path / "docs/**/*.*")]))
    assert rows(ds) == [(str(a), "first\r\nwith CRLF  \r\n\ttab\n"), (str(b), "second 🎉\n\n\n")]


def test_text_files_keep_pattern_order_and_drop_duplicates(tmp_path):
    z = write(tmp_path / "z.txt", "z")
    a = write(tmp_path / "a.txt", "a")
    ds = load_documents(files_cfg(tmp_path, [str(z), str(tmp_path / "*.txt")]))
    assert ds["id"] == [str(z), str(a)]


def test_text_files_split_by_line_and_paragraph():
    text = "one\r\n\n  two  \n \t \n\n    three\nfour\n"
    assert list(split_text(text, "line")) == [(":1", "one"), (":3", "  two  "),
                                              (":6", "    three"), (":7", "four")]
    assert list(split_text(text, "paragraph")) == [("#1", "one"), ("#2", "  two  "),
                                                   ("#3", "    three\nfour")]


def test_undecodable_files_are_reported_and_skipped(tmp_path, capsys):
    good = write(tmp_path / "good.txt", "fine\n")
    for i in range(5):
        write(tmp_path / f"bad{i}.bin", b"\xff\xfe\x00binary" + bytes([i]))
    ds = load_documents(files_cfg(tmp_path, [str(tmp_path / "*")]))
    assert rows(ds) == [(str(good), "fine\n")]
    err = capsys.readouterr().err
    assert "skipped 5 file(s) that are not UTF-8" in err and "bad0.bin" in err


def test_only_undecodable_files_is_an_error(tmp_path):
    write(tmp_path / "bad.bin", b"\xff\xfe")
    with pytest.raises(DataError, match="no readable text files"):
        load_documents(files_cfg(tmp_path, [str(tmp_path / "bad.bin")]))


def test_glob_matching_nothing_names_the_pattern(tmp_path):
    write(tmp_path / "a.txt", "a")
    with pytest.raises(DataError, match=r"'.*nothing\*\.txt' matches no files"):
        load_documents(files_cfg(tmp_path, [str(tmp_path / "a.txt"), str(tmp_path / "nothing*.txt")]))
    with pytest.raises(DataError, match="needs files"):
        load_documents(files_cfg(tmp_path, []))


def test_text_files_hash_follows_content(tmp_path):
    path = write(tmp_path / "a.txt", "version 1\n")
    cfg = files_cfg(tmp_path, [str(path)])
    before = content_hash(cfg)
    assert content_hash(cfg) == before
    path.write_text("version 2\n")
    assert content_hash(cfg) != before
    assert content_hash(files_cfg(tmp_path, [str(path)], split_by="line")) != content_hash(cfg)


def test_unknown_source_and_split_by(tmp_path):
    with pytest.raises(DataError, match="data.source='nope' is unknown"):
        load_documents(DataConfig(source="nope"))
    with pytest.raises(DataError, match="data.split_by='word' is unknown"):
        load_documents(files_cfg(tmp_path, ["x"], split_by="word"))


def test_hub_offline_fails_at_once_naming_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = DataConfig(source="hub", hub_name="roneneldan/TinyStories", cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="HF_HUB_OFFLINE=1.*data=pystdlib.*data=text_files"):
        load_documents(cfg)


def test_hub_streaming_needs_a_cap(tmp_path):
    cfg = DataConfig(source="hub", hub_name="x/y", streaming=True, cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="needs a cap"):
        load_documents(cfg)


@pytest.fixture
def local_dataset(tmp_path):
    """A dataset folder that `datasets` opens like a Hub repo, offline."""
    lines = [json.dumps({"story": f"story {i}\n  indented", "n": i}) for i in range(30)]
    lines.insert(3, json.dumps({"story": "", "n": -1}))  # an empty row is dropped
    write(tmp_path / "ds/train.jsonl", "\n".join(lines) + "\n")
    return tmp_path / "ds"


def hub_cfg(tmp_path, name, **kw):
    return DataConfig(source="hub", hub_name=str(name), text_column="story",
                      cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_local_dataset_documents_in_order(tmp_path, local_dataset, streaming):
    # the first 10 rows, less the empty one: ids are row numbers
    ds = load_documents(hub_cfg(tmp_path, local_dataset, streaming=streaming, max_documents=10))
    assert ds.column_names == ["id", "text"]
    assert ds["text"] == [f"story {i}\n  indented" for i in range(9)]
    assert ds["id"] == ["0", "1", "2", "4", "5", "6", "7", "8", "9"]


def test_hub_missing_text_column_lists_the_columns(tmp_path, local_dataset):
    cfg = hub_cfg(tmp_path, local_dataset)
    cfg.text_column = "text"
    with pytest.raises(DataError, match=r"column 'text' not in .*story, n.*data.text_column="):
        load_documents(cfg)
    cfg.text_column = "n"
    with pytest.raises(DataError, match="not text"):
        load_documents(cfg)


def test_hub_unknown_split_and_missing_dataset(tmp_path, local_dataset):
    with pytest.raises(DataError, match="no split 'validation'.*data.hub_split"):
        load_documents(hub_cfg(tmp_path, local_dataset, hub_split="validation"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="data.hub_name"):
        load_documents(hub_cfg(tmp_path, tmp_path / "empty"))
