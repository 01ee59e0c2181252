"""Integer dot-product kernels for int4 and int8 layers on x86 CPUs (model/int8_dot.cpp).

Weight-only kernels convert every weight to float before multiplying, and at batch 1 on two
cores that conversion, not memory, bounds them (torch's int4 and int8 kernels read at 9-18
GB/s where an fp32 GEMV reads 24). These kernels do what llama.cpp does instead: quantize
the activations to int8 per block of 32 inputs and multiply bytes by bytes (AVX-512 VNNI's
vpdpbusd, AVX2's maddubs), 16 output rows per instruction, fp32 out. Unlike llama.cpp, each
activation is two int8 parts, the rounded value and its rounded remainder (x ~= d * (hi +
lo / 254), d = max|block| / 127): two byte products per weight, which VNNI affords where a
b1 step waits on memory, for an activation error of at most d / 508 (one int8 alone cost
SmolLM2-135M 0.8% perplexity at int4_int8head; bf16 activations, torch's kernels, 0.1%).

    available()                     # built, loaded and usable on this CPU (or why not)
    pack_int4(q, scales, minimums)  # the kernel's layouts, from plain quantized weights
    int4_mm(x, packed, scales_mins, group_size) / int8_mm(x, packed, scales)

model/kernels.py builds and loads the C++ (ops gqalab_int8_dot::int4_mm, ::int8_mm), with an
AVX-512 VNNI and an AVX2 body each, and says why not where it cannot.
"""
from __future__ import annotations

import torch

from model import kernels
from model.kernels import available, isa, load  # noqa: F401  (this module's API)

PANEL, BLOCK = 16, 32  # output rows per packed panel; activation inputs per int8 scale


def fits(n: int, k: int, group_size: int = BLOCK) -> bool:
    """A layer with n outputs and k inputs fits the kernels' panels and blocks."""
    return n % PANEL == 0 and k % BLOCK == 0 and group_size % BLOCK == 0


def pack_int4(q: torch.Tensor, scales: torch.Tensor,
              minimums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) uint8 in 0..15, scales and minimums (N, G) with weight = q * scale + minimum
    -> the int4 kernel's nibbles (N/16, K/8, 16, 4) and fp16 (N/16, G, 2, 16) as int16."""
    N, K = q.shape
    panels = q.view(N // PANEL, PANEL, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # (P, K/8, 16, 4, 2)
    nibbles = (panels[..., 0] | (panels[..., 1] << 4)).contiguous()
    pair = torch.stack([scales, minimums], dim=-1).float()  # (N, G, 2)
    scales_mins = pair.view(N // PANEL, PANEL, -1, 2).permute(0, 2, 3, 1)  # (P, G, 2, 16)
    # fp16 bits held as int16, so that model.to(dtype) leaves them alone
    return nibbles, scales_mins.to(torch.float16).contiguous().view(torch.int16)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8 -> the int8 kernel's (N/16, K/4, 16, 4)."""
    N, K = q.shape
    return q.view(N // PANEL, PANEL, K // 4, 4).permute(0, 2, 1, 3).contiguous()


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> the values the kernels multiply x as, fp32 (tests; the kernels quantize
    inside): per block of 32, d = max|x| / 127, t = x / d, hi = round(t) and lo =
    round((t - hi) * 254), both int8; x ~= d * (hi + lo / 254), within d / 508."""
    blocks = x.float().view(x.shape[0], -1, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    t = blocks * torch.where(d > 0, 1 / d, 0)
    hi = torch.round(t)
    lo = torch.round((t - hi) * 254).clamp(-127, 127)
    return ((hi * 254 + lo) * (d / 254)).view_as(x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def int4_mm(x: torch.Tensor, nibbles: torch.Tensor, scales_mins: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x (..., K) float @ a packed int4 weight -> (..., N) fp32."""
    y = torch.ops.gqalab_int8_dot.int4_mm(_rows(x), nibbles, scales_mins, group_size,
                                          kernels.avx512)
    return y.view(*x.shape[:-1], -1)


def int8_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) float @ a packed int8 weight with per-row fp32 scales -> (..., N) fp32."""
    y = torch.ops.gqalab_int8_dot.int8_mm(_rows(x), packed, scales.float(), kernels.avx512)
    return y.view(*x.shape[:-1], -1)
