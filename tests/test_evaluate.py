"""The evaluate.py command against independent references: transformers' loss per window,
bytes decoded by the tokenizer, an int8 copy, a run dir's latest, two processes, and the
attention options end to end. The packages' own tests: tests/test_evaluation_*.py."""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate as ev  # noqa: E402
import evaluation.scoring as scoring  # noqa: E402
from data.config import DataConfig  # noqa: E402
from data.loader import IGNORE_INDEX, eval_batches  # noqa: E402
from data.prepare import prepare_data  # noqa: E402
from data.tokenizer import load_tokenizer, tokenizer_files  # noqa: E402
from helpers import one_thread  # noqa: E402,F401  (autouse: one thread)
from hf_fixtures import CORPUS  # noqa: E402
from store.checkpoint import save_checkpoint  # noqa: E402
from store.hf import import_hf  # noqa: E402
from store.quantize import quantize_checkpoint  # noqa: E402
from store.source import open_source  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """ASCII prose and code, one document per file (bytes then decode exactly)."""
    root = tmp_path_factory.mktemp("corpus")
    for i, doc in enumerate(CORPUS[:5] * 3):
        text = doc.encode("ascii", "ignore").decode() + f"# file {i}\n"
        (root / f"doc{i:02d}.txt").write_text(text * 2)
    return root


def config(ckpts, corpus: Path, **kw) -> ev.EvaluateConfig:
    data = DataConfig(source="text_files", files=[str(corpus / "*.txt")], num_proc=1,
                      cache_dir=str(corpus.parent / "cache"))
    ckpts = [str(c) for c in (ckpts if isinstance(ckpts, list) else [ckpts])]
    return ev.EvaluateConfig(ckpts=ckpts, data=data, seq_len=SEQ, device="cpu", **kw)


def split_ids(ckpt: Path, cfg: ev.EvaluateConfig, split: str = "all") -> np.ndarray:
    source = ev.Source(str(ckpt), open_source(ckpt))
    prepared = prepare_data(ev.corpus_data(cfg, source), progress=False, whole=split == "all")
    return scoring.split_tokens(prepared, split)


@pytest.fixture(scope="module")
def llama_ckpts(hf_llama, tmp_path_factory) -> dict[str, Path]:
    """The tiny HF Llama as an HF dir, imported as a gqalab checkpoint, and its int8 copy."""
    kind, hf_dir, _, _ = hf_llama
    out = tmp_path_factory.mktemp(f"ckpts_{kind}")
    save_checkpoint(out / "float", import_hf(hf_dir), files=tokenizer_files(hf_dir))
    quantize_checkpoint(out / "float", out / "int8")
    return {"hf": hf_dir, "float": out / "float", "int8": out / "int8"}


# ---------------------------------------------------------------- NLL and windows

def hf_window_losses(model, ids: np.ndarray, seq_len: int) -> list[float]:
    """transformers' own loss, model(ids, labels=ids).loss, on each non-overlapping window."""
    ids = torch.from_numpy(ids.astype(np.int64))
    with torch.no_grad():
        return [model(w[None], labels=w[None]).loss.item()
                for w in ids.unfold(0, seq_len + 1, seq_len)]


def test_nll_equals_transformers_loss_per_window_llama(hf_llama, corpus):
    _, hf_dir, model, _ = hf_llama
    check_against_transformers(hf_dir, model, corpus)


def test_nll_equals_transformers_loss_per_window_gpt2_neox(hf_family, corpus):
    _, hf_dir, model, _ = hf_family
    check_against_transformers(hf_dir, model, corpus)


