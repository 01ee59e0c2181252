"""Sampling rules: greedy, top-k, top-p, seeds, EOS, lengths."""
import pytest
import torch

from model import KVCache, ModelConfig, Transformer
from model.sampling import (SamplingConfig, compiled_decode_step, decode_step, filter_top_p,
                            generate, new_cache, prefill, sample, stream)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, n_layer=1, n_head=4, n_kv_head=2, d_model=32,
                      max_seq_len=64, init_std=0.3)
    return Transformer(cfg).eval()


def test_temperature_zero_is_argmax():
    logits = torch.randn(16, 50)
    assert torch.equal(sample(logits, SamplingConfig(temperature=0)), logits.argmax(-1))


def test_top_k_never_leaves_the_k_best():
    logits = torch.randn(4, 50)
    best = logits.topk(5, dim=-1).indices
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        token = sample(logits, SamplingConfig(temperature=2.0, top_k=5), gen)
        assert (best == token[:, None]).any(-1).all()


def smallest_prefix_reaching(probs: torch.Tensor, p: float) -> set[int]:
    """Reference: walk tokens from most to least likely until their mass reaches p."""
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda t: -probs[t].item()):
        kept.add(token)
        mass += probs[token].item()
        if mass >= p:
            return kept
    return kept


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.999])
def test_top_p_keeps_the_smallest_prefix_with_mass_p(p):
    logits = torch.randn(8, 40, dtype=torch.float64) * 2
    kept = filter_top_p(logits, p).isfinite()
    for row in range(8):
        expected = smallest_prefix_reaching(logits[row].softmax(-1), p)
        assert set(kept[row].nonzero().flatten().tolist()) == expected


def test_top_p_samples_only_from_the_nucleus():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0, -6.0]])
    gen = torch.Generator().manual_seed(1)
    seen = {sample(logits, SamplingConfig(top_p=0.8), gen).item() for _ in range(300)}
    assert seen == smallest_prefix_reaching(logits[0].softmax(-1), 0.8)


