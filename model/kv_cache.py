"""A preallocated per-layer KV cache that holds only the n_kv_head K/V heads."""
from __future__ import annotations

import torch

from model.config import ModelConfig


class KVCache:
    """K and V buffers of shape (B, n_kv_head, max_len, head_dim) for every layer.

    Writes go in place at a position tensor; nothing is concatenated or expanded, so
    memory is fixed at creation and GQA/MQA save exactly n_head / n_kv_head of MHA's
    bytes. The cache keeps no position of its own: the caller owns input_pos, so a
    compiled decode step sees the same shapes and no Python state at every step.
    """

    def __init__(self, n_layer: int, batch_size: int, max_len: int, n_kv_head: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> "KVCache":
        max_len = max_len or cfg.max_seq_len
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len "
                             f"{cfg.max_seq_len}: shorten the prompt or max_new_tokens")
        return cls(cfg.n_layer, batch_size, max_len, cfg.n_kv_head, cfg.head_dim, dtype, device)

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, n_kv, T, hd) at positions input_pos (T,); return the whole
        buffers (B, n_kv, max_len, hd), to be read through cache_mask. k, v take the
        buffers' dtype (a no-op when they match): a forward that autocasts on its own, as
        Accelerate's prepare makes it, still writes into a cache built outside autocast."""
        self.k[layer].index_copy_(2, input_pos, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, input_pos, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Cache bytes one token costs per sequence: K and V, every layer, n_kv heads."""
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * dtype.itemsize
