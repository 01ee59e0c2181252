"""The model's shape. MHA, GQA and MQA are values of one field, n_kv_head; MLA (multi-head
latent attention) is kv_rank > 0."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any



class ConfigError(ValueError):
    """A model configuration that cannot be built; the message names the fix."""
    user_error = True  # every command prints it as one line (cli.is_user_error)


CHOICES = {"norm": ("rmsnorm", "layernorm"), "mlp": ("swiglu", "gelu_tanh", "gelu"),
           "positions": ("rope", "learned")}


@dataclass
class ModelConfig:
    vocab_size: int = 4096
    n_layer: int = 6
    n_head: int = 8
    n_kv_head: int = 0  # 0 means n_head (MHA); 1 is MQA; anything between is GQA
    d_model: int = 512
    head_dim: int = 0  # 0 means d_model // n_head
    ffn_hidden: int = 0  # 0 means SwiGLU's 8/3 · d_model rounded up to a multiple of 64
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02
    # Family switches; the defaults are Llama (store/hf_families.py sets GPT-2's and NeoX's).
    norm: str = "rmsnorm"  # rmsnorm | layernorm (with bias)
    mlp: str = "swiglu"  # swiglu | gelu_tanh (GPT-2's approximation) | gelu (exact, NeoX)
    attn_bias: bool = False  # biases on the q, k, v and o projections
    mlp_bias: bool = False  # biases on the MLP projections
    positions: str = "rope"  # rope | learned (an embedding per position, GPT-2)
    rotary_dim: int = 0  # 0 means head_dim; NeoX rotates only the first rotary_dim of each head
    parallel_residual: bool = False  # NeoX: x + attn(norm1(x)) + mlp(norm2(x))
    # MLA (DeepSeek-V2, docs/mla.md): every head's K and V come out of one latent per token,
    # the only thing cached beside one RoPE key shared by all heads. Queries stay per head.
    kv_rank: int = 0  # the latent's width; 0: not MLA (K/V heads by n_kv_head)
    rope_dim: int = 0  # MLA: width of the shared RoPE key and each query's rotated part (even)
    nope_dim: int = 0  # MLA: each head's unrotated query/key width; 0 means head_dim - rope_dim
    v_dim: int = 0  # MLA: each head's value width; 0 means head_dim
    # MLA converted from a RoPE source (convert/latent.py): the angular speed (radians per
    # position) of each of the shared key's rope_dim/2 planes, the source frequencies it kept
    # (repeats allowed); empty: the standard theta^(-2i/rope_dim)
    rope_freqs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.head_dim == 0 and self.n_head > 0:
            self.head_dim = self.d_model // self.n_head
        if self.ffn_hidden == 0:  # SwiGLU's 8/3 keeps the parameters of a 4x GELU MLP
            swiglu = -(-8 * self.d_model // 3 // 64) * 64
            self.ffn_hidden = swiglu if self.mlp == "swiglu" else 4 * self.d_model
        if self.rotary_dim == 0:
            self.rotary_dim = self.head_dim
        if self.kv_rank > 0 and self.nope_dim == 0:
            self.nope_dim = self.head_dim - self.rope_dim
        if self.kv_rank > 0 and self.v_dim == 0:
            self.v_dim = self.head_dim
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "head_dim",
                     "ffn_hidden", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.n_head % self.n_kv_head:
            raise ConfigError(
                f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}: "
                f"pick n_kv_head among {divisors(self.n_head)}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of "
                                  f"{', '.join(allowed)}")
        if not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"rotary_dim={self.rotary_dim} must be in 1..head_dim="
                              f"{self.head_dim}")
        if self.positions == "rope" and self.rotary_dim % 2:
            name = "head_dim" if self.rotary_dim == self.head_dim else "rotary_dim"
            raise ConfigError(f"{name}={self.rotary_dim} must be even for rotary embeddings")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError("rope_theta and norm_eps must be positive")
        self.validate_latent()

    def validate_latent(self) -> None:
        """MLA's fields: all 0 without kv_rank, a consistent head shape with it."""
        mla_fields = {k: getattr(self, k) for k in ("rope_dim", "nope_dim", "v_dim")}
        if min(self.kv_rank, self.rope_dim, self.v_dim) < 0:
            raise ConfigError("kv_rank, rope_dim and v_dim must be >= 0")
        if self.rope_freqs and len(self.rope_freqs) * 2 != self.rope_dim:
            raise ConfigError(f"rope_freqs has {len(self.rope_freqs)} planes, rope_dim="
                              f"{self.rope_dim} needs {self.rope_dim // 2}: one per plane, or none")
        if self.kv_rank == 0:
            given = [f"{k}={v}" for k, v in mla_fields.items() if v]
            if given:
                raise ConfigError(f"{', '.join(given)} shape(s) MLA's heads: set kv_rank > 0 "
                                  f"(attention=mla), or leave them at 0")
            return
        if self.n_kv_head != self.n_head:
            raise ConfigError(f"n_kv_head={self.n_kv_head} with kv_rank={self.kv_rank}: MLA has "
                              f"no KV heads to share; leave n_kv_head at 0 (attention=mla does)")
        if self.rotary_dim != self.head_dim:
            raise ConfigError(f"rotary_dim={self.rotary_dim} is per-head partial RoPE, which MLA "
                              f"replaces by its shared RoPE key: leave rotary_dim at 0 and set "
                              f"rope_dim={self.rotary_dim}")
        if self.positions == "rope" and (self.rope_dim <= 0 or self.rope_dim % 2):
            raise ConfigError(f"rope_dim={self.rope_dim}: MLA with positions=rope needs an even "
                              f"rope_dim > 0, the width of its shared RoPE key (e.g. rope_dim="
                              f"{max(2, self.head_dim // 2 // 2 * 2)})")
        if self.positions == "learned" and self.rope_dim:
            raise ConfigError(f"rope_dim={self.rope_dim} needs positions=rope; with learned "
                              f"positions set rope_dim=0 (all of K comes from the latent)")
        if self.nope_dim <= 0:
            raise ConfigError(f"rope_dim={self.rope_dim} leaves no unrotated key width at "
                              f"head_dim={self.head_dim}: lower rope_dim below {self.head_dim} "
                              f"or set nope_dim > 0")

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head."""
        return self.n_head // self.n_kv_head

    @property
    def rotated_dim(self) -> int:
        """The width RoPE rotates, its tables' width: MLA's rope_dim, else rotary_dim."""
        return self.rope_dim if self.kv_rank else self.rotary_dim

    @property
    def attention_type(self) -> str:
        if self.kv_rank:
            return "MLA"
        if self.n_kv_head == self.n_head:
            return "MHA"
        return "MQA" if self.n_kv_head == 1 else f"GQA-{self.n_kv_head}"

    def with_kv_heads(self, n_kv_head: int) -> "ModelConfig":
        """This model with n_kv_head K/V heads (an MLA model: its MHA/GQA equivalent)."""
        return dataclasses.replace(self, n_kv_head=n_kv_head, kv_rank=0, rope_dim=0, nope_dim=0,
                                   v_dim=0, rope_freqs=[])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}: this checkpoint was written "
                              f"by an incompatible version; known keys are {sorted(known)}")
        return cls(**d)


def divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]