def test_same_seed_same_text_and_other_seed_other_text():
    model = tiny_model()
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95)
    runs = [generate(model, [1, 2, 3], 30, cfg, num_samples=3,
                     generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert runs[0].shape == (3, 33)
    assert not torch.equal(runs[0][0], runs[0][1])  # samples in a batch differ


def test_stops_when_every_sample_emitted_eos():
    model = tiny_model()
    greedy = SamplingConfig(temperature=0)
    free = generate(model, [5, 6], 20, greedy)[0, 2:].tolist()
    eos = free[3]
    stopped = generate(model, [5, 6], 20, greedy, eos_id=eos)[0, 2:].tolist()
    assert stopped == free[: free.index(eos) + 1]


def test_any_of_several_stop_ids_ends_a_sequence():
    """eos_id=[EOS, end of turn]: the first of them to come ends the sequence, in the cached
    and the uncached stream alike."""
    model = tiny_model()
    greedy = SamplingConfig(temperature=0)
    free = generate(model, [5, 6], 20, greedy)[0, 2:].tolist()
    late, early = free[6], next(t for t in free[2:6] if t not in free[:2])
    assert free.index(early) < free.index(late)  # early really comes first
    for use_cache in (True, False):
        stopped = generate(model, [5, 6], 20, greedy, eos_id=[late, early],
                           use_cache=use_cache)[0, 2:].tolist()
        assert stopped == free[: free.index(early) + 1], use_cache


def test_finished_samples_keep_emitting_eos():
    """A head biased towards EOS (token 0, about 1 in 5 per step): the rows end at different
    steps; a finished row keeps emitting EOS while the others sample on (without the rule it
    would sample freely again), and the stream stops once every row has ended."""
    model = tiny_model()
    model.lm_head.register_forward_hook(lambda m, args, out: out + torch.nn.functional.one_hot(
        torch.tensor(0), out.shape[-1]) * 3.0)
    steps = list(stream(model, [5, 6], 40, SamplingConfig(temperature=3.0), num_samples=6,
                        eos_id=0, generator=torch.Generator().manual_seed(3)))
    tokens = torch.stack(steps, dim=1)  # (B, new)
    first_eos = [row.index(0) for row in tokens.tolist()]  # every row ended (index raises)
    assert len(set(first_eos)) > 1 and min(first_eos) < tokens.shape[1] - 3
    assert max(first_eos) == tokens.shape[1] - 1  # stopped at the last row's EOS
    for row, end in zip(tokens.tolist(), first_eos):
        assert 0 not in row[:end] or end == 0
        assert all(t == 0 for t in row[end:])


def test_prompt_plus_new_tokens_beyond_context_is_refused():
    with pytest.raises(ValueError, match="exceeds the model's context of 64"):
        generate(tiny_model(), list(range(60)), 5)


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k")])
def test_invalid_sampling_values_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**bad)


@pytest.mark.parametrize("n_kv_head, family", [
    (8, {}), (2, {}),
    (2, dict(norm="layernorm", mlp="gelu", attn_bias=True, rotary_dim=4, parallel_residual=True))],
    ids=["MHA", "GQA-2", "NeoX-GQA-2"])  # MQA: test_model_kv_cache compiles its int8 decode
def test_compiled_decode_equals_eager(n_kv_head, family):
    """The compiled step (frozen weights, autotuned GEMMs, static cache) must produce the
    eager step's logits, and so the same greedy tokens; also with NeoX's partial rotary."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=8, n_kv_head=n_kv_head,
                                    d_model=64, max_seq_len=64, init_std=0.1, **family)).eval()
    prompt = torch.randint(0, 97, (3, 5))
    greedy = SamplingConfig(temperature=0)
    eager = generate(model, prompt, 20, greedy)
    assert torch.equal(generate(model, prompt, 20, greedy, compile=True), eager)
    with torch.inference_mode():
        cache = KVCache.for_model(model.config, batch_size=3, max_len=25)
        token = prefill(model, prompt, cache).argmax(-1)
        pos = torch.tensor([5])
        compiled = compiled_decode_step(model)(model, token, pos, cache)
        torch.testing.assert_close(compiled, decode_step(model, token, pos, cache),
                                   atol=1e-4, rtol=1e-4)


def test_each_model_decodes_through_its_own_compiled_step():
    """Steps skip dynamo's guards on the model's modules, so two models of one architecture
    must never share a graph (the second would decode with the first's frozen weights):
    each gets its own step, equal to its own eager logits, and refuses the other model."""
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                      max_seq_len=32, init_std=0.1)
    models = [Transformer(cfg).eval() for _ in range(2)]
    token, pos = torch.tensor([3, 5]), torch.tensor([0])
    with torch.inference_mode():
        for model in models:
            cache, eager_cache = (KVCache.for_model(cfg, batch_size=2, max_len=8) for _ in "ab")
            torch.testing.assert_close(compiled_decode_step(model)(model, token, pos, cache),
                                       decode_step(model, token, pos, eager_cache),
                                       atol=1e-4, rtol=1e-4)
        assert compiled_decode_step(models[0]) is compiled_decode_step(models[0])
        with pytest.raises(ValueError, match="another model"):
            compiled_decode_step(models[0])(models[1], token, pos, cache)


BF16_AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)  # train.py's sampling on CUDA


def test_cache_under_autocast_holds_its_dtype_and_decodes_like_the_full_forward():
    """fp32 weights under bf16 autocast (how train.py samples while training): the cache
    holds bf16, what attention produces (half fp32's bytes), and every cached step's logits
    are the uncached forward's under the same autocast; so are the greedy tokens."""
    model = tiny_model()
    tokens = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast(**BF16_AUTOCAST), torch.inference_mode():
        cache = new_cache(model, 2, 12)
        steps = [prefill(model, tokens[:, :4], cache)]  # logits at position 3
        steps += [decode_step(model, tokens[:, t], torch.tensor([t]), cache, t + 1)
                  for t in range(4, 12)]
        full = model(tokens)[:, 3:]  # (B, 9, V)
        greedy = SamplingConfig(temperature=0)
        cached_tokens = generate(model, tokens[:, :4], 8, greedy)
        uncached_tokens = generate(model, tokens[:, :4], 8, greedy, use_cache=False)
    assert {t.dtype for t in cache.k + cache.v} == {torch.bfloat16}
    cached = torch.stack(steps, dim=1)  # (B, 9, V)
    assert cached.dtype == full.dtype == torch.bfloat16
    torch.testing.assert_close(cached.float(), full.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(cached_tokens, uncached_tokens)


def test_a_forward_that_autocasts_itself_fills_a_cache_built_outside_autocast():
    """Accelerate's prepare wraps the model's own forward in autocast, so generate() outside
    any autocast builds an fp32 cache that receives bf16 K/V: they are stored exactly, and
    the tokens are those of generating under an outer autocast (a bf16 cache)."""
    model = tiny_model()
    prompt, greedy = torch.tensor([[5, 9, 2, 7]]), SamplingConfig(temperature=0)
    with torch.autocast(**BF16_AUTOCAST):
        outer = generate(model, prompt, 16, greedy)
    model.forward = torch.autocast(**BF16_AUTOCAST)(model.forward)
    assert torch.equal(generate(model, prompt, 16, greedy), outer)
