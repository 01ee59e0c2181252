"""Training batches from the packed token files (see data/prepare.py).

TokenStream serves (x, y) windows of seq_len tokens, y = x shifted by one.
Batch number `step` is a pure function of (seed, rank, world_size, step): the
random mode seeds a torch.Generator from (seed, rank, step), the sequential mode
computes window positions from step. So the whole resume state is the step
counter, a plain int, and a resumed run sees exactly the batches an
uninterrupted run would have seen, even if only rank 0's state was saved.
"""

import hashlib
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

from data.config import DataError

Batch = Tuple[torch.Tensor, torch.Tensor]
IGNORE_INDEX = -100  # F.cross_entropy's default: eval padding targets count for nothing


def open_tokens(bin_path, dtype) -> np.ndarray:
    return np.memmap(bin_path, dtype=dtype, mode="r")


def _window_count(n_tokens: int, seq_len: int, what: str, bin_path, stride: int = 0) -> int:
    """Windows of seq_len inputs (+1 target) starting every stride tokens (0: seq_len,
    non-overlapping) in n_tokens."""
    if n_tokens < seq_len + 1:
        raise DataError(f"{bin_path} holds {n_tokens} tokens, fewer than seq_len+1={seq_len + 1} "
                        f"for one {what} window; lower the model's sequence length or add data")
    return (n_tokens - 1 - seq_len) // (stride or seq_len) + 1


def _stack(tokens: np.ndarray, starts, seq_len: int) -> Batch:
    rows = np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    rows = torch.from_numpy(rows)
    # copies, never views of rows: a single row's slice already counts as contiguous, and
    # masking y (padding, sliding windows) would then write into x
    return (rows[:, :-1].clone(memory_format=torch.contiguous_format),
            rows[:, 1:].clone(memory_format=torch.contiguous_format))


def _generator_seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # manual_seed takes a non-negative int64


class TokenStream:
    """Endless batches for one rank.

    mode="random": each row starts at a uniformly random token position, drawn
        from a generator seeded by (seed, rank, step): ranks differ, runs repeat.
    mode="sequential": contiguous non-overlapping windows in file order; global
        window w goes to rank w % world_size, wrapping at the end of the file.
    """

    def __init__(self, bin_path, dtype, seq_len: int, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, mode: str = "random"):
        if mode not in ("random", "sequential"):
            raise ValueError(f"mode={mode!r}: use 'random' or 'sequential'")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.tokens = open_tokens(bin_path, dtype)
        self.n_windows = _window_count(len(self.tokens), seq_len, "training", bin_path)
        self.bin_path, self.seq_len, self.batch_size = bin_path, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.mode = seed, rank, world_size, mode
        self.step = 0  # batches served so far
        self.generator = torch.Generator()

    def next_batch(self) -> Batch:
        starts = self._random_starts() if self.mode == "random" else self._sequential_starts()
        self.step += 1
        return _stack(self.tokens, starts, self.seq_len)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def _random_starts(self) -> list:
        self.generator.manual_seed(_generator_seed(self.seed, self.rank, self.step))
        high = len(self.tokens) - self.seq_len  # last start leaving room for the target
        return torch.randint(high, (self.batch_size,), generator=self.generator).tolist()

    def _sequential_starts(self) -> list:
        first = (self.step * self.world_size + self.rank) * self.batch_size
        windows = range(first, first + self.batch_size)
        return [(w % self.n_windows) * self.seq_len for w in windows]

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "mode": self.mode}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["mode"]) != (self.seed, self.mode):
            raise ValueError(f"loader state is for seed={state['seed']} mode={state['mode']}, "
                             f"this stream has seed={self.seed} mode={self.mode}")
        self.step = int(state["step"])


def eval_batches(bin_path, dtype, seq_len: int, batch_size: int, max_batches: Optional[int] = None,
                 rank: int = 0, world_size: int = 1, stride: int = 0,
                 max_windows: Optional[int] = None) -> Iterator[Batch]:
    """The same val windows at every eval, each evaluated once over all ranks.

    bin_path: a packed token file, or the tokens themselves (an array). Window w starts at
    w * stride (0: stride = seq_len, non-overlapping). With stride < seq_len the windows
    slide: window w > 0 scores only its last stride targets, those window w - 1 did not
    (the others are IGNORE_INDEX: context, not scored), so every target token from 1 to the
    last window's end is scored exactly once, as in HF's perplexity guide.
    K windows spread evenly over the whole file: all of them, or at most max_windows (else
    max_batches * batch_size * world_size), so the set depends only on that product (1 rank
    x batch 8 and 2 ranks x batch 4 see the same windows). Window i of the K goes to rank
    i % world_size. A rank left one short gets a padding row (targets all IGNORE_INDEX, so
    it counts for nothing): every rank yields the same number of batches of the same
    shapes, so collective ops stay in step. The last batch may be smaller; a rank may hold
    only padding."""
    tokens = bin_path if isinstance(bin_path, np.ndarray) else open_tokens(bin_path, dtype)
    stride = stride or seq_len
    name = f"the {len(tokens)} tokens given" if isinstance(bin_path, np.ndarray) else bin_path
    n_windows = _window_count(len(tokens), seq_len, "validation", name, stride)
    cap = max_windows if max_windows is not None else (
        None if max_batches is None else max_batches * batch_size * world_size)
    k = n_windows if cap is None else min(n_windows, cap)
    mine = (np.arange(k) * n_windows // k)[rank::world_size]
    per_rank = -(-k // world_size)  # the most any rank holds
    for i in range(0, per_rank, batch_size):
        rows = min(batch_size, per_rank - i)
        window = mine[i : i + batch_size]
        x, y = _padded(tokens, window * stride, rows, seq_len)
        y[: len(window)][window > 0, : seq_len - stride] = IGNORE_INDEX  # scored by window - 1
        yield x, y


def _padded(tokens: np.ndarray, starts: np.ndarray, rows: int, seq_len: int) -> Batch:
    """The windows at starts, then padding up to rows: the file's first inputs, no targets."""
    n_real = len(starts)
    x, y = _stack(tokens, starts.tolist() + [0] * (rows - n_real), seq_len)  # (rows, T)
    y[n_real:] = IGNORE_INDEX
    return x, y
