"""Decode-speed benchmarks; every figure is a ratio against a peer timed in the same run.

    python bench/decode.py                 # all sections (~8 min on 2 CPU cores)
    python bench/decode.py --section a     # cached vs uncached, 512 new tokens (issue 2)
    python bench/decode.py --section b     # ours vs transformers generate, greedy 256 tokens
    python bench/decode.py --section c     # long context: roofline MHA vs GQA vs MQA
    python bench/decode.py --quick         # shorter runs, same tables

Shapes (fp32, random weights, vocab 4096, SwiGLU ffn 1408 / 704):
  bench model   6 layers, d_model 512, 8 query heads, head_dim 64   (sections b, c)
  small model   4 layers, d_model 256, 8 query heads, head_dim 32   (section a: the
                uncached baseline is quadratic, so a smaller model keeps it to minutes)
Attention types: MHA (8 KV heads), GQA-2 (2 KV heads), MQA (1 KV head).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.config import ModelConfig  # noqa: E402
from model.kv_cache import kv_bytes_per_token  # noqa: E402
from model.sampling import SamplingConfig, generate  # noqa: E402
from model.summary import param_counts  # noqa: E402
from model.transformer import Transformer  # noqa: E402

GREEDY = SamplingConfig(temperature=0.0)
KV_HEADS = {"MHA": 8, "GQA-2": 2, "MQA": 1}
BENCH = dict(vocab_size=4096, n_layer=6, n_head=8, d_model=512, max_seq_len=2560)
SMALL = dict(vocab_size=4096, n_layer=4, n_head=8, d_model=256, max_seq_len=1024)


def build(shape: dict, n_kv_head: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**shape, n_kv_head=n_kv_head, init_std=0.1)
    return Transformer(cfg).eval()


def prompt_batch(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def timed(fn, repeats: int = 1):
    """Best wall time of `repeats` calls (the CPU is shared; the minimum is the least noisy)
    and the last result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------- (a)

def section_a(quick: bool) -> None:
    new = 128 if quick else 512
    print(f"\n(a) cached vs uncached generation, {new} new tokens from a 1-token prompt "
          f"(small model: {SMALL['n_layer']} layers, d={SMALL['d_model']}, fp32)")
    print(f"{'type':<7}{'b':>3}{'cached tok/s':>14}{'uncached tok/s':>16}{'ratio':>8}"
          f"{'KV bytes':>12}{'KV/token':>10}  target >= 10x")
    for name, n_kv in KV_HEADS.items():
        model = build(SMALL, n_kv)
        for b in (1, 8):
            prompt = prompt_batch(b, 1, SMALL["vocab_size"])
            generate(model, prompt, 8, GREEDY)  # warm-up
            t_c, ours = timed(lambda: generate(model, prompt, new, GREEDY), repeats=2)
            t_u, base = timed(lambda: generate(model, prompt, new, GREEDY, use_cache=False))
            same = torch.equal(ours, base)
            kv = kv_bytes_per_token(model.config) * b * (1 + new)
            ratio = t_u / t_c
            print(f"{name:<7}{b:>3}{b * new / t_c:>14,.1f}{b * new / t_u:>16,.1f}{ratio:>7.1f}x"
                  f"{mib(kv):>12}{kv_bytes_per_token(model.config):>10,}  {verdict(ratio >= 10)}"
                  f"{'' if same else '  (token mismatch!)'}")


# ---------------------------------------------------------------- (b)

def to_hf(model: Transformer, tmp: str):
    """The same weights as a transformers LlamaForCausalLM (sdpa attention, its fastest
    eager CPU path)."""
    from transformers import LlamaForCausalLM
    from model.hf import export_hf
    path = export_hf(model, Path(tmp) / f"hf-{model.config.n_kv_head}")
    return LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def hf_generate(hf, prompt: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        return hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           eos_token_id=None, pad_token_id=0)


