"""Convert a checkpoint's attention to multi-head latent attention (MLA, docs/mla.md) at a
latent rank and RoPE width, or at a KV budget in bytes per token.

The algebra, per layer. W rows carry an optional bias as last column; activations are
A = X W^T over X = [x, 1], and everything is fitted from C = X^T X of the attention input
(convert/align.attention_input_grams; the identity without calibration data).

1. The shared RoPE key. RoPE turns plane i (dims i and i + R/2 of a head's rotary width R,
   half-split layout) of every head by the same angle w_i t. As a complex number
   k_gi = k_g[i] + j k_g[i + R/2] of KV head g, query head h (reading head g = g(h)) scores
   Re(q_hi conj(k_gi) e^{j w_i (t - s)}) in that plane. A unitary U (G x G) across the KV
   heads commutes with the rotation, so the components k'_ci = sum_g U[c, g] k_gi, read by
   queries q'_hci = U[c, g(h)] q_hi, give sum_c Re(q'_hci conj(k'_ci)) = Re(q_hi conj(k_gi)):
   the same function. `rope=rorope` takes U's rows from the eigenvectors of the plane's
   Hermitian key Gram M_i = K_i C K_i^H (RoRoPE: the first component holds as much of the
   plane's energy as one complex coordinate can); `rope=select` keeps U = I (MHA2MLA's
   per-frequency selection of whole head planes). A component scores
   sqrt(its key energy x the query energy that reads it); the rope_dim/2 components of the
   highest scores summed over layers become the shared key's planes, each rotating at its
   source frequency (ModelConfig.rope_freqs; a frequency may repeat). With G = 1 and all
   planes kept the shared key is the source's one K head.
2. The position-free remainder. What the kept components do not hold,
   r_gi = k_gi - sum_{c kept} conj(U[c, g]) k'_ci, joins the head's unrotated dims as its
   NoPE key, read by the whole source query (nope_dim = head_dim): Re(q_hi conj(r_gi)) is
   the plane's score without rotation. Exact when r = 0 (nothing positional dropped);
   otherwise the remainder loses its rotation, the one approximation of this step.
3. The latent. [K_nope; V] of all KV heads, W (2 G hd, d) plus bias b, is factored as
   W_u W_d minimising the activation error E|(W - W_u W_d) x|^2 = |(W - W_u W_d) L|_F^2,
   S = L L^T the second moment of x (centred when the source has biases, which then absorb
   the mean: b' = b + (W - W_u W_d) mu). With W L = U s V^T truncated to kv_rank:
   W_d = V_r^T L^-1 (kv_down), W_u = U_r s_r (k_up, v_up: each query head takes its KV
   head's rows). Exact at kv_rank = rank(W L) = min(2 G hd, d) for a full-rank C.
4. The scale. MLA divides scores by sqrt(rope_dim + nope_dim), the source by sqrt(hd):
   queries are multiplied by sqrt((rope_dim + hd) / hd).
"""
from __future__ import annotations

import dataclasses
import enum
import math
import sys
from dataclasses import dataclass

import torch

from convert.heads import ConvertError, choice, kv_rows
from model.config import ConfigError, ModelConfig
from model.transformer import Transformer
from store.checkpoint import config_of, model_from_state, model_state

CACHE_BYTES = 4  # budgets count fp32 cache bytes, as kv_bytes_per_token does by default


class RopeChoice(enum.StrEnum):
    """Which RoPE components become the shared key."""
    rorope = "rorope"  # unitary mixing of the KV heads per plane first (RoRoPE)
    select = "select"  # whole head planes as they are (MHA2MLA's per-frequency selection)


class LatentFit(enum.StrEnum):
    """What the latent's factorisation minimises (step 3)."""
    readers = "readers"  # the error as read: K's through the query scores, V's through o_proj
    activation = "activation"  # the [K_nope; V] activations' own error, K and V alike


