"""Training-step throughput: ours vs HF transformers' LlamaForCausalLM, same run (issue 4).

    python bench/train.py            # eager and compiled, 10 timed steps each (~6 min on 2 CPU cores)
    python bench/train.py --quick    # 3 timed steps each
    python bench/train.py --modes eager
    python bench/train.py --model gpt2s --modes compiled      # on a GPU: bf16 autocast, with MFU

Shape: 6 layers, 6 heads, d_model 384, SwiGLU ffn 1024, vocab 4096 (tied), T 256, batch 8,
fp32 on CPU. `--model gpt2s` is configs/model/gpt2s.yaml at vocab 32000, T 1024, batch 8.
On CUDA both run under bf16 autocast (train.py's default there) with fused AdamW, and the
table adds model TFLOP/s and MFU (model.summary.flops_per_token; peak from --peak-tflops or
the GPU's name, as train.py). Both models hold the same weights (ours exported through model/hf.py) and run the
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
from model.summary import flops_per_token  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from train import build_optimizer, peak_tflops  # noqa: E402
from train_config import OptimConfig  # noqa: E402

SHAPE = dict(vocab_size=4096, n_layer=6, n_head=6, d_model=384, ffn_hidden=1024, max_seq_len=256)
SHAPES = {"bench": SHAPE, "gpt2s": dict(vocab_size=32000, n_layer=12, n_head=12, d_model=768,
                                        ffn_hidden=2048, max_seq_len=1024)}
BATCH = 8
TARGET = 1.05  # ours must reach this multiple of the peer's tok/s in the same mode


def build_pair(shape: dict, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Ours and HF Llama with identical weights, both in train mode, fp32 weights."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Loading weights" bar inside the table
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(**shape)).train()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_hf(ours, Path(tmp) / "hf")
        hf = LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa",
                                              dtype=torch.float32)
    return ours.to(device), hf.to(device).train()


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # as train.py


def ours_logits(model, x):
    return model(x)


def hf_logits(model, x):
    return model(input_ids=x, use_cache=False).logits


def make_step(model, logits_of, optim, device: str):
    """One full optimizer step on (x, y), as train.py does it (less Accelerate's no-op
    wrappers on one process): bf16 autocast and fused AdamW on CUDA."""
    cuda = device.startswith("cuda")
    optimizer = build_optimizer(model, optim, fused=cuda)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(x, y) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = logits_of(model, x)
        loss = loss_fn(logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a sync point, as train.py's logging is

    return step


def batches(n: int, shape: dict, device: str):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        tokens = torch.randint(0, shape["vocab_size"], (BATCH, shape["max_seq_len"] + 1),
                               generator=g).to(device)
        yield tokens[:, :-1], tokens[:, 1:]


@torch.no_grad()
def check_same_loss(ours, hf, shape: dict, device: str) -> float:
    x, y = next(batches(1, shape, device))
    a, b = loss_fn(ours_logits(ours, x), y).item(), loss_fn(hf_logits(hf, x), y).item()
    if abs(a - b) > 1e-4:
        sys.exit(f"error: losses differ on the same batch (ours {a:.6f}, HF {b:.6f}): "
                 f"the two models do not compute the same thing; fix model/hf.py first")
    return a


def time_interleaved(steps: dict, warmup: int, timed: int, shape: dict,
                     device: str) -> dict[str, float]:
    """Median tok/s per entry; within each round the entries run in turn, and the order
    flips every round so neither always follows the other."""
    times = {name: [] for name in steps}
    names = list(steps)
    for i, (x, y) in enumerate(batches(warmup + timed, shape, device)):
        for name in names if i % 2 == 0 else reversed(names):
            t = time.perf_counter()
            loss = steps[name](x, y)
            if not math.isfinite(loss):
                sys.exit(f"error: {name} loss is {loss} at step {i}")
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    tokens = BATCH * shape["max_seq_len"]
    return {name: tokens / statistics.median(ts) for name, ts in times.items()}


def run_mode(mode: str, warmup: int, timed: int, shape: dict,
             device: str) -> dict[str, float] | str:
    """tok/s of ours and HF in one mode, or a one-line reason the mode could not run."""
    ours, hf = build_pair(shape, device)
    optim = OptimConfig()
    if mode == "compiled":
        ours, hf = torch.compile(ours), torch.compile(hf)
    steps = {"ours": make_step(ours, ours_logits, optim, device),
             "HF": make_step(hf, hf_logits, optim, device)}
    try:
        return time_interleaved(steps, warmup, timed, shape, device)
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
    parser.add_argument("--model", choices=sorted(SHAPES), default="bench", help="the shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak for MFU (default: known GPUs by name; none on CPU)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in ("eager", "compiled")]:
        sys.exit(f"error: unknown mode {bad[0]!r}: use --modes eager,compiled")
    timed = args.steps if args.steps is not None else (3 if args.quick else 10)
    if timed <= 0:
        sys.exit("error: --steps must be a positive integer")
    warmup = 2  # first steps allocate AdamW state, and under compile trace and compile

    shape, device = SHAPES[args.model], args.device
    cuda = device.startswith("cuda")
    ours, hf = build_pair(shape, device)
    loss = check_same_loss(ours, hf, shape, device)
    del ours, hf
    flops = flops_per_token(ModelConfig(**shape), shape["max_seq_len"])
    peak = peak_tflops(args.peak_tflops, torch.device(device), "bf16" if cuda else "no")
    print(f"train step, {'bf16 autocast' if cuda else 'fp32'} on {device}, {shape['n_layer']} "
          f"layers, {shape['n_head']} heads, d_model {shape['d_model']}, ffn "
          f"{shape['ffn_hidden']}, vocab {shape['vocab_size']}, T {shape['max_seq_len']}, "
          f"batch {BATCH}; {torch.get_num_threads()} threads")
    print(f"same batch, same loss: {loss:.6f} (ours and HF agree to 1e-4, fp32)")
    print(f"median of {timed} timed steps after {warmup} warm-up, ours/HF alternating; "
          f"{flops / 1e6:,.1f} model MFLOP/token, peak {peak or 'unknown'} TFLOP/s")
    print(f"{'mode':<10}{'ours tok/s':>12}{'HF tok/s':>12}{'ratio':>8}  target >= {TARGET}x"
          f"{'ours TFLOP/s':>15}{'ours MFU':>10}")
    for mode in modes:
        result = run_mode(mode, warmup, timed, shape, device)
        if isinstance(result, str):
            print(f"{mode:<10}{result}")
            continue
        ratio = result["ours"] / result["HF"]
        tflops = flops * result["ours"] / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "-"
        print(f"{mode:<10}{result['ours']:>12,.0f}{result['HF']:>12,.0f}{ratio:>7.2f}x  "
              f"{'PASS' if ratio >= TARGET else 'MISS':<14}{tflops:>13.3f}{mfu:>10}", flush=True)


if __name__ == "__main__":
    main()
