"""Multi-head latent attention: the module against a per-head reference written from its
weights, the absorbed decode against the expanded form, cached decode against the full
forward, the cache's bytes, and the configs it refuses."""
import itertools
import math
import os

import pytest
import torch

from model.attention import LatentSelfAttention, LatentUp, apply_rope, cache_mask, rope_tables
from model.config import ConfigError, ModelConfig
from model.kv_cache import (KVCache, LatentCache, QuantizedKVCache, QuantizedLatentCache,
                            kv_bytes_per_token)
from model.quantized import quantize_model
from model.sampling import (SamplingConfig, compiled_decode_step, decode_step, generate,
                            new_cache, prefill)
from model.summary import param_counts
from model.transformer import Transformer

ROPE = dict(kv_rank=12, rope_dim=4)
GPT2_LIKE = dict(kv_rank=20, positions="learned", attn_bias=True, norm="layernorm", mlp="gelu_tanh")
WIDE = dict(kv_rank=16, rope_dim=6, nope_dim=10, v_dim=5, attn_bias=True)  # DeepSeek-style widths
SHAPES = pytest.mark.parametrize("mla", [ROPE, GPT2_LIKE, WIDE], ids=["rope", "gpt2", "wide"])


def mla_config(**mla) -> ModelConfig:
    return ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, max_seq_len=40,
                       init_std=0.2, **mla)


def with_random_biases(module: torch.nn.Module) -> torch.nn.Module:
    """init zeroes biases; random ones prove where each bias enters."""
    for name, p in module.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.3)
    return module


def reference_attention(attn: LatentSelfAttention, x: torch.Tensor, cfg: ModelConfig):
    """MLA spelled out per head from the weights: k_h = [rope(W_kr x) | W_uk_h W_dkv x + b],
    v_h = W_uv_h W_dkv x + b, causal softmax over (rd + nope)^-1/2-scaled scores."""
    B, T, _ = x.shape
    rd, nope, vd = cfg.rope_dim, cfg.nope_dim, cfg.v_dim
    c = x @ attn.kv_down.weight.T  # (B, T, r)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    cos, sin = rope_tables(rd, T, cfg.rope_theta) if rd else (None, None)
    heads = []
    for h in range(cfg.n_head):
        q = attn.q_proj(x)[..., h * (rd + nope):(h + 1) * (rd + nope)]
        k_nope = c @ attn.k_up.weight[h * nope:(h + 1) * nope].T
        v = c @ attn.v_up.weight[h * vd:(h + 1) * vd].T
        if attn.k_up.bias is not None:
            k_nope = k_nope + attn.k_up.bias[h * nope:(h + 1) * nope]
            v = v + attn.v_up.bias[h * vd:(h + 1) * vd]
        k = k_nope
        if rd:
            q = torch.cat([apply_rope(q[..., :rd], cos, sin), q[..., rd:]], dim=-1)
            k = torch.cat([apply_rope(attn.k_rope(x), cos, sin), k_nope], dim=-1)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(rd + nope)).masked_fill(~causal, -math.inf)
        heads.append(scores.softmax(-1) @ v)  # (B, T, vd)
    return attn.o_proj(torch.cat(heads, dim=-1))


@SHAPES
def test_expanded_forward_equals_the_per_head_reference(mla):
    torch.manual_seed(0)
    cfg = mla_config(**mla)
    model = with_random_biases(Transformer(cfg))
    attn, x = model.blocks[0].attn, torch.randn(2, 9, cfg.d_model)
    cos, sin = (model.rope_cos[:9], model.rope_sin[:9]) if cfg.rope_dim else (None, None)
    torch.testing.assert_close(attn(x, cos, sin), reference_attention(attn, x, cfg),
                               atol=1e-5, rtol=1e-5)


@SHAPES
@pytest.mark.parametrize("T", [1, 5])
def test_absorbed_decode_equals_expanded(mla, T):
    """Same queries over the same cached latents: W_uk absorbed into q, W_uv applied after
    the average, biases included; T > 1 with the mask folded per head (group=H)."""
    torch.manual_seed(1)
    cfg = mla_config(**mla)
    attn = with_random_biases(Transformer(cfg)).blocks[1].attn.double()
    S = 11
    q = torch.randn(2, cfg.n_head, T, cfg.rope_dim + cfg.nope_dim, dtype=torch.float64)
    latent = torch.randn(2, S, cfg.rope_dim + cfg.kv_rank, dtype=torch.float64)
    pos = torch.arange(S - T, S)
    expanded = attn.expanded(q, latent, cache_mask(pos, S, group=1))
    absorbed = attn.absorbed(q, latent, cache_mask(pos, S, group=cfg.n_head))
    torch.testing.assert_close(absorbed, expanded, atol=1e-12, rtol=1e-10)


