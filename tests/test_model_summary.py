"""Parameter counts per component match the built model; KV bytes per token."""
import pytest
import torch

from model import ModelConfig, Transformer
from model.summary import flops_per_token, format_summary, param_counts


def test_issue_worked_check_k_and_v_projections():
    mha = param_counts(ModelConfig(d_model=1024, n_head=8, n_layer=1))
    mqa = param_counts(ModelConfig(d_model=1024, n_head=8, n_kv_head=1, n_layer=1))
    assert mha["k"] + mha["v"] == 2_097_152
    assert mqa["k"] + mqa["v"] == 262_144


GPT2 = dict(norm="layernorm", mlp="gelu_tanh", attn_bias=True, mlp_bias=True, positions="learned")
NEOX = dict(norm="layernorm", mlp="gelu", attn_bias=True, mlp_bias=True, parallel_residual=True)


@pytest.mark.parametrize("n_kv_head, tie, family", [
    (8, True, {}), (2, False, {}), (1, True, {}), (2, True, GPT2), (8, False, NEOX)])
def test_counts_match_the_modules(n_kv_head, tie, family):
    cfg = ModelConfig(vocab_size=100, n_layer=3, n_head=8, n_kv_head=n_kv_head, d_model=64,
                      tie_embeddings=tie, **family)
    model = Transformer(cfg)
    counts = param_counts(cfg)

    def numel(suffix):
        return sum(p.numel() for n, p in model.named_parameters() if n.endswith(suffix))
    assert counts["q"] == numel("q_proj.weight") + numel("q_proj.bias")
    assert counts["k"] == numel("k_proj.weight") + numel("k_proj.bias")
    assert counts["v"] == numel("v_proj.weight") + numel("v_proj.bias")
    assert counts["o"] == numel("o_proj.weight") + numel("o_proj.bias")
    assert counts["mlp"] == sum(numel(f"{m}_proj.{p}") for m in ("gate", "up", "down")
                                for p in ("weight", "bias"))
    assert counts["norms"] == numel("norm.weight") + numel("norm.bias")
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_summary_shows_kv_bytes_beside_mha():
    text = format_summary(ModelConfig(n_layer=2, n_head=8, n_kv_head=2, d_model=128),
                          torch.bfloat16)
    # 2 (K,V) · 2 layers · 2 heads · 16 dims · 2 bytes = 256; MHA: 1024
    kv_line = next(line for line in text.splitlines() if line.startswith("KV B/token"))
    assert kv_line.split()[2:6] == ["256", "1,024", "(4x", "smaller,"]
    assert kv_line.endswith("bfloat16)")
    mha = format_summary(ModelConfig(n_layer=2, n_head=8, d_model=128)).splitlines()[-1]
    assert mha.split()[2:] == ["2,048", "2,048", "(float32)"]  # no "1x smaller"


@pytest.mark.parametrize("n_kv_head, tie", [(4, True), (2, False), (1, True)],
                         ids=["MHA-tied", "GQA-2-untied", "MQA-tied"])
def test_flops_per_token_equals_torch_flop_counter(n_kv_head, tie):
    """Every matmul FLOP of a forward + backward, as torch's FlopCounterMode counts them
    (SDPA on its math kernel, whose bmm's the counter sees), equals the estimate exactly:
    neither counts norms, softmax or other elementwise work."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64,
                      max_seq_len=32, tie_embeddings=tie)
    B, T = 3, 24
    tokens = torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        Transformer(cfg)(tokens).sum().backward()
    assert counter.get_total_flops() == flops_per_token(cfg, T) * B * T
