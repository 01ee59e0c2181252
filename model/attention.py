"""Rotary embeddings, the one causal self-attention behind MHA, GQA and MQA, and
multi-head latent attention (MLA, LatentSelfAttention).

Query head h reads KV head h // group_size (contiguous groups), the layout of HF's
repeat_kv and SDPA's enable_gqa, and the one mean-pool conversion relies on.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model import decode_attention
from model.config import ModelConfig
from model.kv_cache import KVCache, LatentCache


def rope_tables(head_dim: int, max_len: int, theta: float,
                freqs: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin of shape (max_len, head_dim) in the half-split ("rotate_half") layout.
    freqs: each plane's angular speed (head_dim/2 of them, ModelConfig.rope_freqs); None or
    empty: theta^(-2i/head_dim).

    The sin table carries rotate_half's sign (-sin on the first half), so apply_rope is a
    roll and two multiply-adds: the fewest kernels per decode step."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if freqs:
        inv_freq = torch.tensor(freqs, dtype=torch.float64)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (L, hd/2)
    sin = angles.sin()
    return torch.cat([angles, angles], dim=-1).cos().float(), torch.cat([-sin, sin], dim=-1).float()


def project(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each of layers (which all read x: q, k, v; gate, up) applied to x: on CPU in one
    kernel call where their quantized weights were packed together (the first layer's
    `joint`, model.quantized.join_projections), else a call each."""
    joint = getattr(layers[0], "joint", None)
    if joint is not None and x.device.type == "cpu":
        return joint(x)
    return tuple(layer(x) for layer in layers)


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
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q, k = q.view(B, T, H, hd), k.view(B, T, G, hd)
        v = v.view(B, T, G, hd).transpose(1, 2)  # (B, G, T, hd)
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
            if T == 1 and decode_attention.runs(q, k):  # one token: slots up to input_pos
                y = decode_attention.attend(q, k, v, input_pos)
            else:
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


