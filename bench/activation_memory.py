"""Activation checkpointing: peak memory and speed of a training step, with and without.

    python -m bench.activation_memory              # bench/train.py's shape, batch 8
    python -m bench.activation_memory --batch 16 --steps 3

Each setting runs in its own fresh process (peak RSS never goes down within one): build
the model and AdamW, run the steps as train.py does (forward, cross-entropy, backward,
clip, step), report the process's peak RSS, the RSS before the first step (weights alone)
and the median step time. The difference of the peaks is what checkpointing saves: the
blocks' activations, minus the one block recomputed at a time.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from bench import options
from bench.train import SHAPE
from model.config import ModelConfig
from model.transformer import Transformer
from training.optim import build_optimizer
from training.config import OptimConfig


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(checkpointing: bool, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE)).train()
    model.activation_checkpointing = checkpointing
    optim = OptimConfig()
    optimizer = build_optimizer(model, optim)
    tokens = torch.randint(0, SHAPE["vocab_size"], (batch, SHAPE["max_seq_len"] + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    before, times = rss_mb(), []
    for _ in range(steps):
        t = time.perf_counter()
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mb": peak, "before_mb": before, "loss": loss.item(),
            "tok_s": batch * SHAPE["max_seq_len"] / statistics.median(times)}


def main() -> None:
    parser = options.parser(__doc__, batch=8, steps=3)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch <= 0 or args.steps <= 0:
        sys.exit("error: --batch and --steps must be positive integers")
    if args.child:
        print(json.dumps(child(args.child == "on", args.batch, args.steps)))
        return
    results = {}
    for setting in ("off", "on"):
        out = subprocess.run([sys.executable, "-m", "bench.activation_memory", "--child", setting,
                              "--batch", str(args.batch), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"train step, fp32, {SHAPE['n_layer']} layers, d_model {SHAPE['d_model']}, "
          f"T {SHAPE['max_seq_len']}, batch {args.batch}; {args.steps} steps per setting, "
          f"{torch.get_num_threads()} threads")
    print(f"{'checkpointing':<15}{'peak RSS MB':>12}{'before MB':>11}{'step MB':>9}"
          f"{'tok/s':>9}{'last loss':>11}")
    for setting, r in results.items():
        print(f"{setting:<15}{r['peak_mb']:>12,.0f}{r['before_mb']:>11,.0f}"
              f"{r['peak_mb'] - r['before_mb']:>9,.0f}{r['tok_s']:>9,.0f}{r['loss']:>11.6f}")
    off, on = results["off"], results["on"]
    growth = (on["peak_mb"] - on["before_mb"]) / (off["peak_mb"] - off["before_mb"])
    print(f"step memory (peak above the weights) with checkpointing: {growth:.2f}x; "
          f"speed {on['tok_s'] / off['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
