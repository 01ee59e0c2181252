"""Rotary embeddings and the one causal self-attention behind MHA, GQA and MQA.

Query head h reads KV head h // group_size (contiguous groups), the layout of HF's
repeat_kv and SDPA's enable_gqa, and the one mean-pool conversion relies on.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.kv_cache import KVCache


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin of shape (max_len, head_dim) in the half-split ("rotate_half") layout.

    The sin table carries rotate_half's sign (-sin on the first half), so apply_rope is a
    roll and two multiply-adds: the fewest kernels per decode step."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (L, hd/2)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().float(), torch.cat([-sin, sin], dim=-1).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., hd); cos/sin (..., rd) from rope_tables for the positions x sits at,
    broadcastable. rotate_half(x) * sin == roll(x, rd/2) * signed_sin. With rd < hd
    (NeoX's partial rotary) the first rd dims rotate and the rest pass through.
    The tables take x's dtype (as HF Llama does): under autocast q/k come out bf16/fp16, and
    fp32 tables would promote them to fp32 while v stays half, which keeps SDPA off its
    fused enable_gqa kernel. A no-op in fp32."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rd = cos.shape[-1]
    if rd < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
    return torch.addcmul(x * cos, x.roll(rd // 2, dims=-1), sin)


def cache_mask(input_pos: torch.Tensor, cache_len: int, group: int) -> torch.Tensor:
    """Which cache slots each query sees, (1, 1, group*T, cache_len) for the folded query
    layout of _attend_grouped: the query at position p sees slots 0..p, so slots not yet
    written never count and the cache keeps one static shape. 4-D on purpose: SDPA's CPU
    kernel takes a much slower path for a 3-D mask."""
    slots = torch.arange(cache_len, device=input_pos.device)
    visible = slots[None, :] <= input_pos[:, None]  # (T, S)
    return visible.repeat(group, 1)[None, None]  # rows ordered (head in group, t)


def attention_logprobs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The causal attention distribution SDPA applies, made visible: log softmax(q k^T /
    sqrt(hd)) in float32, (B, H, T, T), -inf above the diagonal. k (B, n_kv, T, hd) is
    expanded per contiguous group. For inspection only: it builds the (T, T) matrix."""
    H, T = q.shape[1], q.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return scores.masked_fill(~causal, float("-inf")).log_softmax(-1)


def fused_gqa(q: torch.Tensor) -> bool:
    """Whether SDPA's enable_gqa runs a fused kernel (CUDA flash, half precision) for q.
    Elsewhere (fp32, CPU) it falls back to the math kernel, which is slower than expanding
    K/V for the fused one."""
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        bias = cfg.attn_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=bias)
        # opt-in inspection (evaluate.py): called with (layer, attention_logprobs) on each
        # forward without a cache; None, the default, never builds the (T, T) matrix
        self.on_attention: Callable[[int, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                cache: KVCache | None = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """x (B, T, d); cos/sin (T, rd) for the positions of x, None with learned
        positions (added to the embeddings instead). With a cache, x sits at
        input_pos (T,), attends to the first kv_len slots (None: all), and mask comes
        from cache_mask for that many slots."""
        B, T, _ = x.shape
        H, G, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, hd)
        k = self.k_proj(x).view(B, T, G, hd)
        v = self.v_proj(x).view(B, T, G, hd).transpose(1, 2)  # (B, G, T, hd)
        if cos is not None:
            cos, sin = cos[:, None], sin[:, None]  # (T, 1, rd): broadcast over heads
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, G, T, hd)
        if cache is None:
            y = self._attend_full(q, k, v)
            if self.on_attention is not None:
                self.on_attention(self.layer, attention_logprobs(q, k))
        elif cache.quantized and T == 1:  # int8 decode: the cache reads its own layout
            y = cache.attend(self.layer, q, k, v, input_pos, kv_len)
        else:
            k, v = cache.update(self.layer, input_pos, k, v)  # (B, G, max_len, hd)
            y = self._attend_grouped(q, k[:, :, :kv_len], v[:, :, :kv_len], mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))

    def _attend_full(self, q, k, v) -> torch.Tensor:
        """Training path: SDPA reads the n_kv heads in place (enable_gqa) where a fused
        kernel supports that; elsewhere K/V are expanded per contiguous group only for the
        product, so the fused causal kernel still applies."""
        group = self.n_head // self.n_kv_head
        if group > 1 and fused_gqa(q):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)

    def _attend_grouped(self, q, k, v, mask) -> torch.Tensor:
        """Cached path: fold each group's query heads into the query axis, so every query
        reads its KV head in place and the cache is never copied or expanded."""
        B, H, T, hd = q.shape
        q = q.reshape(B, self.n_kv_head, H // self.n_kv_head * T, hd)  # (B, n_kv, G*T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, n_kv, G*T, hd)
        return y.view(B, H, T, hd)
