"""A preallocated per-layer KV cache that holds only the n_kv_head K/V heads, in full
precision (KVCache) or int8 (QuantizedKVCache); for MLA models, only each token's latent and
shared RoPE key (LatentCache, or QuantizedLatentCache in int8)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model import decode_attention, kernels
from model.config import ModelConfig


def load_kernels(device: torch.device | str) -> None:
    """A cache on the CPU is read by model/decode_attention.py's kernel where it builds (and
    is turned on)."""
    if torch.device(device).type == "cpu" and decode_attention.enabled:
        kernels.load()


class KVCache:
    """K and V buffers of shape (B, n_kv_head, max_len, head_dim) for every layer.

    Writes go in place at a position tensor; nothing is concatenated or expanded, so
    memory is fixed at creation and GQA/MQA save exactly n_head / n_kv_head of MHA's
    bytes. The cache keeps no position of its own: the caller owns input_pos, so a
    compiled decode step sees the same shapes and no Python state at every step.
    """

    quantized = False  # attention reads the buffers update returns

    def __init__(self, n_layer: int, batch_size: int, max_len: int, n_kv_head: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        load_kernels(device)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> "KVCache":
        """The float cache for cfg's model: one entry point for every attention kind, so an
        MLA model (kv_rank > 0) gets its LatentCache here."""
        if cfg.kv_rank:
            return LatentCache.for_model(cfg, batch_size, max_len, dtype, device)
        max_len = checked_len(cfg, max_len)
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


def checked_len(cfg: ModelConfig, max_len: int | None) -> int:
    """The cache length asked for (None: the model's context), refused past the context."""
    max_len = max_len or cfg.max_seq_len
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds the model's max_seq_len "
                         f"{cfg.max_seq_len}: shorten the prompt or max_new_tokens")
    return max_len


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> int:
    """Cache bytes one token costs per sequence, every layer: K and V of n_kv heads, or
    MLA's latent and shared RoPE key."""
    if cfg.kv_rank:
        return cfg.n_layer * (cfg.kv_rank + cfg.rope_dim) * dtype.itemsize
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * dtype.itemsize


