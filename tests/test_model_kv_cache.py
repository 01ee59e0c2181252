"""KV-cache sizes: only n_kv_head heads are stored, preallocated once."""
import pytest
import torch

from model import KVCache, ModelConfig, Transformer
from model.kv_cache import kv_bytes_per_token
from model.sampling import prefill


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
