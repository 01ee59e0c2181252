"""Batches from packed token files: targets, determinism, resume, ranks, eval windows."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.config import DataError
from data.loader import IGNORE_INDEX, TokenStream, eval_batches
from train import evaluate

SEQ, BATCH = 8, 4


@pytest.fixture
def bin_path(tmp_path):
    # token value == its position (mod 2**16), so a window's start can be read off x
    path = tmp_path / "train.bin"
    np.arange(1001, dtype=np.uint16).tofile(path)
    return path


def stream(path, **kw):
    return TokenStream(path, np.uint16, SEQ, BATCH, **{"seed": 1, **kw})


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_y_is_x_shifted_by_one(bin_path, mode):
    tokens = np.fromfile(bin_path, dtype=np.uint16)
    x, y = stream(bin_path, mode=mode).next_batch()
    assert x.shape == y.shape == (BATCH, SEQ) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y):
        start = int(row_x[0])
        assert row_x.tolist() == tokens[start : start + SEQ].tolist()
        assert row_y.tolist() == tokens[start + 1 : start + SEQ + 1].tolist()


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_sees_the_same_batches(bin_path, mode):
    uninterrupted = stream(bin_path, mode=mode)
    expected = [uninterrupted.next_batch() for _ in range(10)]

    first = stream(bin_path, mode=mode)
    seen = [first.next_batch() for _ in range(4)]
    state = first.state_dict()
    torch.save(state, bin_path.parent / "state.pt")  # as it would travel in a checkpoint
    resumed = stream(bin_path, mode=mode)
    resumed.load_state_dict(torch.load(bin_path.parent / "state.pt"))
    seen += [resumed.next_batch() for _ in range(6)]

    for (ex, ey), (sx, sy) in zip(expected, seen, strict=True):
        assert torch.equal(ex, sx) and torch.equal(ey, sy)


def test_random_mode_depends_on_seed_and_rank(bin_path):
    def starts(**kw):
        return stream(bin_path, world_size=2, **kw).next_batch()[0][:, 0].tolist()

    assert starts(rank=0) == starts(rank=0)
    assert starts(rank=0) != starts(rank=1)
    assert starts(rank=0) != starts(rank=0, seed=2)


def test_random_mode_covers_the_whole_file(bin_path):
    s = TokenStream(bin_path, np.uint16, SEQ, 256, seed=0)
    starts = torch.cat([s.next_batch()[0][:, 0] for _ in range(20)])
    assert starts.min() == 0 and starts.max() == 1001 - SEQ - 1  # both ends reachable


def test_sequential_mode_strides_disjoint_windows_over_ranks(bin_path):
    ranks = [stream(bin_path, mode="sequential", rank=r, world_size=3) for r in range(3)]
    starts = [int(s) for _ in range(2) for r in ranks for s in r.next_batch()[0][:, 0]]
    assert starts == [w * SEQ for w in range(2 * 3 * BATCH)]  # contiguous, none repeated


def test_sequential_mode_wraps_around(tmp_path):
    path = tmp_path / "small.bin"
    np.arange(3 * SEQ + 1, dtype=np.uint16).tofile(path)  # exactly 3 windows
    s = TokenStream(path, np.uint16, SEQ, 2, mode="sequential")
    starts = [int(v) for _ in range(3) for v in s.next_batch()[0][:, 0]]
    assert starts == [0, 8, 16, 0, 8, 16]


def test_too_short_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tiny.bin"
    np.arange(SEQ, dtype=np.uint16).tofile(path)
    with pytest.raises(DataError, match="fewer than seq_len"):
        stream(path)


def collect(path, **kw) -> list:
    args = dict(bin_path=path, dtype=np.uint16, seq_len=SEQ, batch_size=BATCH, max_batches=3)
    return [(x.clone(), y.clone()) for x, y in eval_batches(**{**args, **kw})]


def test_eval_batches_are_fixed_disjoint_windows(bin_path):
    first, again = collect(bin_path), collect(bin_path)
    assert len(first) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    starts = torch.cat([x[:, 0] for x, _ in first]).tolist()
    assert all(s % SEQ == 0 for s in starts) and len(set(starts)) == len(starts)
    assert max(starts) > 1000 // 2  # spread over the file, not just its beginning
    for x, y in first:
        assert torch.equal(x[:, 1:], y[:, :-1])


def real_and_padding(batches):
    """Window starts of the real rows, in order, and the padding rows' targets."""
    rows = [(x[i], y[i]) for x, y in batches for i in range(len(x))]
    real = [int(x[0]) for x, y in rows if (y != IGNORE_INDEX).all()]
    padding = [y for x, y in rows if not (y != IGNORE_INDEX).all()]
    return real, padding


