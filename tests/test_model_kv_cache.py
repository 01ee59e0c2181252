"""KV-cache sizes: only n_kv_head heads are stored, preallocated once; the int8 cache's
attention error, bytes, and decode against the float cache."""
import pytest
import torch
import torch.nn.functional as F

from model import KVCache, ModelConfig, Transformer
from model.kv_cache import QuantizedKVCache, kv_bytes_per_token
from model.sampling import prefill
from tests.helpers import compile_works


def config(n_kv_head, **kw):
    return ModelConfig(vocab_size=50, n_layer=3, n_head=8, n_kv_head=n_kv_head, d_model=128,
                       max_seq_len=64, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_head", [8, 4, 2, 1])
def test_bytes_follow_the_formula(n_kv_head, dtype):
    cfg = config(n_kv_head)
    cache = KVCache.for_model(cfg, batch_size=5, max_len=48, dtype=dtype)
    size = torch.tensor([], dtype=dtype).element_size()
    assert cache.nbytes == 2 * cfg.n_layer * 5 * 48 * n_kv_head * cfg.head_dim * size
    assert kv_bytes_per_token(cfg, dtype) * 5 * 48 == cache.nbytes


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_mha_over_gqa_ratio_is_n_head_over_n_kv_head(n_kv_head):
    mha = KVCache.for_model(config(8), batch_size=2)
    gqa = KVCache.for_model(config(n_kv_head), batch_size=2)
    assert mha.nbytes / gqa.nbytes == 8 / n_kv_head


def test_decoding_writes_in_place_without_growing():
    cfg = config(2)
    model = Transformer(cfg).eval()
    cache = KVCache.for_model(cfg, batch_size=1, max_len=10)
    buffers = [t.data_ptr() for t in cache.k + cache.v]
    with torch.inference_mode():
        for t in range(10):
            model(torch.tensor([[t]]), cache, torch.tensor([t]))
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers
    assert cache.k[0].shape == (1, 2, 10, cfg.head_dim)
    assert cache.k[0].abs().sum(dim=(0, 1, 3)).ne(0).all()  # every position written
    with pytest.raises(ValueError, match="KV cache full"):
        prefill(model, torch.tensor([[1, 2, 3]]), cache, start=8)


def test_slots_not_yet_written_are_never_read():
    """The cache is read whole through a mask: stale entries beyond the current position
    (left by a longer earlier sequence) must not change the logits. (Finite ones: 0 * NaN
    is NaN in the attention product, which is why buffers start as zeros.)"""
    cfg = config(2)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 50, (2, 12))
    clean, dirty = (KVCache.for_model(cfg, batch_size=2, max_len=20) for _ in "ab")
    for t in dirty.k + dirty.v:
        t[:, :, 12:] = 1e3 * torch.randn_like(t[:, :, 12:])
    with torch.inference_mode():  # kv_len=None: the whole cache, through the mask
        whole = [model(tokens, cache, torch.arange(12)) for cache in (dirty, clean)]
    torch.testing.assert_close(*whole)
    torch.testing.assert_close(whole[0][:, -1], prefill(model, tokens, clean))  # kv_len=12


def test_cache_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        KVCache.for_model(config(2), batch_size=1, max_len=65)


# ---------------------------------------------------------------- int8 (QuantizedKVCache)

def int8_attention(q, k, v, window: int) -> torch.Tensor:
    """Decode attention of the last query through a QuantizedKVCache that took the first
    T-1 tokens as a prompt and the last as a decode step. q (B, H, T, hd), k, v (B, G, T,
    hd) -> (B, H, 1, hd)."""
    B, H, T, hd = q.shape
    cache = QuantizedKVCache(1, B, T, k.shape[1], hd, window=window)
    with torch.inference_mode():
        cache.update(0, torch.arange(T - 1), k[:, :, :-1], v[:, :, :-1])
        return cache.attend(0, q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], torch.tensor([T - 1]))


def sdpa_last(q, k, v) -> torch.Tensor:
    """float64 attention of the last query over all keys, query head h on KV head h // rep."""
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q[:, :, -1:].double(), k.double().repeat_interleave(
        rep, 1), v.double().repeat_interleave(rep, 1))


def attention_error(q, k, v, window: int) -> float:
    """Relative error (norm) of int8_attention against float64 SDPA over the float K/V."""
    ref = sdpa_last(q, k, v)
    return ((int8_attention(q, k, v, window).double() - ref).norm() / ref.norm()).item()


def kivi_reference(k, v, window: int):
    """K/V as KIVI's int8 holds them, one block / token at a time in float64: complete
    blocks of `window` tokens round-tripped (keys per channel over the block, values per
    token, symmetric max/127); the tokens of the last, incomplete block exact."""
    k, v = k.double().clone(), v.double().clone()
    T = k.shape[2]
    for start in range(0, T - T % window if T % window else T - window, window):
        blk = k[:, :, start:start + window]
        step = blk.abs().amax(2, keepdim=True) / 127
        k[:, :, start:start + window] = torch.round(blk / step) * step
        for t in range(start, start + window):
            step = v[:, :, t].abs().amax(-1, keepdim=True) / 127
            v[:, :, t] = torch.round(v[:, :, t] / step) * step
    return k, v


