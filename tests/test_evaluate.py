"""evaluate.py against independent references: transformers' loss per window, a hand loop
over sliding windows, bytes decoded by the tokenizer, an int8 copy, a run dir's latest, two
processes, and the attention hook against its own invariants."""
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
from hf_fixtures import CORPUS  # noqa: E402
from store.checkpoint import save_checkpoint  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from store.hf import import_hf  # noqa: E402
from store.quantize import quantize_checkpoint  # noqa: E402
from store.source import open_source  # noqa: E402
from model.transformer import Transformer  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
SEQ = 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation, many times over on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    return scoring.split_tokens(prepare_data(ev.corpus_data(cfg, source), progress=False), split)


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


def scored_positions(tokens_len: int, seq_len: int, stride: int, world: int, **kw) -> list[int]:
    """Which target positions eval_batches scores, over all ranks (tokens = their positions)."""
    positions = np.arange(tokens_len, dtype=np.int64)
    out = []
    for rank in range(world):
        for x, y in eval_batches(positions, None, seq_len, 3, rank=rank, world_size=world,
                                 stride=stride, **kw):
            keep = y != IGNORE_INDEX
            out += y[keep].tolist()
    return out


@pytest.mark.parametrize("stride, world", [(16, 1), (16, 2), (5, 1), (5, 3), (16, 3)])
def test_every_token_scored_once_non_overlapping_or_sliding(stride, world):
    n = 16 * 9 + 7  # a tail that no whole window reaches
    got = scored_positions(n, 16, stride, world)
    n_windows = (n - 1 - 16) // stride + 1
    assert sorted(got) == list(range(1, (n_windows - 1) * stride + 16 + 1))  # each once
    capped = scored_positions(n, 16, stride, world, max_windows=4)
    assert len(capped) == len(set(capped)) == 16 + 3 * stride  # first window whole, then new


def test_masking_targets_never_touches_inputs():
    """A batch of one row (a padding row alone, a sliding window) still holds real inputs:
    its x and y are separate tensors, not views of one row."""
    tokens = np.arange(100, dtype=np.int64)
    for rank in range(2):
        for x, y in eval_batches(tokens, None, 10, 1, rank=rank, world_size=2, stride=4,
                                 max_windows=3):
            assert (x[0] == torch.arange(x[0, 0], x[0, 0] + 10)).all()


@pytest.mark.parametrize("stride", [32, 12])
def test_sliding_windows_equal_a_hand_loop(stride):
    """HF's perplexity-guide loop by hand: window w reads tokens[w*stride : +seq_len+1] and
    scores only the targets the previous window did not."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=4, d_model=32,
                                    max_seq_len=SEQ)).eval()
    tokens = torch.randint(0, 50, (300,))
    nll, count, w = 0.0, 0, 0
    with torch.no_grad():
        while w * stride + SEQ + 1 <= len(tokens):
            window = tokens[w * stride: w * stride + SEQ + 1]
            logp = model(window[None, :-1])[0].log_softmax(-1)  # (T, V)
            first = 0 if w == 0 else SEQ - stride
            nll -= sum(logp[t, window[t + 1]].item() for t in range(first, SEQ))
            count += SEQ - first
            w += 1
    totals = scoring.window_scores(model, tokens.numpy(), SEQ, 4, torch.device("cpu"), stride=stride)
    assert totals[1].item() == count and totals[3].item() == w
    assert totals[0].item() == pytest.approx(nll, rel=1e-5)


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


def test_token_bytes_spell_every_document_exactly(hf_llama, hf_family):
    """Each document's tokens, framed as data.prepare frames them, count its UTF-8 bytes:
    dummy prefix (Llama spm), byte fallback (non-ASCII), byte-level BPE, GPT-2's files."""
    for hf_dir in (hf_llama[1], hf_family[1]):
        tok = load_tokenizer(hf_dir)
        counter = scoring.TokenBytes(tok, tok.vocab_size, torch.device("cpu"))
        for doc in CORPUS[:5]:
            ids = ([tok.bos_id] if tok.add_bos else [tok.eos_id]) + tok.encode(doc)
            x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
            assert counter.count(x, y).item() == len(doc.encode()), (hf_dir, doc)


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
    assert result["split"] == "all"  # no train_config.yaml: nothing was held out


