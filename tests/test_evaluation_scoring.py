"""evaluation/scoring.py against independent references: the positions each window scores
over any number of ranks, a hand loop over sliding windows, and the bytes each document's
tokens spell."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluation.scoring as scoring  # noqa: E402
from data.loader import IGNORE_INDEX, eval_batches  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from helpers import one_thread  # noqa: E402,F401  (autouse: one thread)
from hf_fixtures import CORPUS  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.transformer import Transformer  # noqa: E402

SEQ = 32


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



# ---- decoded_rows: the targets after a prompt, through a cache ----------------------------

def teacher_forced(model, window: torch.Tensor, prompt: int) -> float:
    """A hand loop: each target after the prompt scored by a full forward over its prefix."""
    total = 0.0
    with torch.no_grad():
        for t in range(prompt, len(window)):
            logits = model(window[None, :t])[0, -1].float()
            total += torch.nn.functional.cross_entropy(logits, window[t]).item()
    return total


@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_decoded_rows_score_each_target_after_the_prompt(kv_cache):
    """float (one forward) and int8 (a decode step per token through QuantizedKVCache) both
    score the tokens after `prompt`, per window; float is the prefix-forward hand loop
    exactly, int8 within what quantizing the cache moves (its window of 32 full-precision
    tokens holds the first 32 positions)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2,
                                    d_model=32, max_seq_len=96)).eval()
    windows = torch.randint(0, 40, (3, 81))
    rows = scoring.decoded_rows(model, windows, prompt=5, kv_cache=kv_cache, batch_size=2)
    assert rows.shape == (3, 2) and rows[:, 1].tolist() == [76, 76, 76]
    expected = torch.tensor([teacher_forced(model, w, 5) for w in windows], dtype=torch.float64)
    tol = 1e-4 if kv_cache == "float" else 2e-2
    torch.testing.assert_close(rows[:, 0], expected, rtol=tol, atol=tol)
