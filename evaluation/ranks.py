"""The processes an evaluation runs on: one, or several under torchrun / accelerate launch
that each score their share of the windows."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm


def make_accelerator():
    """A plain Accelerator: evaluation needs its ranks and reductions, not training's
    precision, trackers or FSDP (training/runtime.py's make_accelerator)."""
    from accelerate import Accelerator
    return Accelerator()


class RankBar:
    """Counts one process's windows as all processes' (they advance in step)."""

    def __init__(self, bar: tqdm, world_size: int) -> None:
        self.bar, self.world_size = bar, world_size

    def update(self, n: int) -> None:
        self.bar.update(n * self.world_size)


@contextmanager
def window_bar(accelerator, windows: int, desc: str) -> Iterator[RankBar]:
    """The main process's bar over every process's windows; with several processes the
    total is rounded up to whole rounds (a short rank scores a padding row)."""
    world = accelerator.num_processes
    total = -(-windows // world) * world if world > 1 else windows
    bar = tqdm(total=total, disable=not accelerator.is_main_process, unit="window", desc=desc,
               dynamic_ncols=True, leave=False)
    try:
        yield RankBar(bar, world)
    finally:
        bar.close()


def gather_windows(accelerator, rows: torch.Tensor, windows: int) -> np.ndarray:
    """Every process's scoring.window_rows (rank r's row j is window j * world + r, then
    padding) as one (windows, 3) array in window order, on every process."""
    world = accelerator.num_processes
    gathered = accelerator.gather(rows) if world > 1 else rows  # (world * per_rank, 3)
    width = rows.shape[1]
    in_order = gathered.reshape(world, -1, width).transpose(0, 1).reshape(-1, width)
    return in_order[:windows].cpu().numpy()


def leave_process_group() -> None:
    """End a finished multi-process run (torchrun, accelerate launch) without the
    interpreter's teardown: once in CI a gloo rank that had printed its
    results aborted there ("terminate called without an active exception", a C++ thread
    destroyed while joinable) and turned a good run into exit 134."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # no rank leaves while another still needs it
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
