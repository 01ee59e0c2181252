"""Config defaults and one clear message per invalid config."""
import pytest

from model.config import ConfigError, ModelConfig


def test_attention_types_are_values_of_n_kv_head():
    assert ModelConfig(n_head=8).n_kv_head == 8
    assert ModelConfig(n_head=8).attention_type == "MHA"
    assert ModelConfig(n_head=8, n_kv_head=2).attention_type == "GQA-2"
    assert ModelConfig(n_head=8, n_kv_head=1).attention_type == "MQA"
    assert ModelConfig(n_head=8, n_kv_head=2).group_size == 4


def test_derived_sizes():
    cfg = ModelConfig(d_model=384, n_head=6)
    assert cfg.head_dim == 64
    assert cfg.ffn_hidden % 64 == 0 and cfg.ffn_hidden >= 8 * 384 / 3


def test_round_trip_through_dict():
    cfg = ModelConfig(n_head=8, n_kv_head=2, tie_embeddings=False, rope_theta=5e5)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_head=8, n_kv_head=3), "n_head=8 is not divisible by n_kv_head=3: pick n_kv_head among [1, 2, 4, 8]"),
    (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
    (dict(vocab_size=-5), "vocab_size must be a positive integer, got -5"),
    (dict(n_head=8, n_kv_head=-1), "n_kv_head must be a positive integer, got -1"),
    (dict(d_model=24, n_head=8), "head_dim=3 must be even"),
    (dict(rope_theta=0.0), "rope_theta and norm_eps must be positive"),
])
def test_invalid_configs_raise_one_clear_message(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unknown_keys_from_a_checkpoint_are_named():
    with pytest.raises(ConfigError, match=r"unknown model config keys \['n_experts'\]"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "n_experts": 4})


def test_family_switches_default_to_llama_and_old_configs_load():
    """A config.json written before the switches existed loads as the Llama it was."""
    old = {k: v for k, v in ModelConfig(n_head=8, n_kv_head=2).to_dict().items()
           if k not in ("norm", "mlp", "attn_bias", "mlp_bias", "positions", "rotary_dim",
                        "parallel_residual")}
    cfg = ModelConfig.from_dict(old)
    assert (cfg.norm, cfg.mlp, cfg.positions, cfg.rotary_dim) == ("rmsnorm", "swiglu", "rope", 64)
    assert not (cfg.attn_bias or cfg.mlp_bias or cfg.parallel_residual)
    assert ModelConfig(d_model=384, n_head=6, mlp="gelu").ffn_hidden == 4 * 384


@pytest.mark.parametrize("kwargs, message", [
    (dict(norm="batchnorm"), "norm='batchnorm' is not one of rmsnorm, layernorm"),
    (dict(mlp="relu"), "mlp='relu' is not one of swiglu, gelu_tanh, gelu"),
    (dict(positions="alibi"), "positions='alibi' is not one of rope, learned"),
    (dict(d_model=64, n_head=4, rotary_dim=20), "rotary_dim=20 must be in 1..head_dim=16"),
    (dict(d_model=64, n_head=4, rotary_dim=5), "rotary_dim=5 must be even"),
])
def test_invalid_switches_raise_one_clear_message(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_model_config_group_is_model_config_itself():
    """train.py's `model` group is ModelConfig's fields and defaults (one declaration of the
    model's shape), less vocab_size (the tokenizer's) and the attention group's fields
    (n_kv_head and MLA's, with ModelConfig's defaults); every preset in configs/model/ only
    sets fields of it."""
    from dataclasses import fields
    from pathlib import Path

    from omegaconf import OmegaConf
    from training.config import AttentionConfig, ModelSizeConfig

    given = {f.name: (f.type, f.default) for f in fields(ModelSizeConfig)}
    own = {f.name: (f.type, f.default) for f in fields(ModelConfig)}
    attention = {f.name: f.default for f in fields(AttentionConfig)}
    # rope_freqs: the shared RoPE key's plane frequencies, set by an MLA conversion, never a preset
    assert set(own) - set(given) == {"vocab_size", "rope_freqs", *attention}
    assert all(given[k][1] == own[k][1] for k in given)
    assert all(attention[k] == own[k][1] for k in attention)
    for preset in (Path(__file__).parents[1] / "configs" / "model").glob("*.yaml"):
        assert set(OmegaConf.load(preset)) <= set(given), preset.name