@pytest.mark.parametrize("n_kv_head", [8, 2, 1])
def test_int8_attention_output_on_random_inputs(n_kv_head):
    """Keys with outlier channels (why KIVI scales keys per channel) and values with
    outlier tokens; 100 tokens: 3 complete int8 blocks + 4 in the float window. The output
    is KIVI's (the same rounding done independently, to 1e-5), within 2% of float32 on
    these deliberately wide inputs (~1% measured)."""
    g = torch.Generator().manual_seed(0)
    B, H, T, hd = 2, 8, 100, 32
    q = torch.randn(B, H, T, hd, generator=g)
    k = torch.randn(B, n_kv_head, T, hd, generator=g) * torch.logspace(-1, 1, hd)
    v = torch.randn(B, n_kv_head, T, hd, generator=g) * torch.logspace(-1, 1, T)[:, None]
    y = int8_attention(q, k, v, window=32).double()
    torch.testing.assert_close(y, sdpa_last(q, *kivi_reference(k, v, 32)), atol=1e-5, rtol=1e-5)
    assert attention_error(q, k, v, window=32) < 0.02


@pytest.mark.parametrize("d", [4, 7, 64])
def test_packed_words_round_trip_and_planes_line_up_with_byte_split(d):
    """Every int8 value, in every byte of a word (the top byte's sign included), comes back;
    byte plane b holds channels b * words + j, the layout byte_split gives the queries."""
    from model.kv_cache import byte_plane, byte_split, pack_int8, unpack_int8
    x = torch.randint(-127, 128, (300, d))
    x[:255, 0], x[:255, -1] = torch.arange(-127, 128), torch.arange(127, -128, -1)
    words = pack_int8(x)
    assert words.dtype == torch.int32 and words.shape == (300, -(-d // 4))
    assert torch.equal(unpack_int8(words, d), x.float())
    q = torch.randn(d, dtype=torch.float64)
    planes = torch.stack([byte_plane(words, b) for b in range(4)], -2).double()
    torch.testing.assert_close((byte_split(q) * planes).sum((-1, -2)), x.double() @ q)


@pytest.mark.skipif(compile_works() is not None, reason="torch.compile unavailable")
def test_int8_attention_compiled_equals_eager_at_an_odd_head_dim():
    """head_dim 30 (words zero-padded): the compiled decode attention (byte planes read in
    fused loops) gives eager's output (the store unpacked once), which is KIVI's."""
    g = torch.Generator().manual_seed(1)
    B, H, G, T, hd = 2, 6, 2, 70, 30
    q, k, v = (torch.randn(B, h, T, hd, generator=g) for h in (H, G, G))
    eager = int8_attention(q, k, v, window=16)
    torch.testing.assert_close(eager.double(), sdpa_last(q, *kivi_reference(k, v, 16)),
                               atol=1e-5, rtol=1e-5)
    cache = QuantizedKVCache(1, B, T, G, hd, window=16)
    step = torch.compile(cache.attend, fullgraph=True)
    with torch.inference_mode():
        cache.update(0, torch.arange(T - 1), k[:, :, :-1], v[:, :, :-1])
        y = step(0, q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], torch.tensor([T - 1]))
    torch.testing.assert_close(y, eager, atol=1e-5, rtol=1e-5)


def test_int8_cache_bytes_and_refusals():
    cfg = config(2)
    cache = QuantizedKVCache.for_model(cfg, batch_size=3, max_len=64, window=16)
    per_layer = (2 * 3 * 2 * 64 * cfg.head_dim  # int8 K and V
                 + 3 * 2 * 4 * cfg.head_dim * 4 + 3 * 2 * 64 * 4  # K per channel, V per token
                 + 2 * 3 * 2 * 16 * cfg.head_dim * 4)  # the float window
    assert cache.nbytes == cfg.n_layer * per_layer
    big = ModelConfig(vocab_size=50, n_layer=2, n_head=4, d_model=256, max_seq_len=4096)
    ratio = (QuantizedKVCache.for_model(big, 8, 4096).nbytes
             / KVCache.for_model(big, 8, 4096).nbytes)
    # head_dim 64, window 32: int8 (1/4) + scales (12 B per 512) + the window (32 of 4096)
    assert ratio == pytest.approx(0.25 + 12 / 512 + 32 / 4096)
    model = Transformer(cfg).eval()
    with pytest.raises(ValueError, match="one chunk from position 0"):
        prefill(model, torch.tensor([[1, 2, 3, 4]]), cache_for(model, cfg), chunk_size=2)


def cache_for(model, cfg):
    return QuantizedKVCache.for_model(cfg, batch_size=1, max_len=16, window=4)


@pytest.mark.parametrize("n_kv_head", [8, 2, 1])
def test_int8_cache_decode_matches_float_cache_and_compiled_equals_eager(n_kv_head):
    """A random model (MHA, GQA, MQA): logits of every decode step through the int8 cache
    within 1% of the float cache's; compiled int8 steps give eager int8's greedy ids
    (compiled for MQA only, to keep the suite short: the graph is the same code)."""
    from model.sampling import SamplingConfig, generate
    torch.manual_seed(0)
    model = Transformer(config(n_kv_head)).eval()
    prompt = torch.randint(0, 50, (2, 11))
    greedy = SamplingConfig(temperature=0)
    eager = generate(model, prompt, 40, greedy, kv_cache="int8")
    if n_kv_head == 1:
        assert torch.equal(generate(model, prompt, 40, greedy, kv_cache="int8", compile=True),
                           eager)
    with torch.inference_mode():  # teacher-forced on eager's ids: logits step by step
        caches = [KVCache.for_model(model.config, 2, 51),
                  QuantizedKVCache.for_model(model.config, 2, 51, window=8)]
        outs = [prefill(model, prompt, c) for c in caches]
        torch.testing.assert_close(outs[1], outs[0])  # the prompt attends in full precision
        for t in range(11, 50):
            ref, q8 = (model(eager[:, t:t + 1], c, torch.tensor([t]), kv_len=t + 1)
                       for c in caches)
            assert (q8 - ref).norm() / ref.norm() < 0.01
