"""The HF model families gqalab reads and writes: Llama, GPT-2 and GPT-NeoX (Pythia).

Per family: its config.json <-> ModelConfig, and our state-dict names <-> its own. All
three are one Transformer with different switches (model/config.py); only their storage
differs. Llama's q/k use our half-split ("rotate_half") RoPE layout, so its weights move
by renaming alone. GPT-2 stores its Conv1D weights transposed, (in, out), and fuses q, k, v
into one c_attn as [q; k; v]. NeoX fuses them into query_key_value laid out per head,
[q_h; k_h; v_h] for each head h, and rotates only the first rotary_dim dims of each head.
transformers is not imported here; it is a test/bench-only dependency.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from store.checkpoint import CheckpointError
from model.config import ConfigError, ModelConfig

# ---------------------------------------------------------------- config.json

def _rope(d: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """RoPE settings and type: transformers 5.x keeps them in rope_parameters, 4.x in
    rope_scaling."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    return rope, rope.get("rope_type", rope.get("type", "default"))


def _refuse(checks: list[tuple[bool, str]], source: Path | str, family: str, what: str) -> None:
    for bad, feature in checks:
        if bad:
            raise CheckpointError(f"{source}: {feature} is not supported: gqalab reads "
                                  f"{family} models with {what}")


def _build(source: Path | str, family: str, read: Callable[[], ModelConfig]) -> ModelConfig:
    try:
        return read()
    except KeyError as e:
        raise CheckpointError(f"{source} lacks {e.args[0]!r}: not a complete {family} "
                              f"config") from None
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None


def llama_config(d: dict[str, Any], source: Path | str = "config.json") -> ModelConfig:
    """An HF LlamaConfig dict -> ModelConfig; refuses features our model does not have.
    attention_bias puts biases on q, k, v and o, mlp_bias on gate, up and down, as in
    transformers' LlamaAttention and LlamaMLP: our attn_bias and mlp_bias switches."""
    rope, rope_type = _rope(d)
    _refuse([(d.get("hidden_act", "silu") != "silu", f"hidden_act={d.get('hidden_act')!r}"),
             (rope_type != "default", f"rope scaling {rope_type!r}")],
            source, "Llama", "SwiGLU (silu) and default RoPE")
    return _build(source, "Llama", lambda: ModelConfig(
        **_shape(d), n_kv_head=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"],
        rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        attn_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False))))


def _shape(d: dict[str, Any]) -> dict[str, Any]:
    """The fields Llama and NeoX configs name alike (transformers' common key names)."""
    return dict(vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"],
                n_head=d["num_attention_heads"], d_model=d["hidden_size"],
                ffn_hidden=d["intermediate_size"],
                max_seq_len=d.get("max_position_embeddings", 2048),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                init_std=float(d.get("initializer_range", 0.02)))


def llama_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json LlamaForCausalLM.from_pretrained reads, written by hand."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this key
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x
        "rope_scaling": None, "attention_bias": cfg.attn_bias, "attention_dropout": 0.0,
        "mlp_bias": cfg.mlp_bias, "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
    }


# GPT-2's activation_function and NeoX's hidden_act <-> our mlp switch. gelu_new is the
# tanh approximation, as is gelu_pytorch_tanh.
GELUS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
GELU_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu"}


def gpt2_config(d: dict[str, Any], source: Path | str = "config.json") -> ModelConfig:
    act = d.get("activation_function", "gelu_new")
    _refuse([(act not in GELUS, f"activation_function={act!r}"),
             (bool(d.get("add_cross_attention", False)), "add_cross_attention=true"),
             (bool(d.get("scale_attn_by_inverse_layer_idx", False)),
              "scale_attn_by_inverse_layer_idx=true"),
             (not d.get("scale_attn_weights", True), "scale_attn_weights=false")],
            source, "GPT-2", "GELU and 1/sqrt(head_dim) attention scaling")
    return _build(source, "GPT-2", lambda: ModelConfig(
        vocab_size=d["vocab_size"], n_layer=d["n_layer"], n_head=d["n_head"],
        d_model=d["n_embd"], ffn_hidden=d.get("n_inner") or 4 * d["n_embd"],
        max_seq_len=d.get("n_positions", 1024),
        norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
        tie_embeddings=bool(d.get("tie_word_embeddings", True)),
        init_std=float(d.get("initializer_range", 0.02)),
        norm="layernorm", mlp=GELUS[act], attn_bias=True, mlp_bias=True, positions="learned"))


def gpt2_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
        "n_head": cfg.n_head, "n_inner": cfg.ffn_hidden, "n_positions": cfg.max_seq_len,
        "activation_function": GELU_NAMES.get(cfg.mlp, cfg.mlp),
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "scale_attn_weights": True, "use_cache": True,
    }