class LatentCache:
    """MLA's cache: one buffer (B, max_len, rope_dim + kv_rank) per layer, each token's
    rotated shared RoPE key beside its latent, in that order (the order of each query's
    [rope | nope] parts). Side by side so the absorbed decode reads one buffer as its keys
    and a view of it as its values, with no copy per step. Written in place at a position
    tensor, like KVCache."""

    quantized = False

    def __init__(self, n_layer: int, batch_size: int, max_len: int, width: int,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        shape = (batch_size, max_len, width)
        load_kernels(device)
        self.latent = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.max_len = max_len

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> "LatentCache":
        return cls(cfg.n_layer, batch_size, checked_len(cfg, max_len), cfg.rope_dim + cfg.kv_rank,
                   dtype, device)

    def update(self, layer: int, input_pos: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Write latent (B, T, rd + r) at positions input_pos (T,); return the whole buffer
        (B, max_len, rd + r), to be read through cache_mask. Cast as KVCache.update does."""
        self.latent[layer].index_copy_(1, input_pos, latent.to(self.latent[layer].dtype))
        return self.latent[layer]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latent)


class QuantizedKVCache(KVCache):
    """An int8 KV cache in KIVI's layout: keys per channel (one scale per channel, head and
    block of `window` tokens: keys have outlier channels), values per token (one scale
    per token and head), both symmetric; the newest block, 1..window tokens, stays in full
    precision until it is complete.

    One static graph decodes with it: every step writes its token into the full-precision
    ring (slot = position % window) and re-quantizes the whole current block into the int8
    store. Attention reads the store only for complete blocks and the ring for the rest,
    so a block's int8 copy is read only once it holds its final tokens. The prompt is
    written in one chunk from position 0 (prefill attends to its own full-precision K/V);
    afterwards one token per step.
    """

    quantized = True

    def __init__(self, n_layer: int, batch_size: int, max_len: int, n_kv_head: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", window: int = 32) -> None:
        self.window, self.max_len = window, max_len
        self.head_dim = head_dim
        load_kernels(device)
        blocks = -(-max_len // window)
        store = (batch_size, n_kv_head, blocks * window, -(-head_dim // 4))  # packed: 4 a word
        ring = (batch_size, n_kv_head, window, head_dim)
        self.kq = [torch.zeros(store, dtype=torch.int32, device=device) for _ in range(n_layer)]
        self.vq = [torch.zeros(store, dtype=torch.int32, device=device) for _ in range(n_layer)]
        self.k_scale = [torch.zeros(batch_size, n_kv_head, blocks, head_dim, device=device)
                        for _ in range(n_layer)]  # per channel and block
        self.v_scale = [torch.zeros(batch_size, n_kv_head, blocks * window, device=device)
                        for _ in range(n_layer)]  # per token
        self.k = [torch.zeros(ring, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(ring, dtype=dtype, device=device) for _ in range(n_layer)]

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                  window: int = 32) -> "QuantizedKVCache":
        if cfg.kv_rank:
            return QuantizedLatentCache.for_model(cfg, batch_size, max_len, dtype, device)
        cache = super().for_model(cfg, batch_size, max_len, dtype, device)  # checks max_len
        if window < 1:
            raise ValueError(f"the full-precision window must be >= 1 token, got {window}")
        return cls(cfg.n_layer, batch_size, cache.max_len, cfg.n_kv_head, cfg.head_dim, dtype,
                   device, window)

    def _store_blocks(self, layer: int, first_block: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
        """Quantize k, v (B, G, n * window, hd) into the store from block first_block (1,)."""
        B, G, T, hd = k.shape
        R = self.window
        kb = k.float().view(B, G, T // R, R, hd)
        k_scale = kb.abs().amax(3).clamp(min=1e-30) / 127  # (B, G, n, hd): per channel
        kq = pack_int8(torch.round(kb / k_scale[:, :, :, None]).view(B, G, T, hd))
        v_scale = v.float().abs().amax(-1).clamp(min=1e-30) / 127  # (B, G, T): per token
        vq = pack_int8(torch.round(v.float() / v_scale[..., None]))
        blocks = first_block + torch.arange(T // R, device=k.device)
        slots = (first_block * R + torch.arange(T, device=k.device))
        self.kq[layer].index_copy_(2, slots, kq)
        self.vq[layer].index_copy_(2, slots, vq)
        self.k_scale[layer].index_copy_(2, blocks, k_scale)
        self.v_scale[layer].index_copy_(2, slots, v_scale)

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, G, T, hd) at input_pos (T,). One token: into the ring, then the
        current block re-quantized; returns the ring. A prompt (T > 1, from position 0):
        its blocks quantized, the last one also kept in the ring; returns k, v themselves,
        which the prompt's own attention reads."""
        R, T = self.window, k.shape[2]
        if T == 1:
            self.k[layer].index_copy_(2, input_pos % R, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, input_pos % R, v.to(self.v[layer].dtype))
            self._store_blocks(layer, input_pos // R, self.k[layer], self.v[layer])
            return self.k[layer], self.v[layer]
        if int(input_pos[0]) != 0:
            raise ValueError("kv_cache=int8 takes the prompt in one chunk from position 0, "
                             "then one token per step: prefill without chunk_size")
        pad = -T % R  # complete the last block with zeros: slots past the prompt are masked
        kp, vp = (F.pad(t, (0, 0, 0, pad)) for t in (k, v))
        self._store_blocks(layer, input_pos[:1] * 0, kp, vp)
        self.k[layer].copy_(kp[:, :, -R:])
        self.v[layer].copy_(vp[:, :, -R:])
        return k, v

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               input_pos: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
        """Decode attention of one new token: q (B, H, 1, hd), its k, v (B, G, 1, hd) at
        input_pos (1,) -> (B, H, 1, hd). Complete blocks come from the int8 store (scales
        folded into q and the probabilities, so the int8 values are read once and never
        dequantized into a buffer), the current block from the ring. kv_len (eager): read
        only the blocks filled so far."""
        B, H, _, hd = q.shape
        G, R = self.kq[layer].shape[1], self.window
        ring_k, ring_v = self.update(layer, input_pos, k, v)
        if decode_attention.runs(q, ring_k) and decode_attention.int8_fits(hd, R):
            return decode_attention.attend_int8(q, self.kq[layer], self.vq[layer],
                                                self.k_scale[layer], self.v_scale[layer],
                                                ring_k, ring_v, input_pos)
        n = self.kq[layer].shape[2] if kv_len is None else (kv_len - 1) // R * R
        kq, vq = self.kq[layer][:, :, :n], self.vq[layer][:, :, :n]  # (B, G, n, hd / 4)
        k_scale = self.k_scale[layer][:, :, :n // R]  # (B, G, n / R, hd)
        v_scale = self.v_scale[layer][:, :, :n]  # (B, G, n)
        qg = q.view(B, G, H // G, hd).float() * hd ** -0.5  # (B, G, g, hd): contiguous groups
        pos = input_pos[-1]
        block_start = pos // R * R
        # complete blocks (slot < block_start) from the store; the ring's slots up to pos
        q_blocks = qg[:, :, :, None, :] * k_scale[:, :, None]  # (B, G, g, n / R, hd)
        s_store = int8_dot(q_blocks, kq.unflatten(2, (n // R, R))).flatten(-2)  # (B, G, g, n)
        s_store = s_store.masked_fill(torch.arange(n, device=q.device) >= block_start,
                                      float("-inf"))
        s_ring = qg @ ring_k.float().transpose(-1, -2)  # (B, G, g, R)
        s_ring = s_ring.masked_fill(torch.arange(R, device=q.device) > pos - block_start,
                                    float("-inf"))
        p = torch.cat([s_store, s_ring], dim=-1).softmax(-1)  # (B, G, g, n + R)
        y = int8_weighted_sum(p[..., :n] * v_scale[:, :, None], vq, hd)  # (B, G, g, hd)
        y = y + p[..., n:] @ ring_v.float()
        return y.to(q.dtype).view(B, H, 1, hd)

    @property
    def nbytes(self) -> int:
        tensors = self.kq + self.vq + self.k_scale + self.v_scale + self.k + self.v
        return sum(t.numel() * t.element_size() for t in tensors)


# The int8 stores hold four values in each int32 word: byte b of word j is channel
# b * words + j, so each byte plane is a contiguous run of channels. Inductor loads int8 a
# float vector's width at a time, and ATen's AVX2 int8 vector loads that many bytes through
# a memcpy: on AVX2 the int8 loops ran ~15x slower than these whole-word loads (two shifts
# and a convert per plane), which AVX-512 decodes at about the same speed as int8 loads.
# QuantizedLatentCache keeps plain int8: packed, a group's scale changes mid-vector on
# AVX-512 (8 words a group) and its step ran at half speed there; on AVX2 its int8 loops
# stay slow, and quant_kernels=auto keeps the float latent cache.

def pack_int8(x: torch.Tensor) -> torch.Tensor:
    """Integer-valued x (.., d) in [-127, 127] -> int32 words (.., ceil(d / 4)), zero-padded."""
    x = F.pad(x.to(torch.int32), (0, -x.shape[-1] % 4)).unflatten(-1, (4, -1))
    # the top byte keeps its sign; the sum never overflows: 127 * 2**24 + 0xFFFFFF < 2**31
    return ((x[..., 0, :] & 255) + (x[..., 1, :] & 255) * 256 + (x[..., 2, :] & 255) * 65536
            + x[..., 3, :] * 16777216)


def byte_plane(words: torch.Tensor, b: int) -> torch.Tensor:
    """The signed byte b of every word, as floats: channels b * words + j."""
    return ((words << (24 - 8 * b)) >> 24).float()


def unpack_int8(words: torch.Tensor, d: int) -> torch.Tensor:
    """pack_int8's inverse, as floats (.., d)."""
    return torch.cat([byte_plane(words, b) for b in range(4)], -1)[..., :d]


def byte_split(x: torch.Tensor) -> torch.Tensor:
    """Float x (.., d) laid out as the packed planes: (.., 4, ceil(d / 4)), zero-padded."""
    return F.pad(x, (0, -x.shape[-1] % 4)).unflatten(-1, (4, -1))


def int8_dot(q: torch.Tensor, kq: torch.Tensor) -> torch.Tensor:
    """q (B, G, g, nb, hd) float . kq (B, G, nb, R, hd / 4) packed over hd -> (B, G, g, nb, R).
    Compiled: broadcast products summed over the words, which inductor fuses into one loop
    reading the packed values (a matmul would first write them out as floats, 4x the bytes)."""
    if torch.compiler.is_compiling():
        qp = byte_split(q)  # (B, G, g, nb, 4, hd / 4)
        return sum(qp[:, :, :, :, None, b] * byte_plane(kq, b)[:, :, None]
                   for b in range(4)).sum(-1)
    return torch.einsum("bgqnd,bgnrd->bgqnr", q, unpack_int8(kq, q.shape[-1]))


def int8_weighted_sum(p: torch.Tensor, vq: torch.Tensor, hd: int) -> torch.Tensor:
    """p (B, G, g, n) float, vq (B, G, n, hd / 4) packed -> sum over n of p * v: (B, G, g, hd)."""
    if torch.compiler.is_compiling():
        planes = [(p[..., None] * byte_plane(vq, b)[:, :, None]).sum(-2) for b in range(4)]
        return torch.cat(planes, -1)[..., :hd]
    return p @ unpack_int8(vq, hd)


class QuantizedLatentCache(LatentCache):
    """MLA's cache in int8: each token's [k_r | c] in groups of `group` channels, each group
    int8 with its own fp32 scale (symmetric, absmax / 127). Per token, not per channel as
    QuantizedKVCache's keys: the latent is key and value at once, and a token's groups never
    change once written, so no full-precision window is kept and nothing is re-quantized.
    Per group, because the latent's channels come out of a factorization whose leading
    channels carry most of the scale, and the RoPE key has a scale of its own.

    The prompt (one chunk from position 0) attends to its own full-precision latents; each
    decoded token reads the int8 store with the scales folded into the query and the
    probabilities, so the values are never dequantized into a buffer (compiled)."""

    quantized = True

    def __init__(self, n_layer: int, batch_size: int, max_len: int, width: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 group: int = 32) -> None:
        self.width, self.max_len = width, max_len
        n_groups = -(-width // group)  # the last group zero-padded
        self.q = [torch.zeros(batch_size, max_len, n_groups, group, dtype=torch.int8,
                              device=device) for _ in range(n_layer)]
        self.scale = [torch.zeros(batch_size, max_len, n_groups, device=device)
                      for _ in range(n_layer)]

    def grouped(self, x: torch.Tensor) -> torch.Tensor:
        """x (.., width) -> float32 (.., n_groups, group), zero-padded."""
        n_groups, group = self.q[0].shape[-2:]
        return F.pad(x.float(), (0, n_groups * group - self.width)).unflatten(-1, (n_groups, group))

    def update(self, layer: int, input_pos: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Quantize latent (B, T, width) into the store at input_pos (T,); return latent
        itself, which the prompt's own attention reads."""
        if latent.shape[1] > 1 and int(input_pos[0]) != 0:
            raise ValueError("kv_cache=int8 takes the prompt in one chunk from position 0, "
                             "then one token per step: prefill without chunk_size")
        x = self.grouped(latent)  # (B, T, n_groups, group)
        scale = x.abs().amax(-1).clamp(min=1e-30) / 127  # (B, T, n_groups)
        self.q[layer].index_copy_(1, input_pos, torch.round(x / scale[..., None]).to(torch.int8))
        self.scale[layer].index_copy_(1, input_pos, scale)
        return latent

    def attend(self, layer: int, q: torch.Tensor, latent: torch.Tensor, input_pos: torch.Tensor,
               kv_len: int | None, scale: float) -> torch.Tensor:
        """Decode attention of one new token over the store: q the absorbed queries
        (B, 1, H, width), latent the token's own (B, 1, width) at input_pos (1,) ->
        the probability-weighted latents (B, 1, H, width). kv_len (eager): read only the
        slots filled so far."""
        self.update(layer, input_pos, latent)
        n = kv_len or self.max_len
        cq, cs = self.q[layer][:, :n], self.scale[layer][:, :n]  # (B, n, ng, gs), (B, n, ng)
        qg = self.grouped(q[:, 0] * scale)  # (B, H, ng, gs)
        ctx = int8_latent_attention(qg, cq, cs, torch.arange(n, device=q.device) <= input_pos[-1])
        return ctx.flatten(-2)[:, None, :, :self.width].to(q.dtype)  # (B, 1, H, width)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.q + self.scale)


def int8_latent_attention(q: torch.Tensor, cq: torch.Tensor, cs: torch.Tensor,
                          visible: torch.Tensor) -> torch.Tensor:
    """Softmax attention of q (B, H, ng, gs) over the int8 latents cq (B, n, ng, gs) with
    scales cs (B, n, ng), keys and values alike, slots where visible (n,) -> (B, H, ng, gs).
    Compiled: broadcast products and sums, which inductor fuses into loops reading the int8
    values; eager: the latents dequantized once, then two matmuls."""
    if torch.compiler.is_compiling():
        s = (q[:, :, None] * cq[:, None] * cs[:, None, :, :, None]).sum((-1, -2))  # (B, H, n)
        p = s.masked_fill(~visible, float("-inf")).softmax(-1)
        return (p[..., None, None] * (cq * cs[..., None])[:, None]).sum(2)
    kv = (cq.float() * cs[..., None]).flatten(-2)  # (B, n, ng * gs)
    p = (q.flatten(-2) @ kv.transpose(-1, -2)).masked_fill(~visible, float("-inf")).softmax(-1)
    return (p @ kv).unflatten(-1, cq.shape[-2:])
