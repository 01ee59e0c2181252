"""Cached decoding equals the full forward; the model is causal."""
import pytest
import torch

from model import KVCache, ModelConfig, Transformer
from model.sampling import SamplingConfig, generate, prefill

KV_HEADS = pytest.mark.parametrize("n_kv_head", [8, 2, 1], ids=["MHA", "GQA-2", "MQA"])


# The switches GPT-2 and NeoX set (store/hf_families.py), at tiny sizes.
FAMILIES = {
    "gpt2": dict(norm="layernorm", mlp="gelu_tanh", attn_bias=True, mlp_bias=True,
                 positions="learned"),
    "neox": dict(norm="layernorm", mlp="gelu", attn_bias=True, mlp_bias=True, rotary_dim=2,
                 parallel_residual=True),
}


def tiny_model(n_kv_head, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{"vocab_size": 97, "n_layer": 2, "n_head": 8, "n_kv_head": n_kv_head,
                         "d_model": 64, "max_seq_len": 96, "init_std": 0.1, **overrides})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # biases start at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("family", ["llama", *FAMILIES])
@KV_HEADS
def test_token_by_token_decode_equals_full_forward(n_kv_head, family):
    model = tiny_model(n_kv_head, **FAMILIES.get(family, {}))
    tokens = torch.randint(0, 97, (2, 40))
    full = model(tokens)  # (B, T, V)
    cache = KVCache.for_model(model.config, batch_size=2)
    stepwise = torch.cat([model(tokens[:, t:t + 1], cache, torch.tensor([t]))
                          for t in range(40)], dim=1)
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=1e-5)


@KV_HEADS
def test_chunked_prefill_then_decode_equals_full_forward(n_kv_head):
    model = tiny_model(n_kv_head)
    tokens = torch.randint(0, 97, (3, 50))
    full = model(tokens)
    cache = KVCache.for_model(model.config, batch_size=3, max_len=50)
    bounds = [(0, 17), (17, 30), (30, 44)] + [(t, t + 1) for t in range(44, 50)]
    pieces = [model(tokens[:, a:b], cache, torch.arange(a, b)) for a, b in bounds]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@KV_HEADS
def test_prefill_in_chunks_equals_one_prefill(n_kv_head):
    model = tiny_model(n_kv_head)
    tokens = torch.randint(0, 97, (2, 45))
    one, chunked = (KVCache.for_model(model.config, batch_size=2, max_len=60) for _ in "ab")
    whole = prefill(model, tokens, one)
    torch.testing.assert_close(prefill(model, tokens, chunked, chunk_size=16), whole,
                               atol=1e-5, rtol=1e-5)
    for a, b in zip(one.k + one.v, chunked.k + chunked.v):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@KV_HEADS
def test_cached_greedy_generation_equals_uncached(n_kv_head):
    model = tiny_model(n_kv_head)
    prompt = torch.randint(0, 97, (4, 7))
    greedy = SamplingConfig(temperature=0)
    cached = generate(model, prompt, 40, greedy, use_cache=True)
    uncached = generate(model, prompt, 40, greedy, use_cache=False)
    assert torch.equal(cached, uncached)
    assert cached.shape == (4, 47)


@KV_HEADS
def test_changing_a_token_never_changes_earlier_logits(n_kv_head):
    model = tiny_model(n_kv_head)
    tokens = torch.randint(0, 97, (1, 30))
    for t in (0, 11, 29):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1) % 97
        before, after = model(tokens), model(changed)
        assert torch.equal(before[:, :t], after[:, :t])
        assert not torch.allclose(before[:, t:], after[:, t:])


def test_tied_embeddings_share_one_tensor_and_untied_do_not():
    tied, untied = tiny_model(8), tiny_model(8, tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.embed.weight.data_ptr()


def test_sequence_longer_than_context_is_refused():
    model = tiny_model(8)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 97, dtype=torch.long))


def saved_bytes_and_grads(model, tokens):
    """Bytes autograd keeps for backward (outside any checkpoint's own recompute), and
    every parameter's gradient after one backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    return sum(saved), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_kv_head", [8, 2], ids=["MHA", "GQA-2"])
def test_activation_checkpointing_keeps_gradients_and_saves_less(n_kv_head):
    model = tiny_model(n_kv_head, n_layer=3).train()
    tokens = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(0))
    plain_bytes, plain = saved_bytes_and_grads(model, tokens)
    model.activation_checkpointing = True
    ckpt_bytes, ckpt = saved_bytes_and_grads(model, tokens)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    assert ckpt_bytes < plain_bytes / 2, (ckpt_bytes, plain_bytes)  # the blocks' activations
    with torch.no_grad():  # inference never checkpoints (nothing to save)
        torch.testing.assert_close(model(tokens), tiny_model(n_kv_head, n_layer=3)(tokens))
