"""The one attention module against an independent einsum reference (MQA paper formulas)."""
from types import SimpleNamespace

import pytest
import torch

import model.attention as attention_mod
from model.attention import CausalSelfAttention, rope_tables
from model.config import ModelConfig

torch.manual_seed(0)


def rope_reference(x, positions, theta):
    """Rotate each (i, i + hd/2) pair by position · theta^(-2i/hd), as complex numbers."""
    hd = x.shape[-1]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    rot = torch.polar(torch.ones(len(positions), hd // 2, dtype=torch.float64),
                      positions[:, None].double() * freqs)  # (T, hd/2)
    pairs = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2:].double()) * rot
    return torch.cat([pairs.real, pairs.imag], dim=-1).float()


def attention_reference(x, attn: CausalSelfAttention, theta: float):
    """Per-head projections, causal softmax over keys, weighted sum, output projection."""
    B, T, d = x.shape
    H, G, hd = attn.n_head, attn.n_kv_head, attn.head_dim
    P_q = attn.q_proj.weight.view(H, hd, d)
    P_k = attn.k_proj.weight.view(G, hd, d)
    P_v = attn.v_proj.weight.view(G, hd, d)
    P_o = attn.o_proj.weight.view(d, H, hd)
    pos = torch.arange(T)
    q = rope_reference(torch.einsum("btd,hkd->bhtk", x, P_q), pos, theta)
    k = rope_reference(torch.einsum("btd,gkd->bgtk", x, P_k), pos, theta)
    v = torch.einsum("btd,gkd->bgtk", x, P_v)
    kv_of_head = torch.arange(H) // (H // G)  # contiguous groups
    logits = torch.einsum("bhtk,bhsk->bhts", q, k[:, kv_of_head]) / hd ** 0.5
    logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    o = torch.einsum("bhts,bhsk->bhtk", logits.softmax(dim=-1), v[:, kv_of_head])
    return torch.einsum("bhtk,ehk->bte", o, P_o)


def build(n_head, n_kv_head, d_model=64, theta=10000.0):
    cfg = ModelConfig(vocab_size=32, n_layer=1, n_head=n_head, n_kv_head=n_kv_head,
                      d_model=d_model, max_seq_len=64, rope_theta=theta)
    attn = CausalSelfAttention(cfg, layer=0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, theta)
    return cfg, attn, cos, sin


@pytest.mark.parametrize("n_kv_head", [8, 4, 2, 1], ids=["MHA", "GQA-4", "GQA-2", "MQA"])
def test_attention_equals_einsum_reference(n_kv_head):
    cfg, attn, cos, sin = build(8, n_kv_head, theta=500.0)
    x = torch.randn(2, 13, cfg.d_model)
    ours = attn(x, cos[:13], sin[:13])
    torch.testing.assert_close(ours, attention_reference(x, attn, 500.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_gqa_equals_mha_with_kv_heads_repeated_per_group(n_kv_head):
    cfg, gqa, cos, sin = build(8, n_kv_head)
    _, mha, _, _ = build(8, 8)
    group, hd = 8 // n_kv_head, cfg.head_dim
    mha.load_state_dict({
        "q_proj.weight": gqa.q_proj.weight, "o_proj.weight": gqa.o_proj.weight,
        "k_proj.weight": gqa.k_proj.weight.view(n_kv_head, hd, -1)
                             .repeat_interleave(group, 0).reshape(8 * hd, -1),
        "v_proj.weight": gqa.v_proj.weight.view(n_kv_head, hd, -1)
                             .repeat_interleave(group, 0).reshape(8 * hd, -1),
    })
    # in float64: the two sum in different orders (grouped vs per head), and in fp32 a random
    # draw can land one element past 1e-5; the claim is equality, so check it where it is exact
    x = torch.randn(3, 10, cfg.d_model, dtype=torch.float64)
    cos, sin = cos[:10].double(), sin[:10].double()
    torch.testing.assert_close(gqa.double()(x, cos, sin), mha.double()(x, cos, sin),
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["GQA-4", "MQA"])
def test_enable_gqa_path_equals_expanded_path_and_reads_kv_heads_in_place(n_kv_head, monkeypatch):
    """Both training paths, forced on CPU: SDPA's enable_gqa (the CUDA half-precision choice)
    gets the n_kv heads un-expanded; the fallback gets them repeated per group. Same output,
    forward and backward."""
    cfg, attn, cos, sin = build(8, n_kv_head)
    x = torch.randn(2, 11, cfg.d_model, requires_grad=True)
    sdpa, kv_heads_seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, **kw):
        kv_heads_seen.append(k.shape[1])
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", spy)
    outputs = {}
    for fused in (True, False):
        monkeypatch.setattr(attention_mod, "fused_gqa", lambda q, fused=fused: fused)
        out = attn(x, cos[:11], sin[:11])
        outputs[fused] = (out, *torch.autograd.grad(out.square().sum(), [x, attn.k_proj.weight]))
    assert kv_heads_seen == [n_kv_head, 8]
    for a, b in zip(outputs[True], outputs[False]):  # fp32, summed in different orders
        torch.testing.assert_close(a, b, atol=1e-5 * a.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(outputs[True][0], attention_reference(x, attn, 10000.0),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rotary_dim", [8, 4], ids=["rope", "partial-rope"])
def test_under_autocast_q_k_v_reach_attention_in_the_autocast_dtype(rotary_dim, monkeypatch):
    """fp32 weights and rope tables under bf16 autocast (Accelerate's mixed precision): q and
    k stay bf16 through RoPE, as v does, so fused_gqa sees a half-precision q and SDPA one
    dtype (its fused enable_gqa kernel needs both); without and with a cache."""
    cfg, attn, _, _ = build(8, 2)  # head_dim 8
    cos, sin = rope_tables(rotary_dim, cfg.max_seq_len, 10000.0)
    sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(attention_mod.F, "scaled_dot_product_attention", spy)
    fused_gqa, asked = attention_mod.fused_gqa, []
    monkeypatch.setattr(attention_mod, "fused_gqa", lambda q: asked.append(q.dtype) or fused_gqa(q))
    x = torch.randn(2, 5, cfg.d_model)
    cache = attention_mod.KVCache.for_model(cfg, 2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(x, cos[:5], sin[:5])
        mask = attention_mod.cache_mask(torch.arange(5), 8, 4)
        attn(x, cos[:5], sin[:5], cache, torch.arange(5), mask)
    assert asked == [torch.bfloat16]
    assert seen == [(torch.bfloat16,) * 3] * 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_gqa_exactly_for_half_precision_cuda(device, dtype):
    """True exactly where SDPA's enable_gqa has a fused kernel: CUDA in bf16/fp16. Without a
    GPU the CUDA q is a stand-in carrying a CUDA tensor's properties (the decision reads
    only those)."""
    if device == "cpu" or torch.cuda.is_available():
        q = torch.zeros(1, 2, 3, 4, dtype=dtype, device=device)
    else:
        q = SimpleNamespace(is_cuda=True, device=torch.device("cuda"), dtype=dtype,
                            shape=torch.Size([1, 2, 3, 4]))
    expected = device == "cuda" and dtype in (torch.bfloat16, torch.float16)
    assert attention_mod.fused_gqa(q) is expected


def test_kv_projections_have_n_kv_head_rows():
    cfg, attn, _, _ = build(8, 2)
    assert attn.k_proj.weight.shape == (2 * cfg.head_dim, cfg.d_model)
    assert attn.v_proj.weight.shape == (2 * cfg.head_dim, cfg.d_model)
    assert attn.o_proj.weight.shape == (cfg.d_model, 8 * cfg.head_dim)
