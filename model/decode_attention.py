"""Decode attention over a KV cache on x86 CPUs (model/decode_attention.cpp, built by
model/kernels.py): one new token per sequence, the g query heads of each KV head reading
that head's slots once, together: at memory speed for MHA and GQA-3 on SmolLM2 (30-40 GB/s on
two Zen 4 cores), arithmetic-bound for MQA's 9 heads a slot and the int8 cache's widening.

SDPA over the folded queries (CausalSelfAttention._attend_grouped) reads a GQA cache at about
half the speed it reads an MHA one on a CPU (SmolLM2-135M, 4k slots x 8, two threads: MHA-9
193 ms a step of attention, GQA-3 97 ms for a third of the bytes, MQA 53 for a ninth), so
the bytes a smaller cache saves did not turn into speed. The int8 cache
(QuantizedKVCache) is read here in its own layout, bytes widened in registers, scales
folded into q and the probabilities.

    runs(q, k)                        # the kernel takes this step (CPU, float32, loaded, on)
    int8_fits(head_dim, window)       # ... and reads that int8 cache
    attend(q, k, v, input_pos)        # float cache
    attend_int8(q, kq, vq, k_scale, v_scale, ring_k, ring_v, input_pos)
    describe(cfg, dtype, kv_cache)    # which decode attention runs, for generate.py's report
"""
from __future__ import annotations

import torch

from model import kernels
from model.config import ModelConfig

enabled = True  # set_enabled(False): SDPA instead (benchmarks compare the two)


def set_enabled(on: bool) -> None:
    """Turn the kernel on or off (SDPA, the int8 cache's torch code); compiled steps guard
    on it and retrace after a change."""
    global enabled
    enabled = on


def runs(q: torch.Tensor, k: torch.Tensor, width: int | None = None) -> bool:
    """Whether the kernel takes this decode step: q (B, H, 1, hd) and cache k, both float32
    on the CPU, no gradient wanted, the width the kernel multiplies (default hd; MLA's
    absorbed queries: rope_dim + kv_rank) a multiple of 16 up to 256, and the kernels loaded
    (KVCache loads them)."""
    width = q.shape[-1] if width is None else width
    return (kernels.ready and enabled and q.device.type == "cpu" and q.dtype == torch.float32
            and k.dtype == torch.float32 and q.shape[2] == 1 and not q.requires_grad
            and width % 16 == 0 and width <= 256)


def _grouped(q: torch.Tensor, n_kv_head: int, scale: float | None = None) -> torch.Tensor:
    """q (B, H, 1, hd) -> (B, G, H / G, hd) times scale (None: 1/sqrt(hd)), contiguous
    groups."""
    B, H, _, hd = q.shape
    scale = hd ** -0.5 if scale is None else scale
    return (q.reshape(B, n_kv_head, H // n_kv_head, hd) * scale).contiguous()


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor,
           scale: float | None = None) -> torch.Tensor:
    """q (B, H, 1, hd) at input_pos (1,) over the cache k, v (B, G, S, hd), slots up to
    that position -> (B, H, 1, hd); scores scaled by scale (None: 1/sqrt(hd))."""
    y = torch.ops.gqalab_attention.attend(_grouped(q, k.shape[1], scale), k, v, input_pos,
                                          kernels.avx512)
    return y.view(q.shape)


def int8_fits(head_dim: int, window: int) -> bool:
    """Whether the kernel reads QuantizedKVCache's layout: window 32 and head_dim a
    multiple of the channels one vector of words widens to (AVX-512: 64, AVX2: 32)."""
    return window == 32 and head_dim % (64 if kernels.avx512 else 32) == 0


def attend_int8(q: torch.Tensor, kq: torch.Tensor, vq: torch.Tensor, k_scale: torch.Tensor,
                v_scale: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
                input_pos: torch.Tensor) -> torch.Tensor:
    """q (B, H, 1, hd) over one layer of QuantizedKVCache: complete blocks from its int8
    store, the current block's slots from its float ring -> (B, H, 1, hd)."""
    y = torch.ops.gqalab_attention.attend_int8(_grouped(q, kq.shape[1]), kq, vq, k_scale,
                                               v_scale, ring_k, ring_v, input_pos,
                                               kernels.avx512)
    return y.view(q.shape)


def describe(cfg: ModelConfig, dtype: torch.dtype, kv_cache: str) -> str:
    """Which decode attention a CPU decode of cfg's model runs over a kv_cache (float or
    int8) cache in dtype, and why, for generate.py's report."""
    ok, why = kernels.available()
    hd = cfg.head_dim
    if cfg.kv_rank:
        hd = cfg.rope_dim + cfg.kv_rank  # the absorbed queries' width: [k_r | c]
    if cfg.kv_rank and kv_cache == "int8":
        return "the int8 latent cache's torch code (MLA's absorbed decode)"
    if not (ok and enabled):
        return f"SDPA (the C++ decode kernel: {why if not ok else 'turned off'})"
    if dtype != torch.float32 or hd % 16 or hd > 256:
        return (f"SDPA (the C++ decode kernel reads float32 caches with head_dim a multiple "
                f"of 16 up to 256; here {str(dtype).removeprefix('torch.')}, {hd})")
    group = (f"MLA's absorbed decode, the {cfg.n_head} heads read each latent once"
             if cfg.kv_rank else
             f"the {cfg.n_head // cfg.n_kv_head} query heads of each KV head read its slots once")
    if kv_cache == "int8" and not int8_fits(hd, 32):
        return f"the int8 cache's torch code (its C++ kernel needs head_dim a multiple of " \
               f"{64 if kernels.avx512 else 32}, here {hd})"
    cache = ", int8 cache" if kv_cache == "int8" else ""
    return f"C++ decode kernel ({kernels.isa()}{cache}): {group}"
