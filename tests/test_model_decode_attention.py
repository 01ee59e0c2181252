"""model/decode_attention.py: the decode attention kernel over the float and int8 KV caches
against float64 references (both ISA bodies where the CPU has them), the slots it must not
read, the pieces it merges, and a model decoding through it token for token as without it."""
from __future__ import annotations

import copy

import pytest
import torch

from model import decode_attention, kernels
from model.config import ModelConfig
from model.kv_cache import QuantizedKVCache
from model.sampling import SamplingConfig, generate
from model.transformer import Transformer

pytestmark = pytest.mark.skipif(not kernels.available()[0], reason=kernels.available()[1])

BODIES = [False] + ([True] if kernels.isa() == "avx512" else [])  # the op's avx512 argument


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
    """softmax(q K^T / sqrt(hd)) V in float64 over slots 0..pos, K/V repeated per contiguous
    group: q (B, H, 1, hd), k, v (B, G, S, hd) -> (B, H, 1, hd)."""
    group = q.shape[1] // k.shape[1]
    k, v = (t[:, :, :pos + 1].double().repeat_interleave(group, 1) for t in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("avx512", BODIES)
@pytest.mark.parametrize("B,H,G,hd,S,pos", [
    (2, 9, 3, 64, 100, 57),    # GQA-3, SmolLM2's head_dim
    (1, 9, 1, 64, 2100, 2050),  # MQA, long enough to be cut into pieces and merged
    (3, 4, 4, 32, 40, 39),     # MHA, the last slot
    (1, 6, 2, 128, 33, 0),     # the first token: one slot
    (2, 8, 2, 16, 700, 511),   # a piece boundary (512 slots)
])
def test_float_cache_equals_float64_reference_and_never_reads_past_the_position(
        avx512, B, H, G, hd, S, pos):
    torch.manual_seed(0)
    q = torch.randn(B, H, 1, hd)
    k, v = torch.randn(B, G, S, hd), torch.randn(B, G, S, hd)
    k[:, :, pos + 1:], v[:, :, pos + 1:] = float("nan"), float("nan")  # not written yet
    grouped = (q.view(B, G, H // G, hd) * hd ** -0.5).contiguous()
    y = torch.ops.gqalab_attention.attend(grouped, k, v, torch.tensor([pos]), avx512)
    torch.testing.assert_close(y.view(B, H, 1, hd).double(), reference(q, k, v, pos),
                               atol=2e-6, rtol=1e-5)


def test_a_strided_cache_view_is_read_in_place():
    """The op takes (B, G, S, hd) views whose rows are contiguous, such as a slice of slots."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 1, 32), torch.randn(2, 2, 90, 32), torch.randn(2, 2, 90, 32)
    view_k, view_v = k[:, :, 10:], v[:, :, 10:]
    torch.testing.assert_close(decode_attention.attend(q, view_k, view_v, torch.tensor([60])),
                               reference(q, view_k, view_v, 60).float(), atol=2e-6, rtol=1e-5)


def int8_cache(B: int, G: int, hd: int, prompt: int, max_len: int) -> QuantizedKVCache:
    torch.manual_seed(2)
    cache = QuantizedKVCache(1, B, max_len, G, hd)
    cache.update(0, torch.arange(prompt), torch.randn(B, G, prompt, hd),
                 torch.randn(B, G, prompt, hd))
    return cache


@pytest.mark.parametrize("avx512", BODIES)
@pytest.mark.parametrize("G,hd", [(3, 64), (1, 128)])  # GQA-3; MQA's 9 rows, two word vectors
@pytest.mark.parametrize("prompt", [5, 31, 32, 64, 1700])  # ring only, block edges, pieces
def test_int8_cache_equals_its_dequantized_float64_reference(avx512, G, hd, prompt):
    """One decode step over the int8 cache: the store's blocks dequantized (scales per
    channel and block for keys, per slot for values) plus the float ring, in float64."""
    B, H = 2, 9
    cache = int8_cache(B, G, hd, prompt, 2048)
    q, k_new, v_new = torch.randn(B, H, 1, hd), torch.randn(B, G, 1, hd), torch.randn(B, G, 1, hd)
    pos = torch.tensor([prompt])
    ring_k, ring_v = cache.update(0, pos, k_new, v_new)
    grouped = (q.view(B, G, H // G, hd) * hd ** -0.5).contiguous()
    y = torch.ops.gqalab_attention.attend_int8(
        grouped, cache.kq[0], cache.vq[0], cache.k_scale[0], cache.v_scale[0], ring_k, ring_v,
        pos, avx512)
    from model.kv_cache import unpack_int8
    stored = prompt // 32 * 32
    k = unpack_int8(cache.kq[0], hd).double()[:, :, :stored]
    k = k * cache.k_scale[0].double().repeat_interleave(32, 2)[:, :, :stored]
    v = unpack_int8(cache.vq[0], hd).double()[:, :, :stored] * cache.v_scale[0][:, :, :stored, None]
    k = torch.cat([k, ring_k[:, :, :prompt - stored + 1].double()], 2)
    v = torch.cat([v, ring_v[:, :, :prompt - stored + 1].double()], 2)
    torch.testing.assert_close(y.view(B, H, 1, hd).double(), reference(q, k, v, prompt),
                               atol=2e-6, rtol=1e-5)


def test_int8_cache_attend_goes_through_the_kernel_and_equals_its_torch_path(monkeypatch):
    """QuantizedKVCache.attend: the kernel where it runs, its own torch code otherwise; the
    two agree, and the kernel really ran."""
    B, H, G, hd = 2, 6, 2, 64
    cache = int8_cache(B, G, hd, 100, 256)
    other = copy.deepcopy(cache)
    q, k_new, v_new = torch.randn(B, H, 1, hd), torch.randn(B, G, 1, hd), torch.randn(B, G, 1, hd)
    calls = []
    monkeypatch.setattr(decode_attention, "attend_int8",
                        lambda *a: calls.append(1) or ATTEND_INT8(*a))
    y = cache.attend(0, q, k_new, v_new, torch.tensor([100]))
    monkeypatch.setattr(decode_attention, "enabled", False)
    y_torch = other.attend(0, q, k_new, v_new, torch.tensor([100]))
    assert calls == [1]
    torch.testing.assert_close(y, y_torch, atol=2e-6, rtol=1e-5)


ATTEND_INT8 = decode_attention.attend_int8


def test_runs_only_where_the_kernel_applies():
    q, k = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 8, 64)
    assert decode_attention.runs(q, k)
    assert not decode_attention.runs(q.bfloat16(), k.bfloat16())  # float32 only
    assert not decode_attention.runs(torch.randn(1, 4, 2, 64), k)  # one token a step
    assert not decode_attention.runs(torch.randn(1, 4, 1, 24), torch.randn(1, 2, 8, 24))
    assert not decode_attention.runs(q.requires_grad_(), k)  # the op has no backward


def test_the_report_names_the_attention_that_runs(monkeypatch):
    cfg = ModelConfig(vocab_size=97, n_layer=1, n_head=9, n_kv_head=3, d_model=576)
    line = decode_attention.describe(cfg, torch.float32, "float")
    assert line.startswith(f"C++ decode kernel ({kernels.isa()})") and "3 query heads" in line
    assert "int8 cache" in decode_attention.describe(cfg, torch.float32, "int8")
    assert decode_attention.describe(cfg, torch.bfloat16, "float").startswith("SDPA (")
    latent = ModelConfig(vocab_size=97, n_layer=1, n_head=2, d_model=16, kv_rank=12, rope_dim=4)
    assert "MLA's absorbed decode" in decode_attention.describe(latent, torch.float32, "float")
    assert decode_attention.describe(latent, torch.float32, "int8").startswith("the int8 latent")
    monkeypatch.setattr(decode_attention, "enabled", False)
    assert decode_attention.describe(cfg, torch.float32, "float") == (
        "SDPA (the C++ decode kernel: turned off)")


def small_model(n_kv_head: int) -> Transformer:
    """head_dim 16, weights scaled up so greedy picks are clear."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=n_kv_head, d_model=64,
                      max_seq_len=700, init_std=0.2)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
@pytest.mark.parametrize("kv_cache", ["float", "int8"])
def test_greedy_ids_equal_with_and_without_the_kernel_and_uncached(monkeypatch, n_kv_head,
                                                                   kv_cache):
    """600 new tokens: past the first piece boundary and across many int8 blocks."""
    model, greedy = small_model(n_kv_head), SamplingConfig(temperature=0)
    prompt = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(3))
    ran = []
    monkeypatch.setattr(decode_attention, "attend",
                        lambda *a: ran.append(1) or ATTEND(*a))
    with_kernel = generate(model, prompt, 600, greedy, kv_cache=kv_cache)
    assert ran or kv_cache == "int8"  # the float cache really went through it
    monkeypatch.setattr(decode_attention, "enabled", False)
    without = generate(model, prompt, 600, greedy, kv_cache=kv_cache)
    assert torch.equal(with_kernel, without)
    if kv_cache == "float":
        assert torch.equal(with_kernel, generate(model, prompt, 600, greedy, use_cache=False))
    assert len(set(with_kernel[0, 40:].tolist())) > 10  # varied picks


ATTEND = decode_attention.attend


@pytest.mark.parametrize("rope_dim", [8, 0])  # [k_r | c] of 32; all latent (learned positions)
def test_mla_absorbed_decode_through_the_kernel_equals_sdpa_and_uncached(monkeypatch, rope_dim):
    """MLA's absorbed decode: the heads read one shared [k_r | c] per token through the
    kernel (scale: the query's whole width), greedy ids as through SDPA and uncached."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=64, max_seq_len=700,
                      init_std=0.2, kv_rank=32 - rope_dim, rope_dim=rope_dim,
                      positions="rope" if rope_dim else "learned")
    model, greedy = Transformer(cfg).eval(), SamplingConfig(temperature=0)
    prompt = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(4))
    ran = []
    monkeypatch.setattr(decode_attention, "attend", lambda *a: ran.append(1) or ATTEND(*a))
    with_kernel = generate(model, prompt, 300, greedy)
    assert ran
    monkeypatch.setattr(decode_attention, "enabled", False)
    assert torch.equal(with_kernel, generate(model, prompt, 300, greedy))
    assert torch.equal(with_kernel, generate(model, prompt, 300, greedy, use_cache=False))
    assert len(set(with_kernel[0, 30:].tolist())) > 10