def neox_config(d: dict[str, Any], source: Path | str = "config.json") -> ModelConfig:
    """NeoX's rotary settings sit in rope_parameters (transformers 5.x) or in the older
    rotary_pct / rotary_emb_base keys Pythia's own config.json files use."""
    (rope, rope_type), act = _rope(d), d.get("hidden_act", "gelu")
    _refuse([(act not in GELUS, f"hidden_act={act!r}"),
             (rope_type != "default", f"rope scaling {rope_type!r}")],
            source, "GPT-NeoX", "GELU and default RoPE")
    pct = float(rope.get("partial_rotary_factor", d.get("rotary_pct", 0.25)))

    def read() -> ModelConfig:
        head_dim = d["hidden_size"] // d["num_attention_heads"]
        return ModelConfig(
            **_shape(d),
            rope_theta=float(rope.get("rope_theta", d.get("rotary_emb_base", 10000.0))),
            norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            norm="layernorm", mlp=GELUS[act], attn_bias=bool(d.get("attention_bias", True)),
            mlp_bias=True, rotary_dim=int(head_dim * pct),  # int() as transformers does
            parallel_residual=bool(d.get("use_parallel_residual", True)))
    return _build(source, "GPT-NeoX", read)


def neox_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    pct = cfg.rotary_dim / cfg.head_dim
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ffn_hidden,
        "hidden_act": GELU_NAMES.get(cfg.mlp, cfg.mlp),
        "max_position_embeddings": cfg.max_seq_len, "layer_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std, "tie_word_embeddings": cfg.tie_embeddings,
        "rotary_pct": pct, "rotary_emb_base": cfg.rope_theta,  # transformers 4.x, Pythia
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                            "partial_rotary_factor": pct},  # 5.x
        "use_parallel_residual": cfg.parallel_residual, "attention_bias": cfg.attn_bias,
        "attention_dropout": 0.0, "hidden_dropout": 0.0, "use_cache": True,
    }


# ---------------------------------------------------------------- weights

QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Family:
    name: str  # as people write it
    model_type: str  # config.json's model_type
    architecture: str  # config.json's architectures[0]
    config_from_hf: Callable[..., ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    layer: str  # their name prefix of layer {i}
    layer_keys: dict[str, str]  # our block-level names -> theirs
    top_keys: dict[str, str]  # our model-level names -> theirs
    fused_qkv: str = ""  # "": separate; "blocks": [q; k; v]; "per_head": [q_h; k_h; v_h] per head
    transposed: tuple[str, ...] = ()  # their weights stored (in, out): GPT-2's Conv1D
    ignored: tuple[str, ...] = ()  # their buffers gqalab recomputes (masks, inv_freq)
    base: str = ""  # their prefix some older checkpoints leave off (GPT-2's "transformer.")

    def key_map(self, cfg: ModelConfig) -> dict[str, str]:
        """Every one of our state-dict names (q/k/v fused as attn.qkv_proj) -> theirs."""
        names = dict(self.top_keys)
        for i in range(cfg.n_layer):
            for ours, theirs in self.layer_keys.items():
                names[f"blocks.{i}.{ours}"] = self.layer.format(i=i) + theirs
        return names

    def state_to_hf(self, state: dict[str, torch.Tensor],
                    cfg: ModelConfig) -> dict[str, torch.Tensor]:
        state = dict(state)
        for q_name in [n for n in state if self.fused_qkv and ".attn.q_proj." in n]:
            q, k, v = (state.pop(q_name.replace("q_proj", p)) for p in QKV)
            state[q_name.replace("q_proj", "qkv_proj")] = fuse_qkv(q, k, v, cfg.n_head,
                                                                   self.fused_qkv)
        names = self.key_map(cfg)
        return {names[k]: self._maybe_t(names[k], v) for k, v in state.items()}

    def state_from_hf(self, theirs: dict[str, torch.Tensor], cfg: ModelConfig,
                      source: Path | str) -> dict[str, torch.Tensor]:
        to_ours = {hf: ours for ours, hf in self.key_map(cfg).items()}
        state = {}
        for name, tensor in theirs.items():
            if self.base and not name.startswith(self.base) and name not in to_ours:
                name = self.base + name
            tied_head = cfg.tie_embeddings and to_ours.get(name) == "lm_head.weight"
            if name.endswith(self.ignored) or tied_head:
                continue
            if name not in to_ours:
                raise CheckpointError(f"{source}: unexpected tensor {name!r}: not a plain "
                                      f"{self.name} model")
            state[to_ours[name]] = self._maybe_t(name, tensor)
        for qkv_name in [n for n in state if ".attn.qkv_proj." in n]:
            parts = split_qkv(state.pop(qkv_name), cfg.n_head, self.fused_qkv)
            state.update({qkv_name.replace("qkv_proj", p): t for p, t in zip(QKV, parts)})
        return state

    def _maybe_t(self, their_name: str, t: torch.Tensor) -> torch.Tensor:
        return t.t().contiguous() if their_name.endswith(self.transposed) else t


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_head: int,
             layout: str) -> torch.Tensor:
    """q, k, v (H*hd, ...) -> (3*H*hd, ...) as [q; k; v] ("blocks") or per head."""
    if layout == "blocks":
        return torch.cat([q, k, v])
    return torch.stack([t.unflatten(0, (n_head, -1)) for t in (q, k, v)], dim=1).flatten(0, 2)