def test_gap_closed_is_relative_to_the_worst_row():
    rows = [ev.Row("ref", "", "", "", 4, 0, 0, "t", 1.0, 0, 2.0, 1, 1, 1),
            ev.Row("conv", "", "", "", 1, 0, 0, "t", 1.5, 0, 3.0, 1, 1, 1),
            ev.Row("up", "", "", "", 1, 0, 0, "t", 1.2, 0, 2.25, 1, 1, 1)]
    ev.gap_closed(rows, reference=0)
    assert [r.gap_closed for r in rows] == [1.0, 0.0, 0.75]
    assert [r.delta_bits_per_byte for r in rows] == [0.0, 1.0, 0.25]


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
    assert proc.stdout.count("bits/byte") == 1  # one table, from the main process


# ---------------------------------------------------------------- attention

def test_prompt_attention_is_transformers_output_attentions(hf_llama, hf_family):
    """The hook's probabilities are the ones transformers returns with output_attentions
    (the fixtures run eager attention), for Llama, GPT-2 and NeoX."""
    for _, hf_dir, hf_model, _ in (hf_llama, hf_family):
        model = import_hf(hf_dir)
        ids = [5, 17, 99, 3, 250, 41, 8]
        with torch.no_grad():
            theirs = hf_model(torch.tensor([ids]), output_attentions=True).attentions
        for layer in range(model.config.n_layer):
            ours = ev.prompt_attention(model, ids, layer)  # (H, T, T)
            torch.testing.assert_close(ours, theirs[layer][0], atol=1e-5, rtol=1e-4)


def test_earlier_rows_do_not_change_when_the_prompt_grows():
    """The notebook's observation, why a KV cache is exact: a query attends only to keys at
    or before it, so extending the prompt adds rows and leaves the earlier ones as they were."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                    max_seq_len=SEQ)).eval()
    ids = torch.randint(0, 50, (12,)).tolist()
    for layer in range(2):
        short, long = ev.prompt_attention(model, ids[:7], layer), ev.prompt_attention(model, ids, layer)
        torch.testing.assert_close(long[:, :7, :7], short, atol=1e-6, rtol=0)
        assert (long[:, :7, 7:] == 0).all() and (long[:, 7:, 7:].diagonal(dim1=1, dim2=2) > 0).all()
        torch.testing.assert_close(long.sum(-1), torch.ones(4, 12))


def expanded_to_mha(gqa: Transformer) -> Transformer:
    """The exact MHA form of a GQA model: each KV head's k/v rows repeated for its group."""
    cfg = gqa.config
    mha = Transformer(cfg.with_kv_heads(cfg.n_head)).eval()
    state = gqa.state_dict()
    group, hd = cfg.n_head // cfg.n_kv_head, cfg.head_dim
    for key, value in state.items():
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            state[key] = value.view(cfg.n_kv_head, hd, -1).repeat_interleave(group, 0).flatten(0, 1)
    mha.load_state_dict(state)
    return mha


def test_attention_kl_is_zero_for_itself_and_the_exact_mha_expansion():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=SEQ)
    gqa, other = Transformer(cfg).eval(), Transformer(cfg).eval()
    mha = expanded_to_mha(gqa)
    tokens = torch.randint(0, 50, (200,)).numpy()
    kl = lambda ref, model: ev.attention_kl(ref, model, eval_batches(tokens, None, 16, 2),
                                            torch.device("cpu"))
    for ref, model in ((gqa, gqa), (mha, gqa), (gqa, mha)):
        table, positions = kl(ref, model)
        assert positions == (len(tokens) - 1) // 16 * 16 and table.shape == (2, 4)
        assert table.abs().max() / positions < 1e-7
    table, positions = kl(gqa, other)  # another model's heads: the table sees it
    assert (table / positions > 1e-5).all()


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
