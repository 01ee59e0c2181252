"""Parameter counts per component and KV-cache bytes per token, beside the MHA equivalent."""
from __future__ import annotations

import torch

from model.config import ModelConfig
from model.kv_cache import kv_bytes_per_token


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameters per component, computed from the config alone."""
    d, L, hd, f = cfg.d_model, cfg.n_layer, cfg.head_dim, cfg.ffn_hidden
    ab, mb = int(cfg.attn_bias), int(cfg.mlp_bias)  # 1 where projections carry biases
    up = 2 if cfg.mlp == "swiglu" else 1  # gate and up, or up alone
    counts = {
        "embeddings": (cfg.vocab_size + (cfg.max_seq_len if cfg.positions == "learned" else 0)) * d,
        "q": L * (d + ab) * cfg.n_head * hd,
        "k": L * (d + ab) * cfg.n_kv_head * hd,
        "v": L * (d + ab) * cfg.n_kv_head * hd,
        "o": L * (cfg.n_head * hd + ab) * d,
        "mlp": L * (up * (d + mb) * f + (f + mb) * d),
        "norms": (2 * L + 1) * d * (2 if cfg.norm == "layernorm" else 1),
        "head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
    }
    counts["total"] = sum(counts.values())
    return counts


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
    shape = (f"{cfg.attention_type}: {cfg.n_layer} layers, d_model {cfg.d_model}, "
             f"{cfg.n_head} query heads, {cfg.n_kv_head} KV heads, head_dim {cfg.head_dim}")
    return "\n".join([shape, header, *rows])



def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token, forward + backward (nanoGPT's estimate_mfu, PaLM appendix B):
    6 per weight of every matmul (2 forward, 4 backward) — the output head included even
    when it shares the embedding, whose lookup costs nothing — plus attention's two products
    over seq_len keys, 12 · n_layer · n_head · head_dim · seq_len (the causal mask's unused
    half counted, as both sources do). Norms and elementwise ops are left out."""
    counts = param_counts(cfg)
    matmul_weights = (counts["total"] - counts["embeddings"] - counts["norms"] - counts["head"]
                      + cfg.vocab_size * cfg.d_model)
    return 6 * matmul_weights + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