@SHAPES
def test_cached_prefill_and_decode_equal_the_full_forward(mla):
    """Prefill in two chunks (the expanded form over the cache), then absorbed decode steps:
    every step's logits are the uncached forward's at that position, in fp32."""
    torch.manual_seed(2)
    model = with_random_biases(Transformer(mla_config(**mla))).eval()
    tokens = torch.randint(0, 97, (3, 16))
    full = model(tokens)
    cache = new_cache(model, 3, 16)
    assert isinstance(cache, LatentCache)
    logits = prefill(model, tokens[:, :7], cache, chunk_size=4)
    torch.testing.assert_close(logits, full[:, 6], atol=2e-5, rtol=2e-5)
    for t in range(7, 16):
        logits = decode_step(model, tokens[:, t], torch.tensor([t]), cache, t + 1)
        torch.testing.assert_close(logits, full[:, t], atol=2e-5, rtol=2e-5)


def greedy_case():
    torch.manual_seed(3)
    model = with_random_biases(Transformer(mla_config(**WIDE))).eval()
    return model, torch.randint(0, 97, (2, 5)), SamplingConfig(temperature=0)


def test_greedy_ids_equal_cached_and_uncached():
    """Greedy continuations: cached (absorbed decode) == uncached (expanded forward)."""
    model, prompt, greedy = greedy_case()
    eager = generate(model, prompt, 12, greedy)
    assert torch.equal(generate(model, prompt, 12, greedy, use_cache=False), eager)


@pytest.mark.skipif(not os.environ.get("GQALAB_COMPILE_TESTS"),
                    reason="compiling MLA's decode step (max_autotune) takes 1-3 min on a "
                           "shared CPU: GQALAB_COMPILE_TESTS=1 runs it")
def test_greedy_ids_equal_eager_and_compiled():
    model, prompt, greedy = greedy_case()
    eager = generate(model, prompt, 12, greedy)
    assert torch.equal(generate(model, prompt, 12, greedy, compile=True), eager)
    eager8 = generate(model, prompt, 12, greedy, kv_cache="int8")
    assert torch.equal(generate(model, prompt, 12, greedy, compile=True, kv_cache="int8"), eager8)
    with torch.inference_mode():
        cache = new_cache(model, 2, 17)
        token, pos = prefill(model, prompt, cache).argmax(-1), torch.tensor([5])
        torch.testing.assert_close(compiled_decode_step(model)(model, token, pos, cache),
                                   decode_step(model, token, pos, cache), atol=1e-4, rtol=1e-4)


def test_quantized_weights_keep_the_up_projections_float_and_decode_like_their_forward():
    torch.manual_seed(4)
    model = quantize_model(Transformer(mla_config(**ROPE)).eval(), "int8")
    attn = model.blocks[0].attn
    assert type(attn.kv_down).__name__ == "Int8Linear" and isinstance(attn.k_up, LatentUp)
    tokens = torch.randint(0, 97, (2, 10))
    full, cache = model(tokens), new_cache(model, 2, 10)
    prefill(model, tokens[:, :6], cache)
    for t in range(6, 10):  # the int8 layers round their activations (int8_dot: to ~15
        # bits), where decode's and the forward's inputs differ by float rounding
        logits = decode_step(model, tokens[:, t], torch.tensor([t]), cache, t + 1)
        torch.testing.assert_close(logits, full[:, t], atol=5e-4, rtol=5e-4)


@SHAPES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_are_latent_plus_rope_width_per_layer(mla, dtype):
    cfg = mla_config(**mla)
    per_token = (cfg.kv_rank + cfg.rope_dim) * dtype.itemsize * cfg.n_layer
    assert kv_bytes_per_token(cfg, dtype) == per_token
    cache = KVCache.for_model(cfg, batch_size=3, max_len=10, dtype=dtype)
    assert isinstance(cache, LatentCache) and cache.nbytes == 3 * 10 * per_token


@SHAPES
def test_param_counts_match_the_built_model(mla):
    cfg = mla_config(**mla)
    built = sum(p.numel() for p in Transformer(cfg).parameters())
    assert param_counts(cfg)["total"] == built
    assert cfg.attention_type == "MLA" and cfg.with_kv_heads(4).attention_type == "MHA"


@pytest.mark.parametrize("bad, match", [
    (dict(rope_dim=4), "set kv_rank > 0"),
    (dict(kv_rank=8, rope_dim=0), "needs an even rope_dim > 0"),
    (dict(kv_rank=8, rope_dim=3), "needs an even rope_dim > 0"),
    (dict(kv_rank=8, rope_dim=8), "lower rope_dim below 8"),
    (dict(kv_rank=8, rope_dim=4, n_kv_head=2), "leave n_kv_head at 0"),
    (dict(kv_rank=8, rope_dim=4, rotary_dim=4), "set rope_dim=4"),
    (dict(kv_rank=8, rope_dim=4, positions="learned"), "set rope_dim=0"),
    (dict(kv_rank=-1), "must be >= 0")])
def test_bad_mla_configs_are_refused_naming_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        mla_config(**bad)


# ---------------------------------------------------------------- int8 (QuantizedLatentCache)

