"""Training-step throughput: ours vs two peers, each measured in the same run.

    python -m bench.train            # both peers, eager and compiled, 10 timed steps each (~12 min on 2 CPU cores)
    python -m bench.train --quick    # 3 timed steps each
    python -m bench.train --peers nanogpt --modes eager
    python -m bench.train --nanogpt /path/to/nanoGPT      # the dir holding nanoGPT's model.py
    python -m bench.train --model gpt2s --modes compiled  # on a GPU: bf16 autocast, with MFU
    python -m bench.train --threads 1 --clock cpu         # a shared CPU: each step's own CPU time
    python -m bench.train --peers nanogpt --modes compiled,compiled_loss   # where the gap is

Peers:
  HF       the Llama shape (SwiGLU ffn 1024) against transformers' LlamaForCausalLM
           (attn_implementation="sdpa"), both holding the same weights (ours exported through
           store/hf.py); target >= 1.05x in each mode.
  nanoGPT  gqalab's GPT-2 switches (configs/model/gpt2.yaml: LayerNorm, GELU-tanh MLP of
           4·d_model, biases, learned positions, tied head) against nanoGPT's `GPT` (its
           model.py, MIT, imported by path from --nanogpt, default ../shared/peers/nanogpt
           beside the repo; the row is skipped when it is absent), same weights (nanoGPT's
           copied into ours, its fused c_attn split into q/k/v); targets >= 1.0x eager and
           >= 1.15x compiled. The same matmul FLOPs as the Llama shape.

Shape: 6 layers, 6 heads, d_model 384, vocab 4096 (tied), T 256, batch 8, fp32 on CPU.
`--model gpt2s` is configs/model/gpt2s.yaml at vocab 32000, T 1024, batch 8 (the nanoGPT
row: GPT-2 small at vocab 32000). On CUDA every model runs under bf16 autocast (train.py's
default there) with fused AdamW, and the table adds model TFLOP/s and MFU
(model.summary.flops_per_token; peak from --peak-tflops or the GPU's name, as train.py).
Each step is train.py's: loss -> backward -> clip to norm 1 -> AdamW (train.py's
build_optimizer, default optim settings, for every model) -> zero_grad. Ours and HF: logits
-> F.cross_entropy(logits.float()); HF's logits from `model(input_ids, use_cache=False)`,
not `labels=` (that would shift targets inside the model; our batches are already (x, y)
pairs). nanoGPT: its own `model(x, y)` loss, as its train.py does. Before timing, each pair's
losses on one batch must agree to 1e-4 (for nanoGPT, whose GELU is exact, against ours with
mlp=gelu on the same weights; the timed model is gelu_tanh). Steps alternate ours/peer so
drift on a shared CPU hits both; the figure is the median of the timed steps, warm-up steps
(and compilation) excluded.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import io
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import yaml

from store.checkpoint import model_from_state
from model.config import ModelConfig
from store.hf import export_hf
from store.hf_families import GPT2
from model.summary import flops_per_token
from model.transformer import Transformer
from training.optim import build_optimizer
from training.runtime import peak_tflops
from training.config import OptimConfig

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=4096, n_layer=6, n_head=6, d_model=384, ffn_hidden=1024, max_seq_len=256)
SHAPES = {"bench": SHAPE, "gpt2s": dict(vocab_size=32000, n_layer=12, n_head=12, d_model=768,
                                        ffn_hidden=2048, max_seq_len=1024)}
BATCH = 8
NANOGPT = ROOT.parent / "shared" / "peers" / "nanogpt"  # where CI's checkout finds it
# nanoGPT's names are HF GPT-2's, in nn.Linear's (out, in) layout rather than Conv1D's
NANOGPT_NAMES = dataclasses.replace(GPT2, name="nanoGPT", transposed=())


def gpt2_shape(shape: dict) -> dict:
    """shape with gqalab's GPT-2 switches (configs/model/gpt2.yaml) and GELU's 4·d MLP:
    the same matmul FLOPs as SwiGLU's 3 · 8/3·d."""
    switches = yaml.safe_load((ROOT / "configs/model/gpt2.yaml").read_text())
    family = {k: switches[k] for k in ("norm", "mlp", "attn_bias", "mlp_bias", "positions",
                                       "tie_embeddings")}
    return {**shape, **family, "ffn_hidden": 4 * shape["d_model"]}


@dataclass
class Pair:
    """Ours and a peer with the same weights, each with its (x, y) -> loss."""
    ours: torch.nn.Module
    peer: torch.nn.Module
    peer_loss: Callable
    reference: torch.nn.Module | None = None  # ours computing exactly the peer's function


def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())  # as train.py