def split_qkv(qkv: torch.Tensor, n_head: int, layout: str) -> list[torch.Tensor]:
    """fuse_qkv's inverse: (3*H*hd, ...) -> q, k, v (H*hd, ...)."""
    if layout == "blocks":
        return [t.contiguous() for t in qkv.chunk(3)]
    per_head = qkv.unflatten(0, (n_head, 3, -1))  # (H, 3, hd, ...)
    return [per_head[:, j].flatten(0, 1).contiguous() for j in range(3)]


def _layer_keys(pairs: dict[str, str], params=("weight",)) -> dict[str, str]:
    """{our module: their module} -> {our param name: their param name} for each param."""
    return {f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in pairs.items() for p in params}


LLAMA = Family(
    "Llama", "llama", "LlamaForCausalLM", llama_config, llama_config_to_hf,
    layer="model.layers.{i}.",
    layer_keys={
        **_layer_keys({"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}),
        **_layer_keys({**{f"attn.{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
                       **{f"mlp.{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}},
                      ("weight", "bias"))},  # biases with attention_bias / mlp_bias
    top_keys={"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "lm_head.weight": "lm_head.weight"},
    ignored=("rotary_emb.inv_freq",))

GPT2 = Family(
    "GPT-2", "gpt2", "GPT2LMHeadModel", gpt2_config, gpt2_config_to_hf,
    layer="transformer.h.{i}.",
    layer_keys=_layer_keys({"attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.qkv_proj": "attn.c_attn",
                            "attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc",
                            "mlp.down_proj": "mlp.c_proj"}, ("weight", "bias")),
    top_keys={"embed.weight": "transformer.wte.weight", "wpe.weight": "transformer.wpe.weight",
              "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias",
              "lm_head.weight": "lm_head.weight"},
    fused_qkv="blocks",
    transposed=tuple(f"{m}.weight" for m in ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")),
    ignored=(".attn.bias", ".attn.masked_bias"), base="transformer.")

NEOX = Family(
    "GPT-NeoX", "gpt_neox", "GPTNeoXForCausalLM", neox_config, neox_config_to_hf,
    layer="gpt_neox.layers.{i}.",
    layer_keys=_layer_keys({"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                            "attn.qkv_proj": "attention.query_key_value",
                            "attn.o_proj": "attention.dense", "mlp.up_proj": "mlp.dense_h_to_4h",
                            "mlp.down_proj": "mlp.dense_4h_to_h"}, ("weight", "bias")),
    top_keys={"embed.weight": "gpt_neox.embed_in.weight",
              "norm.weight": "gpt_neox.final_layer_norm.weight",
              "norm.bias": "gpt_neox.final_layer_norm.bias", "lm_head.weight": "embed_out.weight"},
    fused_qkv="per_head",
    ignored=(".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq"))

FAMILIES = (LLAMA, GPT2, NEOX)
SUPPORTED = ", ".join(f.name for f in FAMILIES)


def family_of_hf(d: dict[str, Any], source: Path | str = "config.json") -> Family:
    """The family an HF config.json dict names, by model_type or architectures."""
    archs = d.get("architectures") or []
    for family in FAMILIES:
        if d.get("model_type") == family.model_type or family.architecture in archs:
            return family
    found = archs[0] if archs else d.get("model_type", "no model_type or architectures")
    raise CheckpointError(f"{source}: gqalab imports {SUPPORTED} models; this one is {found}")


def family_of(cfg: ModelConfig) -> Family:
    """The HF family that holds a model of this config, refusing configs none can hold
    exactly (the family's config.json must read back as the same ModelConfig)."""
    family = GPT2 if cfg.positions == "learned" else NEOX if cfg.norm == "layernorm" else LLAMA
    if family is not LLAMA and cfg.n_kv_head != cfg.n_head:
        raise CheckpointError(f"transformers has no {family.name} class with grouped K/V "
                              f"heads ({cfg.attention_type}): use this gqalab checkpoint with "
                              f"generate.py")
    try:
        back = family.config_from_hf(family.config_to_hf(cfg)).to_dict()
        diff = ", ".join(f"{k}={v!r} where it has {back[k]!r}"
                         for k, v in sorted(cfg.to_dict().items()) if back[k] != v)
    except CheckpointError as e:
        diff = str(e).removeprefix("config.json: ")
    if diff:
        raise CheckpointError(f"no HF family holds this config exactly ({family.name}: {diff}): "
                              f"export writes {SUPPORTED} models")
    return family
