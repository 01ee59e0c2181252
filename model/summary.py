"""Parameter counts per component and KV-cache bytes per token, beside the MHA equivalent."""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.kv_cache import kv_bytes_per_token


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per component, computed from the config alone."""
    d, L, f = cfg.d_model, cfg.n_layer, cfg.ffn_hidden
    mb = int(cfg.mlp_bias)  # 1 where the MLP's projections carry biases
    up = 2 if cfg.mlp == "swiglu" else 1  # gate and up, or up alone
    counts = {
        "embeddings": (cfg.vocab_size + (cfg.max_seq_len if cfg.positions == "learned" else 0)) * d,
        **{name: L * n for name, n in attention_counts(cfg).items()},
        "mlp": L * (up * (d + mb) * f + (f + mb) * d),
        "norms": (2 * L + 1) * d * (2 if cfg.norm == "layernorm" else 1),
        "head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
    }
    counts["total"] = sum(counts.values())
    return counts


def attention_counts(cfg: ModelConfig) -> dict[str, int]:
    """One layer's q, k, v, o parameters. MLA's k: the latent's down-projection (shared
    with v, counted once here), the RoPE key and W_uk; its v: W_uv."""
    d, H, ab = cfg.d_model, cfg.n_head, int(cfg.attn_bias)
    if cfg.kv_rank:
        r, rd = cfg.kv_rank, cfg.rope_dim
        return {"q": (d + ab) * H * (rd + cfg.nope_dim),
                "k": d * r + (d + ab) * rd + (r + ab) * H * cfg.nope_dim,
                "v": (r + ab) * H * cfg.v_dim, "o": (H * cfg.v_dim + ab) * d}
    hd, kv = cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    return {"q": (d + ab) * H * hd, "k": (d + ab) * kv, "v": (d + ab) * kv,
            "o": (H * hd + ab) * d}


def format_summary(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> str:
    """A table of this config beside its MHA equivalent."""
    mha = cfg.with_kv_heads(cfg.n_head)
    ours, ref = param_counts(cfg), param_counts(mha)
    header = f"{'component':<12}{cfg.attention_type:>14}{'MHA':>14}"
    rows = [f"{name:<12}{ours[name]:>14,}{ref[name]:>14,}" for name in ours]
    ours_kv, ref_kv = kv_bytes_per_token(cfg, dtype), kv_bytes_per_token(mha, dtype)
    smaller = f"{ref_kv / ours_kv:.0f}x smaller, " if ours_kv < ref_kv else ""
    rows.append(f"{'KV B/token':<12}{ours_kv:>14,}{ref_kv:>14,}"
                f"   ({smaller}{str(dtype).removeprefix('torch.')})")
    heads = (f"latent {cfg.kv_rank} + RoPE key {cfg.rope_dim}" if cfg.kv_rank
             else f"{cfg.n_kv_head} KV heads, head_dim {cfg.head_dim}")
    shape = (f"{cfg.attention_type}: {cfg.n_layer} layers, d_model {cfg.d_model}, "
             f"{cfg.n_head} query heads, {heads}")
    return "\n".join([shape, header, *rows])



def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, forward + backward (nanoGPT's estimate_mfu, PaLM appendix B):
    6 per weight of every matmul (2 forward, 4 backward) — the output head included even
    when it shares the embedding, whose lookup costs nothing — plus attention's two products
    over seq_len keys, 6 · n_layer · n_head · (query/key width + value width) · seq_len, i.e.
    12 · n_layer · n_head · head_dim · seq_len without MLA (the causal mask's unused half
    counted, as both sources do). MLA counts its expanded (training) form. Norms and
    elementwise ops are left out."""
    counts = param_counts(cfg)
    matmul_weights = (counts["total"] - counts["embeddings"] - counts["norms"] - counts["head"]
                      + cfg.vocab_size * cfg.d_model)
    qk, v = (cfg.rope_dim + cfg.nope_dim, cfg.v_dim) if cfg.kv_rank else (cfg.head_dim,) * 2
    return 6 * matmul_weights + 6 * cfg.n_layer * cfg.n_head * (qk + v) * seq_len
