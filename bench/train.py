"""Training-step throughput: ours vs HF transformers' LlamaForCausalLM, same run (issue 4).

    python bench/train.py            # eager and compiled, 10 timed steps each (~6 min on 2 CPU cores)
    python bench/train.py --quick    # 3 timed steps each
    python bench/train.py --modes eager

Shape: 6 layers, 6 heads, d_model 384, SwiGLU ffn 1024, vocab 4096 (tied), T 256, batch 8,
fp32. Both models hold the same weights (ours exported through model/hf.py) and run the
same step as train.py: logits -> F.cross_entropy(logits.float()) -> backward -> clip to
norm 1 -> AdamW (train.py's build_optimizer, default optim settings) -> zero_grad. HF gets
logits from `model(input_ids, use_cache=False).logits` and the identical loss, not
`labels=` (that would shift targets inside the model; our batches are already (x, y)
pairs). Steps alternate ours/HF so drift on a shared CPU hits both; the figure is the
median of the timed steps, warm-up steps (and compilation) excluded.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.config import ModelConfig  # noqa: E402
from model.hf import export_hf  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from train import build_optimizer  # noqa: E402
from train_config import OptimConfig  # noqa: E402

SHAPE = dict(vocab_size=4096, n_layer=6, n_head=6, d_model=384, ffn_hidden=1024, max_seq_len=256)
BATCH, SEQ_LEN = 8, 256
TARGET = 1.05  # ours must reach this multiple of the peer's tok/s in the same mode


def build_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and HF Llama with identical weights, both in train mode, fp32."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Loading weights" bar inside the table
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**SHAPE)).train()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_hf(ours, Path(tmp) / "hf")
        hf = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa",
                                              dtype=torch.float32)
    return ours, hf.train()


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # as train.py


def ours_logits(model, x):
    return model(x)


def hf_logits(model, x):
    return model(input_ids=x, use_cache=False).logits


def make_step(model, logits_of, optim):
    """One full optimizer step on (x, y), as train.py does it (less Accelerate's no-op
    wrappers on one CPU process)."""
    optimizer = build_optimizer(model, optim)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(x, y) -> float:
        loss = loss_fn(logits_of(model, x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a sync point, as train.py's logging is

    return step


def batches(n: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ_LEN + 1), generator=g)
        yield tokens[:, :-1], tokens[:, 1:]


@torch.no_grad()
def check_same_loss(ours, hf) -> float:
    x, y = next(batches(1))
    a, b = loss_fn(ours_logits(ours, x), y).item(), loss_fn(hf_logits(hf, x), y).item()
    if abs(a - b) > 1e-4:
        sys.exit(f"error: losses differ on the same batch (ours {a:.6f}, HF {b:.6f}): "
                 f"the two models do not compute the same thing; fix model/hf.py first")
    return a


def time_interleaved(steps: dict, warmup: int, timed: int) -> dict[str, float]:
    """Median tok/s per entry; within each round the entries run in turn, and the order
    flips every round so neither always follows the other."""
    times = {name: [] for name in steps}
    names = list(steps)
    for i, (x, y) in enumerate(batches(warmup + timed)):
        for name in names if i % 2 == 0 else reversed(names):
            t = time.perf_counter()
            loss = steps[name](x, y)
            if not math.isfinite(loss):
                sys.exit(f"error: {name} loss is {loss} at step {i}")
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    return {name: BATCH * SEQ_LEN / statistics.median(ts) for name, ts in times.items()}


def run_mode(mode: str, warmup: int, timed: int) -> dict[str, float] | str:
    """tok/s of ours and HF in one mode, or a one-line reason the mode could not run."""
    ours, hf = build_pair()
    optim = OptimConfig()
    if mode == "compiled":
        ours, hf = torch.compile(ours), torch.compile(hf)
    steps = {"ours": make_step(ours, ours_logits, optim), "HF": make_step(hf, hf_logits, optim)}
    try:
        return time_interleaved(steps, warmup, timed)
    except Exception as e:  # noqa: BLE001 - inductor errors come in many types
        if mode != "compiled":
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"torch.compile failed on this machine ({type(e).__name__}: {first})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps per model and mode")
    parser.add_argument("--modes", default="eager,compiled", help="comma list: eager,compiled")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 quick)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in ("eager", "compiled")]:
        sys.exit(f"error: unknown mode {bad[0]!r}: use --modes eager,compiled")
    timed = args.steps if args.steps is not None else (3 if args.quick else 10)
    if timed <= 0:
        sys.exit("error: --steps must be a positive integer")
    warmup = 2  # first steps allocate AdamW state, and under compile trace and compile

    ours, hf = build_pair()
    loss = check_same_loss(ours, hf)
    del ours, hf
    print(f"train step, fp32, {SHAPE['n_layer']} layers, {SHAPE['n_head']} heads, "
          f"d_model {SHAPE['d_model']}, ffn {SHAPE['ffn_hidden']}, vocab {SHAPE['vocab_size']}, "
          f"T {SEQ_LEN}, batch {BATCH}; {torch.get_num_threads()} threads")
    print(f"same batch, same loss: {loss:.6f} (ours and HF agree to 1e-4)")
    print(f"median of {timed} timed steps after {warmup} warm-up, ours/HF alternating")
    print(f"{'mode':<10}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}  target >= {TARGET}x")
    for mode in modes:
        result = run_mode(mode, warmup, timed)
        if isinstance(result, str):
            print(f"{mode:<10}{result}")
            continue
        ratio = result["ours"] / result["HF"]
        print(f"{mode:<10}{result['ours']:>12,.0f}{result['HF']:>12,.0f}{ratio:>7.2f}x  "
              f"{'PASS' if ratio >= TARGET else 'MISS'}", flush=True)


if __name__ == "__main__":
    main()