def ours_loss(model, x, y):
    return loss_fn(model(x), y)


def hf_loss(model, x, y):
    return loss_fn(model(input_ids=x, use_cache=False).logits, y)


def nanogpt_loss(model, x, y):
    return model(x, y)[1]  # nanoGPT's own cross-entropy over every position


def build_hf(shape: dict, device: str, _nanogpt: Path) -> Pair:
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
    return Pair(ours.to(device), hf.to(device).train(), hf_loss)


def nanogpt_module(path: Path):
    """nanoGPT's model.py, imported from its file (never copied into this project)."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_nanogpt(shape: dict, device: str, path: Path) -> Pair:
    """nanoGPT's GPT (its init) and ours at gqalab's GPT-2 switches holding its weights."""
    nano = nanogpt_module(path)
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
        peer = nano.GPT(nano.GPTConfig(block_size=shape["max_seq_len"],
                                       vocab_size=shape["vocab_size"], n_layer=shape["n_layer"],
                                       n_head=shape["n_head"], n_embd=shape["d_model"],
                                       dropout=0.0, bias=True)).train()
    cfg = ModelConfig(**gpt2_shape(shape))

    def ours_with(config: ModelConfig) -> Transformer:
        state = NANOGPT_NAMES.state_from_hf(peer.state_dict(), config, path / "model.py")
        state = {k: v.detach().clone() for k, v in state.items()}  # own tensors, not shared
        return model_from_state(config, state, "nanoGPT").train().to(device)

    exact = ours_with(dataclasses.replace(cfg, mlp="gelu"))  # nanoGPT's nn.GELU() is exact
    return Pair(ours_with(cfg), peer.to(device), nanogpt_loss, reference=exact)


PEERS = {"HF": (build_hf, SHAPES, {"eager": 1.05, "compiled": 1.05}),
         "nanoGPT": (build_nanogpt, {k: gpt2_shape(v) for k, v in SHAPES.items()},
                     {"eager": 1.0, "compiled": 1.15})}


def make_step(model, loss_of, optim, device: str):
    """One full optimizer step on (x, y), as train.py does it (less Accelerate's no-op
    wrappers on one process): bf16 autocast and fused AdamW on CUDA."""
    cuda = device.startswith("cuda")
    optimizer = build_optimizer(model, optim, fused=cuda)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(x, y) -> float:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = loss_of(model, x, y)
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
        yield tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # as nanoGPT's get_batch


@torch.no_grad()
def check_same_loss(pair: Pair, peer: str, shape: dict, device: str) -> float:
    x, y = next(batches(1, shape, device))
    ours = pair.reference or pair.ours
    a, b = ours_loss(ours, x, y).item(), pair.peer_loss(pair.peer, x, y).item()
    if abs(a - b) > 1e-4:
        sys.exit(f"error: losses differ on the same batch (ours {a:.6f}, {peer} {b:.6f}): "
                 f"the two models do not compute the same thing; fix the weight mapping first")
    return a


def time_interleaved(steps: dict, warmup: int, timed: int, shape: dict, device: str,
                     clock=time.perf_counter) -> dict[str, float]:
    """Median tok/s per entry; within each round the entries run in turn, and the order
    flips every round so neither always follows the other."""
    times = {name: [] for name in steps}
    names = list(steps)
    for i, (x, y) in enumerate(batches(warmup + timed, shape, device)):
        for name in names if i % 2 == 0 else reversed(names):
            t = clock()
            loss = steps[name](x, y)
            if not math.isfinite(loss):
                sys.exit(f"error: {name} loss is {loss} at step {i}")
            if i >= warmup:
                times[name].append(clock() - t)
    tokens = BATCH * shape["max_seq_len"]
    return {name: tokens / statistics.median(ts) for name, ts in times.items()}


def run_mode(peer: str, mode: str, warmup: int, timed: int, shape: dict, device: str,
             nanogpt: Path, clock=time.perf_counter) -> dict[str, float] | str:
    """tok/s of ours and the peer in one mode, or a one-line reason the mode could not run."""
    pair = PEERS[peer][0](shape, device, nanogpt)
    ours, other, loss_of = pair.ours, pair.peer, ours_loss
    optim = OptimConfig()
    if mode == "compiled":
        ours, other = torch.compile(ours), torch.compile(other)
    elif mode == "compiled_loss":  # ours' loss in its graph too, as nanoGPT's forward has it
        other, in_graph = torch.compile(other), torch.compile(functools.partial(ours_loss, ours))
        loss_of = lambda _model, x, y: in_graph(x, y)
    steps = {"ours": make_step(ours, loss_of, optim, device),
             peer: make_step(other, pair.peer_loss, optim, device)}
    try:
        return time_interleaved(steps, warmup, timed, shape, device, clock)
    except Exception as e:  # noqa: BLE001 - inductor errors come in many types
        if mode == "eager":
            raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"torch.compile failed on this machine ({type(e).__name__}: {first})"


def describe(shape: dict) -> str:
    cfg = ModelConfig(**shape)
    arch = ("Llama (RMSNorm, SwiGLU, RoPE, no biases)" if cfg.positions == "rope" else
            f"GPT-2 ({cfg.norm}, {cfg.mlp}, biases, learned positions)")
    return f"{arch}, ffn {cfg.ffn_hidden}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 timed steps per model and mode")
    parser.add_argument("--modes", default="eager,compiled",
                        help="comma list: eager, compiled, compiled_loss (ours compiled with its "
                             "loss inside the graph, as nanoGPT computes its own)")
    parser.add_argument("--peers", default="HF,nanoGPT", help="comma list: HF,nanoGPT")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 3 quick)")
    parser.add_argument("--model", choices=sorted(SHAPES), default="bench", help="the shape")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nanogpt", type=Path, default=NANOGPT,
                        help="the dir holding nanoGPT's model.py (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: time each step by this process's CPU time (with --threads 1, "
                             "a step's own cost on a CPU shared with other jobs)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-device peak for MFU (default: known GPUs by name; none on CPU)")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if bad := [m for m in modes if m not in ("eager", "compiled", "compiled_loss")]:
        sys.exit(f"error: unknown mode {bad[0]!r}: use --modes eager,compiled,compiled_loss")
    by_lower = {p.lower(): p for p in PEERS}
    if bad := [p for p in args.peers.split(",") if p and p.lower() not in by_lower]:
        sys.exit(f"error: unknown peer {bad[0]!r}: use --peers HF,nanoGPT")
    peers = [by_lower[p.lower()] for p in args.peers.split(",") if p]
    timed = args.steps if args.steps is not None else (3 if args.quick else 10)
    if timed <= 0:
        sys.exit("error: --steps must be a positive integer")
    warmup = 2  # first steps allocate AdamW state, and under compile trace and compile
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    device = args.device
    cuda = device.startswith("cuda")
    if cuda and args.clock == "cpu":
        sys.exit("error: --clock cpu times the CPU, not a GPU's kernels: use --clock wall on cuda")
    base = SHAPES[args.model]
    peak = peak_tflops(args.peak_tflops, torch.device(device), "bf16" if cuda else "no")
    print(f"train step, {'bf16 autocast' if cuda else 'fp32'} on {device}, {base['n_layer']} "
          f"layers, {base['n_head']} heads, d_model {base['d_model']}, vocab "
          f"{base['vocab_size']}, T {base['max_seq_len']}, batch {BATCH}; "
          f"{torch.get_num_threads()} threads; median {args.clock} time of {timed} timed steps "
          f"after {warmup} warm-up, ours/peer alternating; peak {peak or 'unknown'} TFLOP/s")
    for peer in peers:
        build, shapes, targets = PEERS[peer]
        shape = shapes[args.model]
        if peer == "nanoGPT" and not (args.nanogpt / "model.py").is_file():
            print(f"\n{peer}: skipped, no model.py in {args.nanogpt} (pass --nanogpt DIR)")
            continue
        loss = check_same_loss(build(shape, device, args.nanogpt), peer, shape, device)
        flops = flops_per_token(ModelConfig(**shape), shape["max_seq_len"])
        print(f"\nours vs {peer}: {describe(shape)}; same batch, same loss {loss:.6f} "
              f"(agree to 1e-4); {flops / 1e6:,.1f} model MFLOP/token")
        print(f"{'mode':<14}{'ours tok/s':>12}{peer + ' tok/s':>14}{'ratio':>8}  "
              f"{'target':<14}{'ours TFLOP/s':>13}{'ours MFU':>10}")
        for mode in modes:
            result = run_mode(peer, mode, warmup, timed, shape, device, args.nanogpt, clock)
            if isinstance(result, str):
                print(f"{mode:<14}{result}")
                continue
            ratio = result["ours"] / result[peer]
            tflops = flops * result["ours"] / 1e12
            mfu = f"{tflops / peak:.1%}" if peak else "-"
            target = targets[mode.removesuffix("_loss")]
            verdict = f"{'PASS' if ratio >= target else 'MISS'} >= {target}x"
            print(f"{mode:<14}{result['ours']:>12,.0f}{result[peer]:>14,.0f}{ratio:>7.2f}x  "
                  f"{verdict:<14}{tflops:>13.3f}{mfu:>10}", flush=True)


if __name__ == "__main__":
    main()
