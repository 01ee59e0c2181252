"""What tests/test_isa.py checks, as a process of its own: torch reads ATEN_CPU_CAPABILITY
once, at startup, so imitating an AVX2-only CPU takes a fresh process. Prints one JSON
object of what it saw (greedy ids, logits, generate.py's output); the test asserts on it.

    ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python -m tests.isa_check
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from unittest import mock

import torch

from generate import GenerateConfig, run
from model.config import ModelConfig
import model.quantized
from model.kv_cache import QuantizedKVCache
from model.quantized import CPU_CAPABILITY, Int4Linear, quantize_model
from model.sampling import KV_CACHES, SamplingConfig, decode_step, generate, prefill
from model.transformer import Transformer
from store.checkpoint import save_checkpoint
from tests.helpers import compile_works

GREEDY = SamplingConfig(temperature=0)
NEW = 40  # 7 + 40 tokens: the int8 cache's first block of 32 is read from its int8 store
# each decode path checked: (weight quantization, kv_cache)
PATHS = {"fp32": (None, "float"), "int8_head": ("int8_head", "float"),
         "int4_head": ("int4_head", "float"), "kv_int8": (None, "int8")}


def tiny_model(mode: str | None = None) -> Transformer:
    """test_model_quantize's shape, random weights scaled up so greedy picks are clear."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      ffn_hidden=128, max_seq_len=64, init_std=0.2)
    model = Transformer(cfg).eval()
    return quantize_model(model, mode, 32) if mode else model


def prompt() -> torch.Tensor:
    return torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def cached_logits(model: Transformer, ids: torch.Tensor, plen: int, kv_cache: str):
    """Logits of every position from plen - 1 on: the prompt's prefill, then one eager
    decode step per token of ids (teacher-forced) -> (B, T - plen, V)."""
    cache = KV_CACHES[kv_cache].for_model(model.config, ids.shape[0], ids.shape[1])
    out = [prefill(model, ids[:, :plen], cache)]
    for t in range(plen, ids.shape[1] - 1):
        out.append(decode_step(model, ids[:, t], torch.tensor([t]), cache, kv_len=t + 1))
    return torch.stack(out, dim=1)


@torch.inference_mode()
def divergence_gap(model: Transformer, ids: torch.Tensor, other: torch.Tensor) -> float | None:
    """Where two greedy continuations first differ: the gap between the full forward's two
    best logits over ids' common prefix there (a near tie flips on float rounding); None
    where they are equal."""
    diff = (ids != other).nonzero().tolist()
    if not diff:
        return None
    row, pos = min(diff, key=lambda rc: rc[1])
    best = model(ids[row:row + 1, :pos])[0, -1].float().topk(2).values
    return (best[0] - best[1]).item()


def decode_paths(mode: str | None, kv_cache: str) -> dict:
    """Greedy ids eager, compiled and uncached; the cached decode's logits beside the full
    forward's over the same ids (and the float cache's, for an int8 cache)."""
    model, tokens = tiny_model(mode), prompt()
    eager = generate(model, tokens, NEW, GREEDY, kv_cache=kv_cache)
    with torch.inference_mode():
        full = model(eager)[:, tokens.shape[1] - 1:-1]
    compiled = generate(model, tokens, NEW, GREEDY, kv_cache=kv_cache, compile=True)
    uncached = generate(model, tokens, NEW, GREEDY, use_cache=False)
    return {"eager": eager.tolist(), "compiled": compiled.tolist(),
            "uncached": uncached.tolist(),
            "gap": {"compiled": divergence_gap(model, eager, compiled),
                    "uncached": divergence_gap(model, eager, uncached)},
            "cached_logits": cached_logits(model, eager, tokens.shape[1], kv_cache).tolist(),
            "full_logits": full.tolist()}


def generate_py(ckpt: str, **options) -> dict:
    """generate.py's run(): the ids it prints, its stderr report, and which quantized path
    really ran (calls of the int4 matmul, int8 caches made): the paths' ids may agree."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(model.quantized, "int4_matmul",
                              wraps=model.quantized.int4_matmul) as int4, \
            mock.patch.object(QuantizedKVCache, "for_model",
                              wraps=QuantizedKVCache.for_model) as int8_cache:
        run(GenerateConfig(ckpt=ckpt, prompt_ids=prompt()[0].tolist(), max_new_tokens=NEW,
                           temperature=0, device="cpu", **options))
    return {"ids": [int(t) for t in out.getvalue().split()], "stderr": err.getvalue(),
            "int4_matmul_calls": int4.call_count, "int8_caches": int8_cache.call_count}


def int4_without_kernel() -> Transformer:
    """The int4 model computing its own dequantized function (int4_matmul's other path)."""
    model = tiny_model("int4_head")
    for layer in model.modules():
        if isinstance(layer, Int4Linear):
            layer.cpu_weight = layer.cpu_scales_zeros = None
            layer.dot_weight = layer.dot_scales_mins = None
    return model


def cli_choices() -> dict:
    """generate.py on a float checkpoint: int4 and kv_cache=int8 as chosen for this CPU and
    forced, with the greedy ids of each candidate path to compare with."""
    ref = {"int4_kernel": tiny_model("int4_head"), "int4_dequantized": int4_without_kernel(),
           "float": tiny_model()}
    ids = {name: generate(m, prompt()[0], NEW, GREEDY)[0].tolist() for name, m in ref.items()}
    ids["int8_cache"] = generate(tiny_model(), prompt()[0], NEW, GREEDY,
                                 kv_cache="int8")[0].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(save_checkpoint(f"{tmp}/ckpt", tiny_model()))
        runs = {"int4": generate_py(ckpt, quantize="int4_head", group_size=32),
                "int4_force": generate_py(ckpt, quantize="int4_head", group_size=32,
                                          quant_kernels="force"),
                "kv_int8": generate_py(ckpt, kv_cache="int8"),
                "kv_int8_force": generate_py(ckpt, kv_cache="int8", quant_kernels="force")}
        # a CPU where neither was measured faster: fp32 compute over the smaller storage
        with mock.patch.dict(model.quantized.SPEEDUP, {CPU_CAPABILITY: {}}):
            runs["int4_unmeasured"] = generate_py(ckpt, quantize="int4_head", group_size=32)
            runs["kv_int8_unmeasured"] = generate_py(ckpt, kv_cache="int8")
    return {"ref": ids, "runs": runs}


def main() -> None:
    torch.set_num_threads(1)  # tiny models: a second thread only spins on a busy CPU
    why = compile_works()
    if why:  # the test skips, saying why
        print(json.dumps({"no_compile": why}))
        return
    out = {"capability": torch.backends.cpu.get_cpu_capability(),
           "model_capability": CPU_CAPABILITY, "cli": cli_choices()}
    out.update({name: decode_paths(*how) for name, how in PATHS.items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
