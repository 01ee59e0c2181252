"""Scoring held-out text: NLL, tokens and UTF-8 bytes per window of a packed token stream
and their sums (one process or split over ranks), and the bytes each token id spells
(for bits per byte). The per-window scores are what a standard error needs (stats.py).
train.py, evaluate.py, the demo and the experiments all score through here.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from data.loader import IGNORE_INDEX, eval_batches, open_tokens
from data.prepare import PreparedData, prepare_data
from data.tokenizer import SentencePieceTokenizer, Tokenizer
from evaluation import EvalError
from model.sampling import new_cache, prefill
from store import runs


def sum_dtype(device: torch.device) -> torch.dtype:
    """float64 sums (exact token counts, no drift), float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


class TokenBytes:
    """The UTF-8 bytes each token id spells in the text, for bits per byte.

    Byte-level BPE (GPT-2, NeoX, Llama-3, SmolLM2): one byte per character of the token's
    text (GPT-2's byte-to-unicode map). Sentencepiece-style pieces: the piece with its
    U+2581 as a space; a byte-fallback piece <0xHH> is one byte. Special tokens spell
    nothing. A tokenizer that puts a space before each document (Llama's dummy prefix)
    spells none with a document's first token: the one after BOS or EOS."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, device: torch.device) -> None:
        lengths, lead_space = token_byte_lengths(tokenizer)
        pad = max(vocab_size, len(lengths)) - len(lengths)  # an embedding padded past the vocab
        self.lengths = torch.from_numpy(np.pad(lengths - lead_space, (0, pad))).to(device)
        self.first = torch.from_numpy(np.pad(lengths, (0, pad))).to(device)  # not at a boundary
        self.lead = self.first - self.lengths  # 1 where a document's first token drops a space
        bounds = [i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None]
        self.bounds = torch.tensor(bounds, dtype=torch.long, device=device)

    def count(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Bytes of the scored targets y (B, T) (IGNORE_INDEX: not scored) after inputs x,
        per row (B,)."""
        scored = y != IGNORE_INDEX
        targets = y.clamp(min=0)
        at_start = torch.isin(x, self.bounds)  # the target starts a document
        return torch.where(scored, self.first[targets] - self.lead[targets] * at_start, 0).sum(1)