def section_b(quick: bool, compiled: bool) -> None:
    new, plen = (64 if quick else 256), 16
    print(f"\n(b) ours vs transformers generate, greedy, {new} new tokens, prompt {plen}, "
          f"same weights (bench model: {BENCH['n_layer']} layers, d={BENCH['d_model']}, fp32)")
    print(f"{'type':<7}{'b':>3}{'HF tok/s':>10}{'ours tok/s':>12}{'ours/HF':>9}"
          + (f"{'compiled':>10}{'comp/HF':>9}" if compiled else "") + "  target b1 >= 2x, b8 >= 1.3x")
    import transformers
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        for name, n_kv in KV_HEADS.items():
            model = build(BENCH, n_kv)
            hf = to_hf(model, tmp)
            fast = None
            if compiled:
                fast = build(BENCH, n_kv)
                fast.forward = torch.compile(fast.forward, dynamic=True)
            for b in (1, 8):
                prompt = prompt_batch(b, plen, BENCH["vocab_size"])
                hf_generate(hf, prompt, 4), generate(model, prompt, 4, GREEDY)  # warm-up
                t_hf, theirs = timed(lambda: hf_generate(hf, prompt, new), repeats=2)
                t_us, ours = timed(lambda: generate(model, prompt, new, GREEDY), repeats=2)
                ratio = t_hf / t_us
                row = (f"{name:<7}{b:>3}{b * new / t_hf:>10,.1f}{b * new / t_us:>12,.1f}"
                       f"{ratio:>8.2f}x")
                if fast is not None:
                    generate(fast, prompt, new, GREEDY)  # compiles (both shapes of T)
                    t_c, _ = timed(lambda: generate(fast, prompt, new, GREEDY), repeats=2)
                    row += f"{b * new / t_c:>10,.1f}{t_hf / t_c:>8.2f}x"
                target = 2.0 if b == 1 else 1.3
                same = torch.equal(ours, theirs)
                print(row + f"  {verdict(ratio >= target)}"
                      f"{'' if same else '  (tokens differ from HF!)'}")


# ---------------------------------------------------------------- (c)

def decode_bytes(cfg: ModelConfig, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once (the tied embedding counts once,
    as the output head) plus the filled K/V cache of every sequence."""
    weights = param_counts(cfg)["total"] * 4
    return weights + kv_bytes_per_token(cfg) * batch * context


def section_c(quick: bool) -> None:
    plen, new, b = (1024 if quick else 2048), (32 if quick else 64), 8
    print(f"\n(c) long context: prompt {plen}, b={b}, {new} new tokens, greedy "
          f"(bench model, fp32); decode only, prefill excluded")
    print(f"{'type':<7}{'prefill s':>10}{'decode tok/s':>14}{'KV cache':>12}{'B/step':>12}"
          f"{'speed-up':>10}{'predicted':>11}{'achieved/pred':>15}")
    rows = {}
    from model.sampling import stream
    for name, n_kv in KV_HEADS.items():
        model = build(BENCH, n_kv)
        prompt = prompt_batch(b, plen, BENCH["vocab_size"])
        steps = stream(model, prompt, new, GREEDY)
        t0 = time.perf_counter()
        next(steps)  # prefill + first token
        t1 = time.perf_counter()
        n = sum(1 for _ in steps)
        t2 = time.perf_counter()
        tps = b * n / (t2 - t1)
        kv = kv_bytes_per_token(model.config) * b * (plen + new)
        step_bytes = decode_bytes(model.config, b, plen + new // 2)
        rows[name] = (t1 - t0, tps, kv, step_bytes)
    mha_tps, mha_bytes = rows["MHA"][1], rows["MHA"][3]
    for name, (prefill_s, tps, kv, step_bytes) in rows.items():
        speedup, predicted = tps / mha_tps, mha_bytes / step_bytes
        print(f"{name:<7}{prefill_s:>10.2f}{tps:>14,.1f}{mib(kv):>12}{mib(step_bytes):>12}"
              f"{speedup:>9.2f}x{predicted:>10.2f}x{speedup / predicted:>14.0%}"
              + (f"  {verdict(speedup / predicted >= 0.75)} (target >= 75%)" if name == "MQA" else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=["a", "b", "c", "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="shorter runs, same tables")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled column in (b)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.section in ("a", "all"):
        section_a(args.quick)
    if args.section in ("b", "all"):
        section_b(args.quick, compiled=not args.no_compile)
    if args.section in ("c", "all"):
        section_c(args.quick)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
