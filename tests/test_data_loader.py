"""Batches from packed token files: targets, determinism, resume, ranks, eval windows."""

import numpy as np
import pytest
import torch

from data.config import DataError
from data.loader import TokenStream, eval_batches

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


def collect(path, **kw):
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


def test_eval_batches_shard_over_ranks(bin_path):
    shards = [collect(bin_path, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1])  # ranks stay in step
    starts = [set(torch.cat([x[:, 0] for x, _ in shard]).tolist()) for shard in shards]
    assert starts[0].isdisjoint(starts[1])


def test_eval_batches_without_cap_cover_every_window(bin_path):
    batches = collect(bin_path, max_batches=None)
    starts = sorted(torch.cat([x[:, 0] for x, _ in batches]).tolist())
    assert starts == [w * SEQ for w in range(1000 // SEQ)]