def token_byte_lengths(tok: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, dummy-prefix space) per id: see TokenBytes."""
    n = tok.vocab_size
    lengths, lead = np.zeros(n, np.int64), np.zeros(n, np.int64)
    byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    if isinstance(tok, SentencePieceTokenizer):
        sp, space = tok.sp, "\u2581"
        for i in range(n):
            if sp.is_control(i) or sp.is_unknown(i):
                continue
            piece = sp.id_to_piece(i)
            lengths[i] = 1 if sp.is_byte(i) else len(piece.replace(space, " ").encode())
            lead[i] = piece.startswith(space)
    else:  # tokenizer.json, or GPT-2's vocab.json + merges.txt
        spec = json.loads(tok.tk.to_str())
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        space = "\u0120" if byte_level else "\u2581"  # how a leading space is spelled
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        for i in range(n):
            text = tok.tk.id_to_token(i)
            if text is None or added.get(i, {}).get("special"):
                continue
            if i in added:  # added as plain text, not byte-encoded
                lengths[i] = len(text.encode())
            elif byte_level:
                lengths[i] = len(text)
            else:
                lengths[i] = 1 if byte_piece.fullmatch(text) else len(
                    text.replace(space, " ").encode())
            lead[i] = text.startswith(space)
    for special in (tok.bos_id, tok.eos_id, tok.pad_id):
        if special is not None:
            lengths[special] = lead[special] = 0
    x = tok.encode("x")  # a dummy prefix spells "x" with more than its one byte
    return lengths, lead * (int(lengths[x].sum()) > 1)


@torch.no_grad()
def score_rows(model, batches: Iterable, device: torch.device,
               token_bytes: TokenBytes | None = None, bar: tqdm | None = None) -> torch.Tensor:
    """Per row of the (x, y) batches (targets IGNORE_INDEX count for nothing, so a padding
    row is all zeros): (NLL in nats, targets scored, their UTF-8 bytes), shape (rows, 3).
    Logits go to float32 one row at a time: a row of a large vocabulary at 2048 tokens is
    already hundreds of MB."""
    was_training = model.training
    model.eval()
    rows = [torch.zeros(0, 3, device=device, dtype=sum_dtype(device))]
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)  # (B, T, V)
        nll = torch.stack([F.cross_entropy(logits[r].float(), y[r], ignore_index=IGNORE_INDEX,
                                           reduction="sum") for r in range(len(y))])
        n_bytes = token_bytes.count(x, y) if token_bytes is not None else torch.zeros_like(nll)
        rows.append(torch.stack([nll.to(rows[0].dtype), (y != IGNORE_INDEX).sum(1).to(
            rows[0].dtype), n_bytes.to(rows[0].dtype)], 1))
        if bar is not None:
            bar.update(len(y))
    model.train(was_training)
    return torch.cat(rows)


@torch.inference_mode()
def decoded_rows(model, windows: torch.Tensor, prompt: int, kv_cache: str = "float",
                 batch_size: int = 16) -> torch.Tensor:
    """Per window of windows (N, T + 1): (NLL in nats, targets scored), shape (N, 2), of
    its tokens after the first `prompt`, teacher-forced one token per step through a KV
    cache of kind kv_cache (model.sampling.new_cache): what decoding over that cache would
    score. A float cache scores what the full forward does (cached decode equals it), so
    that is what runs for it: one forward per batch instead of a step per token."""
    rows = []
    for w in windows.split(batch_size):
        w = w.to(model.device)
        if kv_cache == "float":
            logits = model(w[:, :-1])[:, prompt - 1:].float()  # predicts w[:, prompt:]
            nll = F.cross_entropy(logits.transpose(1, 2), w[:, prompt:], reduction="none")
            rows.append(torch.stack([nll.double().sum(1), torch.full_like(
                nll[:, 0], w.shape[1] - prompt, dtype=torch.float64)], 1))
            continue
        cache = new_cache(model, len(w), w.shape[1] - 1, kind=kv_cache)
        logits = prefill(model, w[:, :prompt], cache)  # predicts token `prompt`
        nll = torch.zeros(len(w), dtype=torch.float64, device=w.device)
        for t in range(prompt, w.shape[1]):
            nll += F.cross_entropy(logits.float(), w[:, t], reduction="none").double()
            if t + 1 < w.shape[1]:
                logits = model(w[:, t:t + 1], cache, torch.tensor([t], device=w.device),
                               kv_len=t + 1)[:, -1]
        rows.append(torch.stack([nll, torch.full_like(nll, w.shape[1] - prompt)], 1))
    return torch.cat(rows).cpu()


def totals(rows: torch.Tensor) -> torch.Tensor:
    """score_rows' rows summed: (NLL in nats, targets scored, their UTF-8 bytes, windows
    scored), shape (4,)."""
    return torch.cat([rows.sum(0), (rows[:, 1] > 0).sum()[None].to(rows.dtype)])


def score(model, batches: Iterable, device: torch.device, token_bytes: TokenBytes | None = None,
          bar: tqdm | None = None) -> torch.Tensor:
    """Sums over (x, y) batches: `totals` of `score_rows`."""
    return totals(score_rows(model, batches, device, token_bytes, bar))


def window_rows(model, tokens, seq_len: int, batch_size: int, device: torch.device, *,
                stride: int = 0, max_windows: int | None = None, rank: int = 0,
                world_size: int = 1, dtype=None, token_bytes: TokenBytes | None = None,
                bar: tqdm | None = None) -> torch.Tensor:
    """This rank's `score_rows` over its windows of tokens (a packed token file of dtype,
    or an array): window i of the split's K goes to rank i % world_size, each once, and a
    rank left one short scores a zero padding row (see data/loader.eval_batches;
    evaluation/ranks.gather_windows puts every rank's rows back in window order)."""
    batches = eval_batches(tokens, dtype, seq_len, batch_size, rank=rank, world_size=world_size,
                           stride=stride, max_windows=max_windows)
    return score_rows(model, batches, device, token_bytes, bar)


def window_scores(model, tokens, seq_len: int, batch_size: int, device: torch.device,
                  **windows) -> torch.Tensor:
    """This rank's `totals` over its windows (window_rows' keywords). Sum the ranks' totals
    for the whole."""
    return totals(window_rows(model, tokens, seq_len, batch_size, device, **windows))


def mean_nll(totals: torch.Tensor) -> float:
    return (totals[0] / totals[1]).item()


def val_loss(model, tokens, seq_len: int, n_windows: int, batch_size: int) -> float:
    """Mean NLL per token over n_windows non-overlapping windows of tokens spread evenly:
    the ablation's and the demo's held-out loss, one process."""
    device = next(model.parameters()).device
    return mean_nll(window_scores(model, tokens, seq_len, batch_size, device,
                                  max_windows=n_windows))


def split_tokens(prepared: PreparedData, split: str) -> np.ndarray:
    """The packed ids of a split: train or val of a split build, all of a whole one
    (data.prepare's whole=True: every document in corpus order)."""
    return open_tokens(prepared.bin(split), prepared.dtype)


def window_count(n_tokens: int, seq_len: int, stride: int, max_windows: int | None) -> int:
    whole = (n_tokens - 1 - seq_len) // stride + 1
    return whole if max_windows is None else min(whole, max_windows)


def held_out_tokens(checkpoint: Path) -> np.ndarray:
    """The val split the run that wrote checkpoint held out, tokenized as it trained: every
    model compared with it is scored on the same windows (val_loss), so losses differ only
    by the model."""
    data = runs.read_data_config(checkpoint)
    if data is None:
        raise EvalError(f"{checkpoint} has no {runs.TRAIN_CONFIG}: cannot find its val split")
    return split_tokens(prepare_data(OmegaConf.to_container(data, resolve=True), progress=False),
                        "val")


def scored_tokens(seq_len: int, stride: int, windows: int) -> int:
    """Targets that many windows score: the first (window 0, always among them) all
    seq_len, each other its last stride (eval_batches)."""
    return seq_len + (windows - 1) * stride