def check_against_transformers(hf_dir: Path, model, corpus: Path) -> None:
    cfg = config(hf_dir, corpus)
    row = ev.run(cfg)["rows"][0]
    ids = split_ids(hf_dir, cfg)
    losses = hf_window_losses(model, ids, SEQ)  # every window: all of the split
    assert row["windows"] == len(losses) == (len(ids) - 1) // SEQ
    assert row["tokens"] == len(losses) * SEQ
    assert row["nll"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert row["ppl"] == pytest.approx(math.exp(row["nll"]), rel=1e-9)


# ---------------------------------------------------------------- bits per byte

def test_bits_per_byte_is_nll_over_the_decoded_bytes_of_the_scored_tokens(llama_ckpts, corpus):
    ckpt = llama_ckpts["float"]
    cfg = config(ckpt, corpus, stride=20, max_windows=7)  # sliding, and cut by max_windows
    row = ev.run(cfg)["rows"][0]
    tok = load_tokenizer(ckpt)
    ids = split_ids(ckpt, cfg)
    n_bytes = 0
    for x, y in eval_batches(ids, None, SEQ, 4, stride=20, max_windows=7):
        for xr, yr in zip(x.tolist(), y.tolist()):  # a window's scored targets: one run of text
            first = next(t for t, target in enumerate(yr) if target != IGNORE_INDEX)
            n_bytes += decoded_bytes(tok, xr[first], yr[first:])
    assert row["bytes"] == n_bytes
    assert row["tokens"] == scoring.scored_tokens(SEQ, 20, 7)  # as announced before scoring
    assert row["bits_per_byte"] == pytest.approx(row["nll"] * row["tokens"] / math.log(2) / n_bytes,
                                                 rel=1e-9)


def decoded_bytes(tok, before: int, ids: list[int]) -> int:
    """UTF-8 bytes of ids as tok.decode spells them, documents (between BOS/EOS) decoded
    alone; a run that starts mid-document after token `before` counts what decoding it
    adds after `before` (sentencepiece drops a leading space of a decode's first piece)."""
    total, run = 0, []
    for i in ids + [None]:
        if i is not None and i not in (tok.bos_id, tok.eos_id):
            run.append(i)
            continue
        if before in (tok.bos_id, tok.eos_id):
            total += len(tok.decode(run).encode())
        else:
            total += len(tok.decode([before] + run).encode()) - len(tok.decode([before]).encode())
        run, before = [], i
    return total


# ---------------------------------------------------------------- sources

def test_int8_within_one_percent_and_run_dir_evaluates_latest(llama_ckpts, corpus, tmp_path):
    run = tmp_path / "run" / "checkpoints"
    shutil.copytree(llama_ckpts["float"], run / "step_1")
    shutil.copytree(llama_ckpts["int8"], run / "step_2")
    (run / "latest").symlink_to("step_2")
    cfg = config([llama_ckpts["float"], llama_ckpts["int8"], run.parent], corpus,
                 max_windows=8, reference=0, out=str(tmp_path / "eval.json"))
    result = ev.run(cfg)
    floats, int8, latest = result["rows"]
    assert (floats["kind"], int8["kind"], latest["kind"]) == ("gqalab", "int8", "int8")
    assert int8["nll"] != floats["nll"]
    assert int8["nll"] == pytest.approx(floats["nll"], rel=0.01)
    assert latest["path"] == str((run / "step_2").resolve()) and latest["nll"] == int8["nll"]
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    assert floats["delta_nll"] == 0 and int8["delta_nll"] == int8["nll"] - floats["nll"]
    # paired over the same windows: the reference differs from itself by exactly nothing
    assert floats["delta_nll_se"] == 0 and floats["beyond_noise"] is False
    assert 0 < int8["delta_nll_se"] < int8["nll_se"]  # the windows' shared difficulty cancels
    assert result["split"] == "all"  # no train_config.yaml: nothing was held out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_numbers_of_one(corpus, tmp_path):
    from hf_fixtures import tiny_hf_llama
    tiny_hf_llama(tmp_path / "hf", "bpe")
    ckpt = tmp_path / "hf"
    args = [f"ckpt={ckpt}", "data=text_files", f"data.files=[{corpus}/*.txt]", "data.num_proc=1",
            f"data.cache_dir={corpus.parent / 'cache'}", f"seq_len={SEQ}", "batch_size=2",
            "stride=24", "max_windows=9"]  # 9 windows: one rank gets a padding row
    env = {**ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), str(ROOT / "evaluate.py"), *args,
                           f"out={tmp_path / 'two.json'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = ev.run(config(ckpt, corpus, batch_size=4, stride=24, max_windows=9))
    assert two["processes"] == 2 and one["processes"] == 1
    for key in ("tokens", "windows", "bytes"):
        assert two["rows"][0][key] == one["rows"][0][key], key
    assert two["rows"][0]["nll"] == pytest.approx(one["rows"][0]["nll"], rel=1e-6)
    assert two["rows"][0]["nll_se"] == pytest.approx(one["rows"][0]["nll_se"], rel=1e-6)
    assert proc.stdout.count("bits/byte") == 1  # one table, from the main process


# ---------------------------------------------------------------- attention

def test_attention_options_print_and_plot(llama_ckpts, corpus, tmp_path, capsys):
    ckpts = [llama_ckpts["float"], llama_ckpts["int8"]]
    att = ev.AttentionOptions(prompt="def f(x):", layer=1, head=3, kl=True, kl_windows=2,
                              plot=str(tmp_path / "att.png"), kl_plot=str(tmp_path / "kl.png"))
    result = ev.run(config(ckpts, corpus, max_windows=2, reference=0, attention=att))
    out = capsys.readouterr().out
    assert "layer 1, query head 3" in out and "attention KL(reference" in out
    table = result["attention_kl"][str(ckpts[1])]
    assert len(table) == 2 and len(table[0]) == 4 and 0 < max(map(max, table)) < 0.05
    matrix = result["attention_prompt"][str(ckpts[0])]["matrix"]
    assert all(abs(sum(row) - 1) < 1e-5 for row in matrix)
    for png in ("att.png", "kl.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


# ---------------------------------------------------------------- one file

def test_one_file_is_a_corpus_scored_as_its_text_and_two_files_as_theirs(hf_llama, tmp_path):
    """split=all needs no train/val split: one file is the stream [BOS] text EOS, the same
    text in two files [BOS] a EOS [BOS] b EOS (the documented difference at the boundary:
    the framing between them, and the junction tokenized apart), each scored as
    transformers scores that stream."""
    _, hf_dir, model, _ = hf_llama
    a, b = (doc.encode("ascii", "ignore").decode() * 2 for doc in CORPUS[:2])
    for name, text in (("one.txt", a + b), ("a.txt", a), ("b.txt", b)):
        (tmp_path / name).write_text(text)
    tok = load_tokenizer(hf_dir)
    frame = lambda text: [tok.bos_id] * tok.add_bos + tok.encode(text) + [tok.eos_id]
    for files, stream in (["one.txt"], frame(a + b)), (["a.txt", "b.txt"], frame(a) + frame(b)):
        cfg = config(hf_dir, tmp_path, split="all")
        cfg.data.files = [str(tmp_path / f) for f in files]
        row = ev.run(cfg)["rows"][0]
        losses = hf_window_losses(model, np.array(stream), SEQ)
        assert row["tokens"] == len(losses) * SEQ
        assert row["nll"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_one_file_refuses_a_split_before_tokenizing(llama_ckpts, tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "one.txt").write_text("just one document\n" * 50)
    cfg = config(llama_ckpts["hf"], tmp_path / "text", split="val")  # its cache: tmp_path/cache
    with pytest.raises(ev.EvalError, match=r"1 document.*split=all"):
        ev.run(cfg)
    assert not list((tmp_path / "cache").rglob("*.bin"))


# ---------------------------------------------------------------- attention alone

def test_attention_prompt_alone_reads_no_corpus_and_score_true_adds_the_scores(llama_ckpts,
                                                                               corpus, tmp_path):
    ckpt = llama_ckpts["float"]
    att = ev.AttentionOptions(prompt="def f(x):", plot=str(tmp_path / "att.png"))
    alone = ev.run(config(ckpt, tmp_path / "no_corpus_here", attention=att))  # never read
    assert alone["rows"] == [] and "split" not in alone and "attention_prompt" in alone
    both = ev.run(config(ckpt, corpus, attention=att, score=True, max_windows=2,
                         overwrite=True))
    assert len(both["rows"]) == 1 and "attention_prompt" in both
    with pytest.raises(ev.EvalError, match="score=false"):
        ev.run(config(ckpt, corpus, score=False))
