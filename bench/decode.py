"""Decode-speed benchmarks; every figure is a ratio against a peer timed in the same run.

    python bench/decode.py                 # all sections (~20 min on 2 CPU cores)
    python bench/decode.py --section a     # cached vs uncached, 512 new tokens (issue 2)
    python bench/decode.py --section b     # ours vs transformers generate, greedy 256 tokens
    python bench/decode.py --section c     # long context: roofline MHA vs GQA vs MQA
    python bench/decode.py --section q     # int8 weight-only vs fp32 compiled vs transformers
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
import functools
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
from model.sampling import SamplingConfig, compile_decode, generate, stream  # noqa: E402
from model.quantize import quantize_model, weight_bytes  # noqa: E402
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

def section_a(quick: bool, compiled: bool) -> None:
    new = 128 if quick else 512
    print(f"\n(a) cached vs uncached generation, {new} new tokens from a 1-token prompt "
          f"(small model: {SMALL['n_layer']} layers, d={SMALL['d_model']}, fp32)")
    print(f"{'type':<7}{'b':>3}{'cached tok/s':>14}{'uncached tok/s':>16}{'ratio':>8}"
          + (f"{'compiled':>10}{'ratio':>8}" if compiled else "")
          + f"{'KV bytes':>12}{'KV/token':>10}  target >= 10x (eager"
          + (" / compiled)" if compiled else ")"))
    for name, n_kv in KV_HEADS.items():
        torch._dynamo.reset()
        model = build(SMALL, n_kv)
        for b in (1, 8):
            prompt = prompt_batch(b, 1, SMALL["vocab_size"])
            generate(model, prompt, 8, GREEDY)  # warm-up
            t_c, ours = timed(lambda: generate(model, prompt, new, GREEDY), repeats=2)
            t_u, base = timed(lambda: generate(model, prompt, new, GREEDY, use_cache=False))
            same = torch.equal(ours, base)
            ratios = [t_u / t_c]
            row = f"{name:<7}{b:>3}{b * new / t_c:>14,.1f}{b * new / t_u:>16,.1f}{t_u / t_c:>7.1f}x"
            if compiled:
                compile_decode(model, b, 1 + new)
                t_f, fast = timed(lambda: generate(model, prompt, new, GREEDY, compile=True),
                                  repeats=2)
                ratios.append(t_u / t_f)
                row += f"{b * new / t_f:>10,.1f}{t_u / t_f:>7.1f}x"
                same = same and torch.equal(fast, base)
            kv = kv_bytes_per_token(model.config) * b * (1 + new)
            print(row + f"{mib(kv):>12}{kv_bytes_per_token(model.config):>10,}  "
                  f"{' / '.join(verdict(r >= 10) for r in ratios)}"
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
          + (f"{'comp s':>8}{'compiled':>10}{'comp/HF':>9}" if compiled else "")
          + "  target b1 >= 2x, b8 >= 1.3x (eager" + (" / compiled)" if compiled else ")"))
    import transformers
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        for name, n_kv in KV_HEADS.items():
            torch._dynamo.reset()  # one model's compiled graphs at a time
            model = build(BENCH, n_kv)
            hf = to_hf(model, tmp)
            for b in (1, 8):
                prompt = prompt_batch(b, plen, BENCH["vocab_size"])
                runs = {"mem": big.sum, "HF": lambda: hf_generate(hf, prompt, new),
                        "ours": lambda: generate(model, prompt, new, GREEDY)}
                t_compile = 0.0
                if compiled:
                    t_compile, _ = timed(lambda: compile_decode(model, b, plen + new))
                    runs["compiled"] = lambda: generate(model, prompt, new, GREEDY, compile=True)
                times, tokens = interleaved(runs, repeats=3)
                print(row_b(name, b, b * new, times, t_compile)
                      + ("" if all(torch.equal(t, tokens["HF"]) for t in tokens.values())
                         else "  (tokens differ from HF!)"))


def interleaved(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Best time and last output of each run, the runs taking turns (after one warm-up
    each), so a slow spell of the shared CPU hits every side alike."""
    times, outs = dict.fromkeys(runs, float("inf")), {}
    for r in range(repeats + 1):
        for key, fn in runs.items():
            t, outs[key] = timed(fn)
            times[key] = times[key] if r == 0 else min(times[key], t)
    return times, outs


