"""The demo (`make demo`): the whole gqalab story on a laptop CPU in under ten minutes.

1. prepare the embedded corpus (the Python standard library) and train the `small`
   MHA model on it for a few minutes;
2. convert that checkpoint to GQA-2 by mean-pooling each group's K/V heads (Ainslie et
   al. 2023, §2.1) and uptrain it for alpha = 0.05 of the MHA run's steps;
3. generate from both, and print val loss, KV-cache bytes per token and decode tokens/s
   side by side.

Every step is one of the project's own commands, printed before it runs, so you can
rerun any of them by hand. Each demo writes a fresh runs/demo/<time>/ and never touches
an earlier one.

    python demo.py                     # what `make demo` runs
    python demo.py --steps 200         # shorter (or longer) MHA training
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from evaluation.scoring import held_out_tokens, val_loss
from evaluation.speed import decode_tok_s
from store import runs
from store.checkpoint import load_checkpoint
from model.config import ModelConfig
from model.kv_cache import kv_bytes_per_token

REPO = Path(__file__).resolve().parent
PROMPT = "def "
DECODE = dict(batch_size=8, context=192, new_tokens=64, repeats=3)  # small's context: 256


def command(*args: str) -> None:
    """Run one of the project's commands in the foreground (its progress bars show);
    stop the demo with its exit status if it fails (it has printed its error)."""
    print(f"\n$ {shlex.join(['python', *args])}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    status = subprocess.run([sys.executable, *args], cwd=REPO, env=env).returncode
    if status != 0:
        sys.exit(status)


def train(run_dir: Path, *overrides: str) -> Path:
    command("train.py", "model=small", "data=pystdlib", "batch_size=8", "eval_batches=10",
            f"hydra.run.dir={run_dir}", *overrides)
    return runs.latest_checkpoint(run_dir)


def measure(name: str, ckpt: Path, tokens) -> dict:
    model = load_checkpoint(ckpt).model.eval()
    cfg: ModelConfig = model.config
    return {"model": name, "KV heads": cfg.n_kv_head,
            "val loss": f"{val_loss(model, tokens, seq_len=256, n_windows=64, batch_size=16):.3f}",
            "KV bytes/token": f"{kv_bytes_per_token(cfg):,}",
            "decode tok/s": f"{decode_tok_s(model, **DECODE):,.0f}"}


def print_table(rows: list[dict]) -> None:
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in rows[0]}
    print("  ".join(k.ljust(w) for k, w in widths.items()))
    for row in rows:
        print("  ".join(str(row[k]).ljust(w) for k, w in widths.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400, help="MHA training steps")
    parser.add_argument("--alpha", type=float, default=0.05, help="uptraining fraction")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "demo" /
                        time.strftime("%Y-%m-%d_%H-%M-%S"))
    args = parser.parse_args()
    started = time.perf_counter()

    mha = train(args.out / "mha", "attention=mha", f"max_steps={args.steps}",
                f"eval_every={max(1, args.steps // 3)}")
    converted = args.out / "gqa2_mean"
    command("-m", "convert", f"ckpt={mha}", "n_kv_head=2", "method=mean",
            f"out={converted}")
    uptrained = train(args.out / "gqa2_uptrained", f"init_from={converted}", "attention=gqa",
                      "attention.n_kv_head=2", f"uptrain.alpha={args.alpha}")
    for ckpt in (mha, uptrained):
        command("generate.py", f"ckpt={ckpt}", f"prompt={PROMPT}", "max_new_tokens=120",
                "temperature=0.8", "top_k=50", "seed=0")

    print(f"\nSide by side (val loss over 64 fixed windows of 256 tokens; decode at batch "
          f"{DECODE['batch_size']} after a {DECODE['context']}-token context, fp32, "
          f"{torch.get_num_threads()} threads):\n")
    tokens = held_out_tokens(mha)
    print_table([measure("MHA (trained)", mha, tokens),
                 measure("GQA-2 (mean-pooled, alpha 0)", converted, tokens),
                 measure(f"GQA-2 (uptrained, alpha {args.alpha:g})", uptrained, tokens)])
    print(f"\ndone in {(time.perf_counter() - started) / 60:.1f} min; runs and checkpoints "
          f"in {args.out.relative_to(REPO) if args.out.is_relative_to(REPO) else args.out}")


if __name__ == "__main__":
    main()
