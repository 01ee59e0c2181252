"""evaluation/passkey.py: prompts of exactly the asked length with the key at the asked
depth, the same under a seed; a copier that reads its history from the KV cache retrieves
every key, a random model none; evaluate.py's passkey options end to end."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate as ev  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from evaluation import EvalError  # noqa: E402
from evaluation.passkey import (FILLER, NEEDLE, QUESTION, TASK, accuracy_grid,  # noqa: E402
                                build_prompt, cell_prompts, following)
from model.config import ModelConfig  # noqa: E402
from store.source import load_model  # noqa: E402

CONTEXT = 256  # the tiny HF Llama's
LENGTHS, DEPTHS = [200, 249], [0.0, 0.5, 1.0]


class CacheCopier(torch.nn.Module):
    """The Transformer's call interface over a KV cache, holding each token's id in the
    cache's K (layer 0, head 0, channel 0) and predicting, from what the cache holds, the
    token that followed the latest longest earlier match of the history's end: a perfect
    in-context copier, to which only what came through the cache is visible."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                                  d_model=8, max_seq_len=CONTEXT)
        self.embed = torch.nn.Embedding(1, 1)  # the cache's dtype: float32, ids exact

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, tokens, cache, input_pos, last_only=False, kv_len=None):
        ids = tokens[:, None, :, None].float().expand(-1, -1, -1, self.config.head_dim)
        k, _ = cache.update(0, input_pos, ids, ids)
        history = k[:, 0, :kv_len, 0].long()
        logits = torch.zeros(tokens.shape[0], 1, self.config.vocab_size)
        for b, row in enumerate(history.tolist()):
            logits[b, 0, next_by_copy(row)] = 1
        return logits


def next_by_copy(row: list[int]) -> int:
    best, best_len = 0, 0
    for j in range(len(row) - 1):
        n = 0
        while n <= j and row[j - n] == row[len(row) - 1 - n]:
            n += 1
        if n >= best_len:
            best, best_len = row[j + 1], n
    return best


@pytest.fixture(scope="module")
def tiny(hf_llama):
    """The tiny random HF Llama (spm and BPE tokenizers) and its tokenizer."""
    _, hf_dir, _, _ = hf_llama
    return hf_dir, load_tokenizer(hf_dir)


def test_prompt_has_the_asked_length_and_the_key_at_the_asked_depth(tiny):
    _, tok = tiny
    head = ([tok.bos_id] if tok.add_bos else []) + tok.encode(TASK)
    question, unit = following(tok, QUESTION), following(tok, FILLER)
    for length in LENGTHS:
        for depth in (0.0, 0.3, 0.5, 1.0):
            p = build_prompt(tok, length, depth, 31415)
            needle = following(tok, NEEDLE.format(key=31415))
            assert len(p.ids) == length
            assert p.ids[:len(head)] == head and p.ids[-len(question):] == question
            assert p.ids[p.needle_at:p.needle_at + len(needle)] == needle
            before = p.needle_at - len(head)
            after = length - len(question) - p.needle_at - len(needle)
            assert abs(before / (before + after) - depth) <= 1 / (before + after)
            filler = p.ids[len(head):p.needle_at] + p.ids[length - len(question) - after:
                                                          length - len(question)]
            assert filler == (unit * 10)[:before + after]  # one stream, cut by the needle
            assert tok.decode(p.ids).endswith(QUESTION)


def test_same_seed_same_prompts_other_seed_other_keys(tiny):
    _, tok = tiny
    prompts = lambda seed: [p.ids for p in cell_prompts(tok, 220, 0.25, 4, seed)]
    assert prompts(0) == prompts(0)
    assert prompts(0) != prompts(1)
    keys = {p.key for p in cell_prompts(tok, 220, 0.25, 20, 0)}
    assert len(keys) > 15 and all(10_000 <= k < 100_000 for k in keys)


def test_a_copier_through_the_kv_cache_retrieves_every_key(tiny):
    _, tok = tiny
    grid = accuracy_grid(CacheCopier(tok.vocab_size), tok, LENGTHS, DEPTHS, trials=3, seed=0,
                         batch_size=2)
    assert grid == [[1.0] * len(DEPTHS)] * len(LENGTHS)


def test_a_random_model_scores_chance(tiny):
    """Chance is 1/90000 per key: a random model retrieves none of 18."""
    hf_dir, _ = tiny
    model, tok = load_model(hf_dir, torch.device("cpu"), torch.float32)
    grid = accuracy_grid(model, tok, LENGTHS, DEPTHS, trials=3, seed=0, batch_size=3)
    assert grid == [[0.0] * len(DEPTHS)] * len(LENGTHS)


def test_evaluate_passkey_only_prints_plots_and_writes_json(tiny, tmp_path, capsys):
    hf_dir, _ = tiny
    opts = ev.PasskeyOptions(only=True, lengths=[220], depths=[0.0, 1.0], trials=2,
                             plot=str(tmp_path / "passkey.png"))
    cfg = ev.EvaluateConfig(ckpts=[str(hf_dir)], device="cpu", out=str(tmp_path / "e.json"),
                            passkey=opts)
    result = ev.run(cfg)
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["passkey"]["accuracy"] == {str(hf_dir): [[0.0, 0.0]]} == result["passkey"]["accuracy"]
    assert saved["rows"] == [] and "corpus" not in saved  # no corpus read, none scored
    assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert "passkey retrieval" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    ({"lengths": [250]}, "must be in [1, 249]"),
    ({"lengths": [100]}, "below the"),
    ({"depths": [1.5]}, "fractions in [0, 1]"),
    ({"trials": 0}, "positive integer"),
])
def test_bad_passkey_options_fail_before_anything_is_written(tiny, tmp_path, change, message):
    hf_dir, _ = tiny
    opts = ev.PasskeyOptions(only=True, plot=str(tmp_path / "p.png"), **change)
    cfg = ev.EvaluateConfig(ckpts=[str(hf_dir)], device="cpu", out=str(tmp_path / "e.json"),
                            passkey=opts)
    with pytest.raises(EvalError, match=message.replace("[", r"\[")):
        ev.run(cfg)
    assert list(tmp_path.iterdir()) == []
