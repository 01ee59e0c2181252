"""The decoder-only transformer: pre-norm blocks of a norm, attention and an MLP.

Llama by default (RMSNorm, SwiGLU, RoPE); ModelConfig's switches pick GPT-2's and NeoX's
small differences (LayerNorm, GELU, biases, learned or partial-rotary positions, parallel
residual) inside the same modules."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import (CausalSelfAttention, LatentSelfAttention, LatentUp, cache_mask,
                             project, rope_tables)
from model.config import ModelConfig
from model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision.
        norm = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return norm.type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    return RMSNorm(cfg.d_model, cfg.norm_eps)


class MLP(nn.Module):
    """SwiGLU (down(silu(gate(x)) * up(x))), or down(gelu(up(x))) for GPT-2 and NeoX."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f, bias = cfg.d_model, cfg.ffn_hidden, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, f, bias=bias) if cfg.mlp == "swiglu" else None
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        self.gelu_approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(F.gelu(self.up_proj(x), approximate=self.gelu_approximate))
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = (LatentSelfAttention if cfg.kv_rank else CausalSelfAttention)(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.parallel_residual = cfg.parallel_residual

    def forward(self, x, cos, sin, cache=None, input_pos=None, mask=None,
                kv_len=None) -> torch.Tensor:
        attn = self.attn(self.attn_norm(x), cos, sin, cache, input_pos, mask, kv_len)
        if self.parallel_residual:  # NeoX: both branches read the block's input
            return x + attn + self.mlp(self.mlp_norm(x))
        x = x + attn
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # Training memory for compute: keep each block's input only and recompute its
        # activations in backward (train.py's activation_checkpointing).
        self.activation_checkpointing = False
        learned = cfg.positions == "learned"
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model) if learned else None
        self.init_rope()
        self.init_weights()

    def init_rope(self) -> None:
        """The rope tables: buffers that are not saved, so a model built on the meta device
        (store.checkpoint.model_from_state) calls this again once its weights are in."""
        cfg = self.config
        cos, sin = (None, None) if cfg.positions == "learned" else rope_tables(
            cfg.rotated_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_freqs)
        self.register_buffer("rope_cos", cos, persistent=False)  # (L, rd)
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        """Share the embedding with the output head; call again after loading weights."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def init_weights(self) -> None:
        std = self.config.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding, LatentUp)):
                # GPT-2: layers writing into the residual stream shrink with depth.
                residual_out = name.endswith(("o_proj", "down_proj"))
                scale = 1 / math.sqrt(2 * self.config.n_layer) if residual_out else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
            if isinstance(module, (nn.Linear, LatentUp)) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                input_pos: torch.Tensor | None = None, last_only: bool = False,
                kv_len: int | None = None) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), or (B, 1, V) with last_only.

        Without a cache the tokens sit at positions 0..T-1. With one, they sit at
        input_pos (T,), a long tensor the caller owns (model.sampling does): their K/V
        are written there and each token attends to the cache up to its own position.
        kv_len: how many cache slots are filled after this write, when the caller knows it
        as an int (eager decoding reads only those); None reads the whole cache, the one
        static shape a compiled step needs.
        """
        T = tokens.shape[1]
        if cache is None:
            if T > self.config.max_seq_len:
                raise ValueError(f"sequence of {T} tokens exceeds max_seq_len "
                                 f"{self.config.max_seq_len}")
            pos, mask = slice(0, T), None
        elif input_pos is None:
            raise ValueError("a KV cache needs input_pos, the positions (T,) of the tokens: "
                             "use model.sampling.prefill/decode_step, which track them")
        else:
            group = self.config.n_head // self.config.n_kv_head
            pos, mask = input_pos, cache_mask(input_pos, kv_len or cache.max_len, group)
        x = self.embed(tokens)  # (B, T, d)
        if self.wpe is None:
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (T, rd)
        else:
            cos = sin = None
            x = x + self.wpe.weight[pos]  # (T, d): learned positions
        for block in self.blocks:
            if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, input_pos, mask, kv_len)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # (B, T, V)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