def rounded_per_token_group(latent: torch.Tensor, group: int) -> torch.Tensor:
    """latent (B, S, w) as the int8 cache holds it, in float64: each token's channels in
    slices of `group`, each slice rounded to its own absmax / 127 grid."""
    out = latent.double().clone()
    for b, t, start in itertools.product(*map(range, out.shape[:2]), range(0, out.shape[-1], group)):
        piece = out[b, t, start:start + group]
        step = piece.abs().max() / 127
        out[b, t, start:start + group] = torch.round(piece / step) * step
    return out


@SHAPES
def test_int8_latent_decode_is_attention_over_the_rounded_latents(mla):
    """One decode step of the attention after a prompt through a QuantizedLatentCache equals
    the float64 absorbed form over every latent (the step's own included) rounded per token
    and group; group 8 over widths 16, 20, 22 also covers a zero-padded last group."""
    torch.manual_seed(4)
    cfg = mla_config(**mla)
    attn = with_random_biases(Transformer(cfg)).blocks[1].attn
    B, T, w = 2, 13, cfg.rope_dim + cfg.kv_rank
    x = torch.randn(B, T, cfg.d_model)
    cos, sin = rope_tables(cfg.rope_dim, T, cfg.rope_theta) if cfg.rope_dim else (None, None)
    part = (lambda a, b: (cos[a:b], sin[a:b])) if cfg.rope_dim else (lambda a, b: (None, None))
    cache = QuantizedLatentCache(2, B, T, w, group=8)
    with torch.inference_mode():
        attn(x[:, :-1], *part(0, T - 1), cache, torch.arange(T - 1), kv_len=T - 1)
        y = attn(x[:, -1:], *part(T - 1, T), cache, torch.tensor([T - 1]), kv_len=T)
        latent = rounded_per_token_group(attn.latent(x, cos, sin), group=8)
        q = attn.q_proj(x[:, -1:]).view(B, 1, cfg.n_head, -1)
        if cos is not None:
            q = apply_rope(q, cos[-1:, None], sin[-1:, None])
        ref = attn.double().absorbed(q.transpose(1, 2).double(), latent)
        ref = attn.o_proj(ref.transpose(1, 2).reshape(B, 1, -1))
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_int8_latent_cache_decodes_within_a_percent_of_the_float_cache():
    """Teacher-forced decode steps of a random MLA model: logits through the int8 latent
    cache within 2% (norm) of the float LatentCache's, the prompt's exactly equal; bytes
    are the int8 values (the width padded to groups) plus one fp32 scale per group."""
    model, prompt, greedy = greedy_case()
    ids = generate(model, prompt, 12, greedy, kv_cache="int8")
    cfg = model.config
    with torch.inference_mode():
        caches = [LatentCache.for_model(cfg, 2, 17), QuantizedKVCache.for_model(cfg, 2, 17)]
        assert isinstance(caches[1], QuantizedLatentCache)
        outs = [prefill(model, prompt, c) for c in caches]
        torch.testing.assert_close(outs[1], outs[0])
        for t in range(5, 16):
            ref, q8 = (model(ids[:, t:t + 1], c, torch.tensor([t]), kv_len=t + 1) for c in caches)
            assert ((q8 - ref).norm() / ref.norm()).item() < 0.02
    w = cfg.rope_dim + cfg.kv_rank
    assert caches[1].nbytes == cfg.n_layer * 2 * 17 * (-(-w // 32) * (32 + 4))
    with pytest.raises(ValueError, match="one chunk from position 0"):
        prefill(model, prompt, QuantizedKVCache.for_model(cfg, 2, 17), chunk_size=2)


def compose_train(overrides: list[str]):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import training.config  # noqa: F401  (registers the schema)
    GlobalHydra.instance().clear()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(version_base="1.3", config_dir=str(configs)):
        return compose(config_name="train", overrides=overrides)


def test_attention_mla_in_train_config_builds_an_mla_model_or_names_the_fix():
    from training.config import check_config, model_config
    cfg = compose_train(["attention=mla", "attention.kv_rank=48"])
    model_cfg = model_config(cfg, vocab_size=100)
    assert (model_cfg.attention_type, model_cfg.kv_rank, model_cfg.rope_dim) == ("MLA", 48, 16)
    assert model_config(compose_train(["attention=gqa"]), 100).kv_rank == 0  # group switch resets
    with pytest.raises(ConfigError, match="lower rope_dim below 8"):  # tiny's head_dim is 8
        check_config(compose_train(["model=tiny", "attention=mla"]))


def test_init_from_refuses_converting_to_or_from_mla():
    """No MHA -> MLA conversion exists yet: init_from with attention=mla must not silently
    uptrain the source's own attention."""
    from training.start import TrainError, check_target_heads
    cfg = compose_train(["attention=mla"])
    with pytest.raises(TrainError, match="train the MLA model from scratch"):
        check_target_heads(cfg, ModelConfig(vocab_size=100, n_layer=6, d_model=256))