# 125 windows in bin_path: uneven over 2, 3 and 4 ranks, with and without a cap
@pytest.mark.parametrize("batch_size, max_batches", [(4, None), (3, None), (5, 2), (4, 3), (1, 7)])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_batches_evaluate_every_window_once_over_ranks(bin_path, world_size, batch_size,
                                                            max_batches):
    shards = [collect(bin_path, rank=r, world_size=world_size, batch_size=batch_size,
                      max_batches=max_batches) for r in range(world_size)]
    shapes = {tuple(x.shape for x, _ in shard) for shard in shards}
    assert len(shapes) == 1  # same batches on every rank: collectives stay in step
    real, padding = zip(*map(real_and_padding, shards))
    # the same windows as one rank with the whole global batch, each exactly once
    one_rank, no_padding = real_and_padding(collect(bin_path, batch_size=batch_size * world_size,
                                                    max_batches=max_batches))
    assert sorted(sum(real, [])) == one_rank and no_padding == []
    k = 125 if max_batches is None else min(125, max_batches * batch_size * world_size)
    assert len(set(one_rank)) == len(one_rank) == k
    assert all((y == IGNORE_INDEX).all() for y in sum(padding, []))
    assert sum(map(len, padding)) == -k % world_size  # at most one padding row per rank


def test_a_rank_may_hold_only_padding(tmp_path):
    path = tmp_path / "val.bin"
    np.arange(2 * SEQ + 1, dtype=np.uint16).tofile(path)  # 2 windows for 4 ranks
    shards = [collect(path, rank=r, world_size=4) for r in range(4)]
    real = [real_and_padding(shard)[0] for shard in shards]
    assert real == [[0], [SEQ], [], []] and all(len(shard) == 1 for shard in shards)


class OneRank:
    """The part of an Accelerator that train.evaluate uses, for one rank of world_size; it
    keeps the rank's (loss sum, tokens) instead of gathering them."""

    def __init__(self, rank: int, world_size: int):
        self.device, self.process_index, self.num_processes = torch.device("cpu"), rank, world_size

    def gather_for_metrics(self, totals):
        self.totals = totals
        return totals


def pooled_val_totals(path, model, world_size: int, batch_size: int, max_batches) -> torch.Tensor:
    """train.evaluate's (loss sum, tokens) on each rank, summed over the ranks."""
    prepared = SimpleNamespace(val_bin=path, dtype=np.uint16)
    cfg = SimpleNamespace(seq_len=SEQ, batch_size=batch_size, eval_batches=max_batches)
    ranks = [OneRank(r, world_size) for r in range(world_size)]
    for rank in ranks:
        evaluate(model, rank, prepared, cfg)
    return sum(rank.totals for rank in ranks)[0][:2]  # (loss sum, tokens)


@pytest.mark.parametrize("batch_size, max_batches, world_size", [
    (4, None, 2), (3, None, 3), (5, None, 4), (4, 3, 3), (2, 40, 4)])
def test_val_loss_pooled_over_ranks_is_the_one_rank_loss(bin_path, batch_size, max_batches,
                                                         world_size):
    torch.manual_seed(0)
    model = torch.nn.Embedding(1001, 1001)  # a random bigram model: logits = the row of x
    loss_sum, tokens = pooled_val_totals(bin_path, model, world_size, batch_size, max_batches)
    one_sum, one_tokens = pooled_val_totals(bin_path, model, 1, batch_size * world_size,
                                            max_batches)
    k = 125 if max_batches is None else min(125, max_batches * batch_size * world_size)
    assert tokens == one_tokens == k * SEQ  # padding counts for nothing
    assert (loss_sum / tokens).item() == pytest.approx((one_sum / one_tokens).item(), rel=1e-6)
    if max_batches is None:  # every window of the file, straight from the tokens
        ids = torch.from_numpy(np.fromfile(bin_path, dtype=np.uint16).astype(np.int64))
        x, y = ids[: 125 * SEQ], ids[1 : 125 * SEQ + 1]
        assert (loss_sum / tokens).item() == pytest.approx(F.cross_entropy(model(x), y).item(),
                                                           rel=1e-6)


def test_eval_batches_without_cap_cover_every_window(bin_path):
    batches = collect(bin_path, max_batches=None)
    starts = sorted(torch.cat([x[:, 0] for x, _ in batches]).tolist())
    assert starts == [w * SEQ for w in range(1000 // SEQ)]