def row_b(name: str, b: int, n_tokens: int, times: dict, t_compile: float) -> str:
    target = 2.0 if b == 1 else 1.3
    ratios = {k: times["HF"] / t for k, t in times.items() if k != "HF"}
    row = (f"{name:<7}{b:>3}{n_tokens / times['HF']:>10,.1f}{n_tokens / times['ours']:>12,.1f}"
           f"{ratios['ours']:>8.2f}x")
    if "compiled" in times:
        row += f"{t_compile:>8.0f}{n_tokens / times['compiled']:>10,.1f}{ratios['compiled']:>8.2f}x"
    return row + "  " + " / ".join(verdict(r >= target) for r in ratios.values())


# ---------------------------------------------------------------- (c)

def decode_bytes(model: Transformer, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight once in its stored dtype (int8
    layers: weights + scales), the embedding table only when it is also the output head
    (a lookup reads one row), plus the filled K/V cache of every sequence."""
    weights = weight_bytes(model)
    if model.lm_head.weight is not model.embed.weight:
        weights -= model.embed.weight.numel() * model.embed.weight.element_size()
    return weights + kv_bytes_per_token(model.config) * batch * context


def decode_rate(model: Transformer, prompt: torch.Tensor, new: int,
                compile: bool) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of one greedy generation; decode excludes the
    prefill and the first token."""
    if compile:
        compile_decode(model, prompt.shape[0], prompt.shape[1] + new)
    steps = stream(model, prompt, new, GREEDY, compile=compile)
    t0 = time.perf_counter()
    next(steps)  # prefill + first token
    t1 = time.perf_counter()
    n = sum(1 for _ in steps)
    return t1 - t0, prompt.shape[0] * n / (time.perf_counter() - t1)


def section_c(quick: bool, compiled: bool) -> None:
    plen, new, b = (1024 if quick else 2048), (32 if quick else 64), 8
    modes = ["eager"] + (["compiled"] if compiled else [])
    print(f"\n(c) long context: prompt {plen}, b={b}, {new} new tokens, greedy "
          f"(bench model, fp32); decode only, prefill excluded")
    print(f"{'type':<7}{'prefill s':>10}{'KV cache':>12}{'B/step':>12}{'predicted':>10}"
          + "".join(f"{m + ' tok/s':>16}{'speed-up':>10}{'ach/pred':>10}" for m in modes))
    rows = {}
    for name, n_kv in KV_HEADS.items():
        torch._dynamo.reset()
        model = build(BENCH, n_kv)
        prompt = prompt_batch(b, plen, BENCH["vocab_size"])
        rates = [decode_rate(model, prompt, new, m == "compiled") for m in modes]
        kv = kv_bytes_per_token(model.config) * b * (plen + new)
        rows[name] = (rates[0][0], [tps for _, tps in rates], kv,
                      decode_bytes(model, b, plen + new // 2))
    mha_tps, mha_bytes = rows["MHA"][1], rows["MHA"][3]
    for name, (prefill_s, tps, kv, step_bytes) in rows.items():
        predicted = mha_bytes / step_bytes
        line = f"{name:<7}{prefill_s:>10.2f}{mib(kv):>12}{mib(step_bytes):>12}{predicted:>9.2f}x"
        verdicts = []
        for rate, mha_rate in zip(tps, mha_tps):
            speedup = rate / mha_rate
            line += f"{rate:>16,.1f}{speedup:>9.2f}x{speedup / predicted:>10.0%}"
            verdicts.append(verdict(speedup / predicted >= 0.75))
        if name == "MQA":
            line += f"  {' / '.join(verdicts)} (target >= 75%)"
        print(line)


# ---------------------------------------------------------------- (q)

def section_q(quick: bool, modes: list[str]) -> None:
    new, plen = (64 if quick else 128), 16
    big = torch.ones(256 * 2**20 // 4)  # far larger than the caches
    print(f"\n(q) int8 weight-only vs fp32, both compiled, vs transformers generate; greedy, "
          f"{new} new tokens, prompt {plen} (bench model: {BENCH['n_layer']} layers, "
          f"d={BENCH['d_model']}); times include the prefill. GB/s: a sum over 256 MiB,\n"
          f"    timed in turn with the rest (the memory roofline under the same load); "
          f"roofl = achieved tok/s / (GB/s / bytes per step)")
    print(f"{'type':<7}{'b':>3}{'GB/s':>6}{'HF tok/s':>10}{'fp32 tok/s':>12}{'fp32/HF':>9}"
          + "".join(f"{m + ' tok/s':>17}{'/fp32':>7}{'/HF':>7}{'MiB/step':>9}{'roofl':>7}"
                    for m in modes) + "  target int8 b1 >= 1.6x fp32")
    import transformers
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        for name, n_kv in KV_HEADS.items():
            torch._dynamo.reset()
            model = build(BENCH, n_kv)
            hf = to_hf(model, tmp)
            quantized = {m: quantize_model(build(BENCH, n_kv), m) for m in modes}
            for b in (1, 8):
                prompt = prompt_batch(b, plen, BENCH["vocab_size"])
                runs = {"mem": big.sum, "HF": lambda: hf_generate(hf, prompt, new),
                        "fp32": lambda: generate(model, prompt, new, GREEDY, compile=True)}
                compile_decode(model, b, plen + new)
                for m, q in quantized.items():
                    compile_decode(q, b, plen + new)
                    runs[m] = functools.partial(generate, q, prompt, new, GREEDY, compile=True)
                times, _ = interleaved(runs, repeats=3)
                print(row_q(name, b, new, plen, times, quantized, big.numel() * 4))


def row_q(name: str, b: int, new: int, plen: int, times: dict, quantized: dict,
          mem_bytes: int) -> str:
    tps = {k: b * new / t for k, t in times.items()}
    bandwidth = mem_bytes / times["mem"]
    row = (f"{name:<7}{b:>3}{bandwidth / 1e9:>6.1f}{tps['HF']:>10,.1f}{tps['fp32']:>12,.1f}"
           f"{tps['fp32'] / tps['HF']:>8.2f}x")
    verdicts = []
    for m, q in quantized.items():
        step = decode_bytes(q, b, plen + new // 2)
        roofline = bandwidth / step * b  # tok/s if each step only streamed its bytes
        ratio = tps[m] / tps["fp32"]
        row += (f"{tps[m]:>17,.1f}{ratio:>6.2f}x{tps[m] / tps['HF']:>6.2f}x"
                f"{step / 2**20:>9.1f}{tps[m] / roofline:>7.0%}")
        verdicts.append(verdict(ratio >= 1.6) if b == 1 else "")
    return row + "  " + " / ".join(v for v in verdicts if v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", choices=["a", "b", "c", "q", "all"], default="all")
    ap.add_argument("--quant", default="int8,int8_head",
                    help="section q: comma-separated quantize modes (int8, int8_head)")
    ap.add_argument("--quick", action="store_true", help="shorter runs, same tables")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled columns")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.section in ("a", "all"):
        section_a(args.quick, compiled=not args.no_compile)
    if args.section in ("b", "all"):
        section_b(args.quick, compiled=not args.no_compile)
    if args.section in ("c", "all"):
        section_c(args.quick, compiled=not args.no_compile)
    if args.section in ("q", "all"):
        section_q(args.quick, args.quant.split(","))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