class LatentUp(nn.Module):
    """An up-projection out of MLA's latent, (out, kv_rank) plus an optional bias: a linear
    layer kept out of nn.Linear so that quantize= leaves it in float, since the absorbed
    decode reads its weight as a matrix (it is small: kv_rank inputs)."""

    def __init__(self, kv_rank: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, kv_rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return F.linear(latent, self.weight, self.bias)


class LatentSelfAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2). Each token writes one latent
    c = W_dkv x (kv_rank) and one RoPE key k_r = rope(W_kr x) (rope_dim) shared by all heads;
    head h's key is [k_r | W_uk_h c] and its value W_uv_h c. Queries stay per head, each
    [rope_dim rotated | nope_dim], the order NeoX's partial rotary uses.

    Two forms of one attention: `expanded` (training, prefill) expands the latents to
    per-head K/V for SDPA; `absorbed` (decode) moves W_uk into the query and W_uv past the
    weighted sum, so it attends directly over the cached [k_r | c], one shared "KV head".
    Biases (attn_bias) sit on the up-projections' outputs, never on the latent, so an
    exact factorisation of a biased K/V (GPT-2's) keeps them exact."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        H, d, bias = cfg.n_head, cfg.d_model, cfg.attn_bias
        self.n_head, self.kv_rank = H, cfg.kv_rank
        self.rope_dim, self.nope_dim, self.v_dim = cfg.rope_dim, cfg.nope_dim, cfg.v_dim
        self.q_proj = nn.Linear(d, H * (cfg.rope_dim + cfg.nope_dim), bias=bias)
        self.kv_down = nn.Linear(d, cfg.kv_rank, bias=False)  # W_dkv
        self.k_rope = nn.Linear(d, cfg.rope_dim, bias=bias) if cfg.rope_dim else None  # W_kr
        self.k_up = LatentUp(cfg.kv_rank, H * cfg.nope_dim, bias)  # W_uk
        self.v_up = LatentUp(cfg.kv_rank, H * cfg.v_dim, bias)  # W_uv
        self.o_proj = nn.Linear(H * cfg.v_dim, d, bias=bias)
        self.scale = (cfg.rope_dim + cfg.nope_dim) ** -0.5  # a query's whole width
        self.on_attention: Callable[[int, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                cache: LatentCache | None = None, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """As CausalSelfAttention.forward; a cache here is a LatentCache. One new token per
        sequence decodes in the absorbed form, anything else runs expanded."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.rope_dim + self.nope_dim)
        latent = self.latent(x, cos, sin)  # (B, T, rd + r)
        if cos is not None:
            q = apply_rope(q, cos[:, None], sin[:, None])  # rotates each head's first rd
        q = q.transpose(1, 2)  # (B, H, T, rd + nope)
        if cache is not None and cache.quantized and T == 1:  # int8: the cache reads its layout
            ctx = cache.attend(self.layer, self.absorb(q), latent, input_pos, kv_len, self.scale)
            y = self.unabsorb(ctx, T)
        else:
            if cache is not None:
                latent = cache.update(self.layer, input_pos, latent)[:, :kv_len]  # (B, S, rd + r)
            if cache is not None and T == 1 and decode_attention.runs(
                    q, latent, self.rope_dim + self.kv_rank):
                y = self.absorbed_kernel(q, latent, input_pos)
            else:
                attend = self.absorbed if cache is not None and T == 1 else self.expanded
                y = attend(q, latent, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim))

    def latent(self, x: torch.Tensor, cos: torch.Tensor | None,
               sin: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, d) -> what the cache holds per token, [rotated k_r | c] (B, T, rd + r)."""
        c = self.kv_down(x)  # (B, T, r)
        if self.k_rope is None:  # rope_dim 0 (learned positions): all of K is latent
            return c
        k_r = self.k_rope(x)  # (B, T, rd)
        if cos is not None:
            k_r = apply_rope(k_r, cos, sin)
        return torch.cat([k_r, c], dim=-1)

    def expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B, S, rd + r) -> per-head k (B, H, S, rd + nope), v (B, H, S, v_dim)."""
        B, S, _ = latent.shape
        H = self.n_head
        k_r, c = latent.split([self.rope_dim, self.kv_rank], dim=-1)
        k_nope = self.k_up(c).view(B, S, H, self.nope_dim).transpose(1, 2)  # (B, H, S, nope)
        v = self.v_up(c).view(B, S, H, self.v_dim).transpose(1, 2)  # (B, H, S, v)
        k = torch.cat([k_r[:, None].expand(B, H, S, self.rope_dim), k_nope], dim=-1)
        return k, v

    def expanded(self, q: torch.Tensor, latent: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Training/prefill form: q (B, H, T, rd + nope) over latent (B, S, rd + r) expanded
        to per-head K/V -> (B, H, T, v_dim). mask (.., T, S) from cache_mask; None: causal
        (S == T)."""
        k, v = self.expand(latent)
        if mask is None and self.on_attention is not None:
            self.on_attention(self.layer, attention_logprobs(q, k))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                              scale=self.scale)

    def absorbed(self, q: torch.Tensor, latent: torch.Tensor,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decode form, equal to expanded: q_nope W_uk_h scores the latents directly, and the
        probabilities average the latents before W_uv_h. Then the heads are queries of one
        shared KV head [k_r | c] with value c, folded into the query axis as _attend_grouped
        folds a group. W_uk's bias adds q_nope . b_k to every key's score alike, which softmax
        ignores; W_uv's bias passes through the average (the probabilities sum to 1).
        q (B, H, T, rd + nope), latent (B, S, rd + r), mask cache_mask(.., S, group=H)
        (for one token group=1's (1, 1, 1, S) broadcasts the same) -> (B, H, T, v_dim)."""
        kv = latent[:, None]  # (B, 1, S, rd + r)
        # the whole [k_r | c] as value, c's part of the result kept: SDPA's fused CPU kernel
        # wants K and V of one width; with the value a narrower view of the same buffer,
        # inductor lowers attention to its own loops instead, 1.7x slower per step
        # (SmolLM2 as MLA, 4k slots x 8, compiled: 57 vs 98 tok/s)
        ctx = F.scaled_dot_product_attention(self.absorb(q), kv, kv, attn_mask=mask,
                                             scale=self.scale)
        return self.unabsorb(ctx, q.shape[2])

    def absorbed_kernel(self, q: torch.Tensor, latent: torch.Tensor,
                        input_pos: torch.Tensor) -> torch.Tensor:
        """absorbed through model/decode_attention.py's kernel (one token, CPU, float32):
        the heads are the query rows of one KV head [k_r | c], whose value is the same
        buffer (c's part kept, as absorbed does); reads slots up to input_pos."""
        kv = latent[:, None]  # (B, 1, S, rd + r)
        q_abs = self.absorb(q).transpose(1, 2)  # (B, H, 1, rd + r)
        ctx = decode_attention.attend(q_abs, kv, kv, input_pos, self.scale)
        return self.unabsorb(ctx.transpose(1, 2), q.shape[2])

    def absorb(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, rd + nope) -> [q_rope | q_nope W_uk_h] (B, 1, H*T, rd + r), rows (h, t):
        the queries of one shared KV head [k_r | c]."""
        B, H, T, _ = q.shape
        q_rope, q_nope = q.split([self.rope_dim, self.nope_dim], dim=-1)
        w_uk = self.k_up.weight.view(H, self.nope_dim, self.kv_rank)
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        return torch.cat([q_rope, q_latent], dim=-1).reshape(B, 1, H * T, -1)

    def unabsorb(self, ctx: torch.Tensor, T: int) -> torch.Tensor:
        """The probability-weighted [k_r | c] (B, 1, H*T, rd + r) -> heads' values through
        W_uv_h (B, H, T, v_dim); W_uv's bias passes through the average unchanged."""
        B, H = ctx.shape[0], self.n_head
        ctx = ctx[..., self.rope_dim:].reshape(B, H, T, self.kv_rank)
        w_uv = self.v_up.weight.view(H, self.v_dim, self.kv_rank)
        y = torch.einsum("bhtr,hvr->bhtv", ctx, w_uv)
        return y if self.v_up.bias is None else y + self.v_up.bias.view(H, 1, self.v_dim)