@dataclass(frozen=True)
class LatentConversion:
    """One conversion to MLA: kv_rank and rope_dim, or a budget in fp32 KV bytes per token
    split between them. rope_dim 0: one source head's rotary width (at most half a budget's
    per-layer width; with a budget and calibration windows, the split of least calibration
    loss: search_split); 0 for a source with learned positions. balance: with
    fit=readers, the weight of a key's score error against a value's output error."""
    kv_rank: int = 0
    rope_dim: int = 0
    budget: int = 0
    rope: RopeChoice = RopeChoice.rorope
    fit: LatentFit = LatentFit.readers
    balance: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(self, "rope", choice(RopeChoice, "mla.rope", self.rope))
        object.__setattr__(self, "fit", choice(LatentFit, "mla.fit", self.fit))
        if min(self.kv_rank, self.rope_dim, self.budget) < 0:
            raise ConvertError("mla.kv_rank, mla.rope_dim and mla.budget must be >= 0")
        if not self.balance > 0:
            raise ConvertError(f"mla.balance={self.balance} must be > 0 (0.1 measured best on "
                               f"SmolLM2; mla.fit=activation weighs K and V alike instead)")
        if (self.kv_rank > 0) == (self.budget > 0):
            raise ConvertError("pass one of mla.kv_rank=<latent width> or mla.budget=<KV bytes "
                               "per token>, not both")
        if self.rope_dim % 2:
            raise ConvertError(f"mla.rope_dim={self.rope_dim} must be even: RoPE turns planes "
                               f"of two dims")

    def shape(self, cfg: ModelConfig) -> tuple[int, int]:
        """(kv_rank, rope_dim) for a source of config cfg, or a ConvertError naming the fix."""
        rotary = cfg.rotary_dim if cfg.positions == "rope" else 0
        if cfg.kv_rank:
            raise ConvertError("the source is already MLA: convert an MHA/GQA/MQA checkpoint")
        if self.rope_dim and not rotary:
            raise ConvertError(f"mla.rope_dim={self.rope_dim}: the source has learned positions "
                               f"(no RoPE), so all of K is latent; leave mla.rope_dim at 0")
        rope_dim, kv_rank = self.rope_dim or rotary, self.kv_rank
        if self.budget:
            rope_dim, kv_rank = self.budget_split(cfg, rotary)
        most_rope, full = cfg.n_kv_head * rotary, full_rank(cfg)
        if rope_dim > most_rope:
            raise ConvertError(f"mla.rope_dim={rope_dim} exceeds the source's {most_rope} "
                               f"rotary dims ({cfg.n_kv_head} KV heads x {rotary})")
        if not 0 < kv_rank <= full:
            raise ConvertError(f"kv_rank={kv_rank} is outside 1..{full}, the width of the "
                               f"source's [K; V] map (min(2 x {cfg.n_kv_head} x {cfg.head_dim}, "
                               f"d_model {cfg.d_model}))")
        return kv_rank, rope_dim

    def budget_split(self, cfg: ModelConfig, rotary: int) -> tuple[int, int]:
        """(rope_dim, kv_rank) filling self.budget bytes per token exactly."""
        per_width = CACHE_BYTES * cfg.n_layer
        width = self.budget // per_width
        if self.budget % per_width or width < 1 + bool(rotary) * 2:
            raise ConvertError(f"mla.budget={self.budget} B/token fits no split: it must be a "
                               f"multiple of {per_width} (4 bytes x {cfg.n_layer} layers) of "
                               f"at least {(1 + bool(rotary) * 2) * per_width}")
        rope_dim = self.rope_dim or min(rotary, width // 4 * 2)
        if rope_dim >= width:
            raise ConvertError(f"mla.budget={self.budget} B/token is {width} values per layer, "
                               f"no more than mla.rope_dim={rope_dim}: raise it or lower rope_dim")
        return rope_dim, width - rope_dim


def full_rank(cfg: ModelConfig) -> int:
    """The rank of a layer's [K; V] map: its rows or its inputs, the fewer."""
    return min(2 * cfg.n_kv_head * cfg.head_dim, cfg.d_model)


# ---- 1. the shared RoPE key ---------------------------------------------------------------

def planes(rows: torch.Tensor, rotary: int) -> torch.Tensor:
    """Head rows (n, hd, d+1) -> the rotary planes as complex rows (n, R/2, d+1)."""
    half = rotary // 2
    return torch.complex(rows[:, :half], rows[:, half:rotary])


def rope_components(kz: torch.Tensor, qz: torch.Tensor, gram: torch.Tensor,
                    how: RopeChoice) -> tuple[torch.Tensor, torch.Tensor]:
    """Per plane the unitary U (P, G, G), rows = components, and each component's score
    (P, G), from K planes kz (G, P, d+1) and Q planes qz (H, P, d+1)."""
    G, P = kz.shape[:2]
    c = gram.to(kz.dtype)
    key = torch.einsum("gpd,de,hpe->pgh", kz, c, kz.conj())  # (P, G, G) Hermitian Gram
    query = torch.einsum("hpd,de,hpe->ph", qz, c, qz.conj()).real  # (P, H) query energy
    query = query.view(P, G, -1).sum(-1)  # (P, G): the energy reading each KV head
    if how == RopeChoice.rorope:
        mix = torch.linalg.eigh(key)[1].conj().transpose(-1, -2)  # rows: eigenvectors^H
    else:
        mix = torch.eye(G, dtype=kz.dtype).expand(P, G, G)
    k_energy = torch.einsum("pcg,pgh,pch->pc", mix, key, mix.conj()).real.clamp(min=0)
    q_energy = torch.einsum("pcg,pg->pc", mix.abs() ** 2, query)
    return mix, (k_energy * q_energy).sqrt()


def kept_components(scores: list[torch.Tensor], n_planes: int) -> list[tuple[int, int]]:
    """The n_planes (plane, component) pairs of the highest score summed over layers,
    sorted; scores: per layer (P, G)."""
    total = torch.stack(scores).sum(0)  # (P, G)
    best = total.flatten().topk(n_planes).indices
    G = total.shape[1]
    return sorted((int(i) // G, int(i) % G) for i in best)


def rope_split(k: torch.Tensor, q: torch.Tensor, mix: torch.Tensor, kept: list[tuple[int, int]],
               rotary: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k (G, hd, d+1), q (H, hd, d+1) -> the shared key's rows (rd, d+1), each query head's
    rope rows (H, rd, d+1), and the K heads with the kept components taken out (G, hd, d+1)."""
    G, H, half = k.shape[0], q.shape[0], rotary // 2
    kz, qz = planes(k, rotary), planes(q, rotary)
    plane = torch.tensor([i for i, _ in kept])
    u = mix[plane, torch.tensor([c for _, c in kept])]  # (m, G) the kept components' rows
    key = torch.einsum("mg,gmd->md", u, kz[:, plane])  # (m, d+1)
    reads = u[:, torch.arange(H) // (H // G)].T  # (H, m): U[c, g(h)]
    q_rope = reads[..., None] * qz[:, plane]  # (H, m, d+1)
    rest = kz.index_add(1, plane, -(u.conj().T[..., None] * key))  # (G, P, d+1) remainder
    k_nope = k.clone()
    k_nope[:, :half], k_nope[:, half:rotary] = rest.real, rest.imag
    as_rows = lambda z: torch.cat([z.real, z.imag], dim=-2)  # planes -> half-split rows
    return as_rows(key), as_rows(q_rope), k_nope


def residual_share(k: torch.Tensor, k_nope: torch.Tensor, gram: torch.Tensor,
                   rotary: int) -> float:
    """The share of the rotary K energy left position-free (step 2's approximation)."""
    energy = lambda rows: torch.einsum("nid,de,nie->", rows, gram, rows).item()
    whole = energy(k[:, :rotary])
    return energy(k_nope[:, :rotary]) / whole if whole > 0 else 0.0


# ---- 3. the latent ------------------------------------------------------------------------

def moments(gram: torch.Tensor | None, d: int, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (d, d), mu (d,)): the second moment of x (about its mean when centred) from
    C (d+1, d+1); the identity and 0 without calibration."""
    if gram is None:
        return torch.eye(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    n = gram[d, d]
    mu = gram[:d, d] / n if centred else torch.zeros(d, dtype=gram.dtype)
    return gram[:d, :d] / n - torch.outer(mu, mu), mu


def factor(w: torch.Tensor, gram: torch.Tensor | None, rank: int, centred: bool,
           readers: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """w (n, d+1) [weight | bias] -> (W_d (rank, d), W_u (n, rank), bias (n,), the share of
    activation energy lost), the rank-`rank` factorisation of least error E|A (W - W_u W_d) x|^2
    where A^T A = readers (n, n), what reads the rows (None: A = I, the activation error)."""
    d = w.shape[1] - 1
    s, mu = moments(gram, d, centred)
    evals, evecs = torch.linalg.eigh(s)
    evals = evals.clamp(min=evals.max().clamp(min=1e-30) * 1e-10)  # L stays invertible
    wl = w[:, :d] @ (evecs * evals.sqrt())  # W L
    a = torch.eye(len(w), dtype=w.dtype) if readers is None else psd_sqrt(readers)
    vh = torch.linalg.svd(a @ wl, full_matrices=False)[2][:rank]
    down = vh @ (evecs / evals.sqrt()).T  # V_r^T L^-1: latents orthonormal under S
    up = wl @ vh.T  # for that latent the least-squares W_u (W S W_d^T), under any A
    bias = w[:, d] + (w[:, :d] - up @ down) @ mu
    lost = (wl - up @ vh).square().sum() / wl.square().sum().clamp(min=1e-30)
    return down, up, bias, lost.item()


def psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(m)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def reader_grams(q: torch.Tensor, v: torch.Tensor, o: torch.Tensor, gram: torch.Tensor,
                 balance: float) -> torch.Tensor:
    """What reads [K_nope; V]'s rows, block-diagonal (2 G hd, 2 G hd). A value row reaches the
    output through o_proj: V head g's block is sum over its query heads of O_h^T O_h. A key
    row's error moves scores by q . dk / sqrt(hd), which moves the output by about the spread
    of the values it mixes: K head g's block is balance x sum_h tr(O_h^T O_h Cov v) q_h q_h^T
    / hd, in the same units. q (H, hd, d+1), v (G, hd, d+1), o (d, H hd), gram C (d+1, d+1)."""
    H, G, hd = q.shape[0], v.shape[0], v.shape[1]
    c = gram / gram[-1, -1]
    d, mu = len(c) - 1, c[:-1, -1]
    heads = o.view(d, H, hd).permute(1, 2, 0)  # (H, hd, d): O_h^T
    o_gram = heads @ heads.transpose(1, 2)  # (H, hd, hd)
    vw = v[..., :d]
    value_cov = vw @ (c[:d, :d] - torch.outer(mu, mu)) @ vw.transpose(1, 2)  # (G, hd, hd)
    spread = torch.einsum("hij,hji->h", o_gram, value_cov[torch.arange(H) // (H // G)])
    query = q @ c @ q.transpose(1, 2)  # (H, hd, hd): E q_h q_h^T
    k_blocks = (balance / hd * spread[:, None, None] * query).view(G, -1, hd, hd).sum(1)
    return torch.block_diag(*k_blocks, *o_gram.view(G, -1, hd, hd).sum(1))


# ---- the model ----------------------------------------------------------------------------

def latent_config(cfg: ModelConfig, kv_rank: int, rope_dim: int,
                  freqs: list[float]) -> ModelConfig:
    try:
        return dataclasses.replace(cfg, n_kv_head=cfg.n_head, rotary_dim=0, kv_rank=kv_rank,
                                   rope_dim=rope_dim, nope_dim=cfg.head_dim, v_dim=cfg.head_dim,
                                   rope_freqs=freqs)
    except ConfigError as e:
        raise ConvertError(str(e)) from None


def source_freqs(cfg: ModelConfig) -> torch.Tensor:
    """Each rotary plane's angular speed, computed as model.attention.rope_tables does."""
    R = cfg.rotary_dim
    return 1.0 / cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float64) / R)


def latent_model(model: Transformer, conversion: LatentConversion,
                 grams: list[torch.Tensor] | None) -> tuple[Transformer, list[dict]]:
    """The MLA model (sharing every tensor outside attention with the source) and per layer
    {"layer", "latent_error", "rope_residual"}: the shares of [K_nope; V] activation energy
    and of rotary K energy that the conversion leaves out. grams: per layer C (d+1, d+1)
    from attention_input_grams; None: unweighted (C = I)."""
    src, state = config_of(model), model_state(model)
    kv_rank, rope_dim = conversion.shape(src)
    rotary = src.rotary_dim if src.positions == "rope" else 0
    calibrated, eye = grams is not None, torch.eye(src.d_model + 1, dtype=torch.float64)
    grams = [g.double() for g in grams] if calibrated else [eye] * src.n_layer
    rows = [layer_rows(state, i, src) for i in range(src.n_layer)]
    mixes, kept, freqs = [], [], []
    if rope_dim:
        fits = [rope_components(planes(k, rotary), planes(q, rotary), g, conversion.rope)
                for (q, k, _), g in zip(rows, grams)]
        mixes = [mix for mix, _ in fits]
        kept = kept_components([score for _, score in fits], rope_dim // 2)
        freqs = source_freqs(src)[[i for i, _ in kept]].tolist()
    cfg = latent_config(src, kv_rank, rope_dim, freqs)
    report = []
    for i, ((q, k, v), gram) in enumerate(zip(rows, grams)):
        o = state[f"blocks.{i}.attn.o_proj.weight"].double()
        readers = (reader_grams(q, v, o, gram, conversion.balance)
                   if conversion.fit == LatentFit.readers else None)
        tensors, errors = latent_layer(q, k, v, mixes[i] if mixes else None, kept, gram,
                                       cfg, rotary, src.attn_bias, calibrated, readers)
        dtype = state[f"blocks.{i}.attn.k_proj.weight"].dtype
        for name in [n for n in state if n.startswith(f"blocks.{i}.attn.") and "o_proj" not in n]:
            del state[name]
        state.update({f"blocks.{i}.attn.{n}": t.to(dtype).contiguous() for n, t in tensors.items()})
        report.append({"layer": i, **errors})
    converted = model_from_state(cfg, state, "the converted model").train(model.training)
    return converted, report


def search_split(model: Transformer, conversion: LatentConversion,
                 grams: list[torch.Tensor] | None, windows: torch.Tensor | None
                 ) -> tuple[LatentConversion, list[dict]]:
    """conversion with its rope_dim chosen, and what was tried: under a budget with rope_dim
    unset and calibration windows (N, T) at hand, the split of least mean next-token loss on
    them, from a coarse grid (a quarter to three quarters of the per-layer width) refined by
    a sixteenth around its best. Else conversion as it is. On SmolLM2 at 128 values per layer
    the loss is smooth in rope_dim and its minimum is the held-out perplexity's too."""
    src = config_of(model)
    if not conversion.budget or conversion.rope_dim or src.positions != "rope" or windows is None:
        return conversion, []
    width = conversion.budget // (CACHE_BYTES * src.n_layer)
    most = min(src.n_kv_head * src.rotary_dim, width - 1) // 2 * 2
    even = lambda x: max(2, min(most, round(x / 2) * 2))
    tried: dict[int, float] = {}

    def loss(rope_dim: int) -> float:
        if rope_dim not in tried:
            candidate = dataclasses.replace(conversion, rope_dim=rope_dim)
            tried[rope_dim] = window_loss(latent_model(model, candidate, grams)[0], windows)
            print(f"mla split: rope_dim {rope_dim} + kv_rank {width - rope_dim}: calibration "
                  f"loss {tried[rope_dim]:.4f}", file=sys.stderr)
        return tried[rope_dim]

    best = min(sorted({even(width * k / 8) for k in range(2, 7)}), key=loss)
    step = even(width / 16)
    best = min(sorted({best, even(best - step), even(best + step)}), key=loss)
    return (dataclasses.replace(conversion, rope_dim=best),
            [{"rope_dim": r, "calib_loss": round(v, 5)} for r, v in sorted(tried.items())])


@torch.inference_mode()
def window_loss(model: Transformer, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy over windows (N, T), one window at a time."""
    total = 0.0
    for w in windows.to(model.device):
        logits = model(w[None, :-1])[0].float()
        total += torch.nn.functional.cross_entropy(logits, w[1:]).item()
    return total / len(windows)


def layer_rows(state: dict, layer: int, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """(Q (H, hd, d+1), K (G, hd, d+1), V (G, hd, d+1)) rows of a layer, in float64."""
    return tuple(kv_rows(state, layer, proj, n).double() for proj, n in
                 (("q_proj", cfg.n_head), ("k_proj", cfg.n_kv_head), ("v_proj", cfg.n_kv_head)))


def latent_layer(q, k, v, mix, kept, gram, cfg: ModelConfig, rotary: int, bias: bool,
                 calibrated: bool, readers: torch.Tensor | None) -> tuple[dict, dict]:
    """One layer's MLA tensors by name (without o_proj, which stays) and its errors, from
    source rows q (H, hd, d+1), k, v (G, hd, d+1), the RoPE plan (mix: U per plane) and
    what reads [K_nope; V] (reader_grams, or None)."""
    H, G, hd, r = q.shape[0], k.shape[0], cfg.head_dim, cfg.kv_rank
    errors = {}
    k_nope, q_all, k_rope = k, q, None
    if cfg.rope_dim:
        k_rope, q_rope, k_nope = rope_split(k, q, mix, kept, rotary)
        q_all = torch.cat([q_rope, q], dim=1)  # (H, rd + hd, d+1): [rope | nope]
        errors["rope_residual"] = round(residual_share(k, k_nope, gram, rotary), 6)
    q_all = q_all * math.sqrt((cfg.rope_dim + hd) / hd)  # MLA's scale is 1/sqrt(rd + hd)
    stacked = torch.cat([k_nope.reshape(G * hd, -1), v.reshape(G * hd, -1)])  # (2 G hd, d+1)
    down, up, up_bias, lost = factor(stacked, gram if calibrated else None, r, bias, readers)
    errors["latent_error"] = round(lost, 6)
    per_query = torch.arange(H) // (H // G)  # query head h reads KV head h // group
    expand = lambda t: t.view(2, G, hd, *t.shape[1:])[:, per_query].reshape(2, H * hd,
                                                                            *t.shape[1:])
    (k_up, v_up), (k_bias, v_bias) = expand(up), expand(up_bias)
    q_all = q_all.reshape(-1, q_all.shape[-1])
    out = {"q_proj.weight": q_all[:, :-1], "kv_down.weight": down,
           "k_up.weight": k_up, "v_up.weight": v_up}
    if bias:
        out.update({"q_proj.bias": q_all[:, -1], "k_up.bias": k_bias, "v_up.bias": v_bias})
    if k_rope is not None:
        out["k_rope.weight"] = k_rope[:, :-1]
        if bias:
            out["k_rope.bias"] = k_rope[:, -1]
    return out, errors
