"""K/V-head algebra: pool an attention's KV heads into fewer (MHA -> GQA/MQA, Ainslie et
al. 2023, §2.1), after the grouping and alignment convert/align.py plans; the K/V error of a
conversion; and the exact rewrites experiments start from (expand_kv_heads,
permute_kv_heads). Torch and model/ only: the checkpoint command is convert/command.py.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

import cli
from convert.align import (LINEAR, Alignment, Grouping, LayerPlan, attention_input_grams,
                           head_rows, kv_error, move_heads, plan_layer, rope_planes)
from model.config import ConfigError, ModelConfig, divisors
from model.transformer import Transformer
from store.checkpoint import config_of, model_from_state, model_state

class Method(enum.StrEnum):
    """How each group's KV heads become one (the paper's §2.1 and its Figure 4 baselines)."""
    mean = "mean"
    first = "first"  # keep each group's first head
    random = "random"  # fresh init


METHODS = tuple(Method)
KV_TENSORS = ("attn.k_proj.weight", "attn.v_proj.weight", "attn.k_proj.bias", "attn.v_proj.bias")
CALIB_SEQ_LEN = 1024  # default calibration window: a trained model's statistics settle well
                      # before its full context, which would cost minutes per window on a CPU


class ConvertError(cli.UserError):
    """A conversion that cannot be done; the message names the fix."""


def pool_kv_heads(weight: torch.Tensor, n_src: int, n_dst: int, head_dim: int,
                  method: str = "mean", generator: torch.Generator | None = None,
                  init_std: float = 0.02) -> torch.Tensor:
    """One K or V projection (n_src*hd, d) -> (n_dst*hd, d), or its bias (n_src*hd,) ->
    (n_dst*hd,), one head per contiguous group of n_src // n_dst source heads."""
    rest = weight.shape[1:]
    heads = weight.view(n_dst, n_src // n_dst, head_dim, *rest)  # (n_dst, group, hd, ...)
    if method == "mean":
        pooled = heads.float().mean(dim=1).to(weight.dtype)  # fp32 sum: bf16 would round
    elif method == "first":
        pooled = heads[:, 0]
    elif method == "random":
        pooled = torch.zeros(n_dst, head_dim, *rest, dtype=torch.float32)
        if rest:  # a fresh weight; a fresh bias starts at zero
            pooled.normal_(0.0, init_std, generator=generator)
        pooled = pooled.to(weight.dtype)
    else:
        raise ConvertError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    return pooled.reshape(n_dst * head_dim, *rest).to(weight.device)


def choice(kind: type[enum.StrEnum], key: str, value: str) -> enum.StrEnum:
    """value as a member of kind, or a ConvertError naming the options."""
    try:
        return kind(value)
    except ValueError:
        raise ConvertError(f"unknown {key} {value!r}: use one of "
                           f"{', '.join(kind)}") from None


@dataclass(frozen=True)
class Conversion:
    """One conversion to n_kv_head KV heads: which heads share a group (group), how each is
    mapped first (align), how a group becomes one head (method; seed: method=random's).
    Checked when made: a Conversion that exists is one that can be done, given a source
    whose KV heads n_kv_head divides (check_target)."""
    n_kv_head: int
    method: Method = Method.mean
    group: Grouping = Grouping.contiguous
    align: Alignment = Alignment.none
    seed: int = 0

    def __post_init__(self) -> None:
        for key, kind in (("method", Method), ("group", Grouping), ("align", Alignment)):
            object.__setattr__(self, key, choice(kind, key, getattr(self, key)))
        if self.method == "random" and self.needs_calibration:
            raise ConvertError("method=random keeps nothing of the source heads: use group="
                               "contiguous align=none with it, or method=mean|first")
        if self.align in LINEAR and self.method != "mean":
            raise ConvertError(f"align={self.align} fits each group's shared head itself: use "
                               f"method=mean with it (the default)")
        if self.n_kv_head <= 0:
            raise ConvertError(f"n_kv_head must be a positive integer, got {self.n_kv_head}")

    @property
    def needs_calibration(self) -> bool:
        """group and align are fitted on calibration tokens (the paper's pooling is not)."""
        return (self.group, self.align) != ("contiguous", "none")


@dataclass(frozen=True)
class Calibration:
    """The tokens a conversion fits on (and measures its K/V error on, as many val ones)."""
    windows: int = 64  # train windows; 0: none
    seq_len: int = 0  # tokens per window; 0: the context up to CALIB_SEQ_LEN
    tokens: int = 0  # a token budget (the windows it fills) instead of windows

    def shape(self, max_seq_len: int) -> tuple[int, int]:
        """(windows, tokens per window) for a model of context max_seq_len."""
        if self.seq_len < 0 or self.tokens < 0 or self.windows < 0:
            raise ConvertError(f"calib_windows, calib_seq_len and calib_tokens must be >= 0, "
                               f"got {self.windows}, {self.seq_len}, {self.tokens}")
        if self.seq_len > max_seq_len:
            raise ConvertError(f"calib_seq_len={self.seq_len} exceeds the model's context "
                               f"{max_seq_len}: pass calib_seq_len={max_seq_len} or less")
        length = self.seq_len or min(max_seq_len, CALIB_SEQ_LEN)
        return (math.ceil(self.tokens / length) if self.tokens else self.windows), length


def check_target(n_src: int, conversion: Conversion) -> None:
    """conversion fits a source of n_src KV heads."""
    n_kv_head = conversion.n_kv_head
    if n_kv_head > n_src:
        raise ConvertError(f"n_kv_head={n_kv_head} exceeds the source's {n_src} KV heads: "
                           f"pooling only reduces heads; pick one of {divisors(n_src)}")
    if n_src % n_kv_head:
        raise ConvertError(f"n_kv_head={n_kv_head} does not divide the source's {n_src} KV "
                           f"heads: pick one of {divisors(n_src)}")


def convert_model(model: Transformer, conversion: Conversion,
                  calib: torch.Tensor | None = None) -> Transformer:
    """A new model with conversion.n_kv_head KV heads, sharing every tensor it does not
    change with the source, which is left untouched. calib (N, T) token windows: needed
    when conversion.needs_calibration."""
    check_target(config_of(model).n_kv_head, conversion)
    return pooled_model(model, conversion, plan_conversion(model, conversion, calib))


def plan_conversion(model: Transformer, conversion: Conversion, calib: torch.Tensor | None,
                    progress: bool = False) -> list[LayerPlan] | None:
    """Per layer, which source heads to pool together and how to rotate them; None for the
    paper's contiguous, unaligned pooling."""
    if not conversion.needs_calibration:
        return None
    if calib is None or not len(calib):
        raise ConvertError(f"group={conversion.group} align={conversion.align} fit on "
                           f"calibration data: pass calib_windows=N (e.g. 64) and a source "
                           f"with a data config")
    grams = attention_input_grams(model, calib, progress=progress)
    return plan_from_grams(model, grams, conversion)


def plan_from_grams(model: Transformer, grams: list[torch.Tensor],
                    conversion: Conversion) -> list[LayerPlan]:
    """plan_conversion from the calibration statistic attention_input_grams computes (one
    calibration serves several conversions)."""
    cfg, c = config_of(model), conversion
    state, rope = model_state(model), rope_planes(cfg)
    return [plan_layer(kv_rows(state, i, "k_proj", cfg.n_kv_head),
                       kv_rows(state, i, "v_proj", cfg.n_kv_head), grams[i], c.n_kv_head, rope,
                       c.group, c.align,
                       readers(state, i, cfg) if c.align == "linear_readers" else None)
            for i in range(cfg.n_layer)]


def readers(state: dict, layer: int, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q rows (H, hd, d+1), O columns (H, hd, d) as rows of O^T) of a layer's query heads."""
    o = state[f"blocks.{layer}.attn.o_proj.weight"].float().T  # (H*hd, d)
    return kv_rows(state, layer, "q_proj", cfg.n_head), o.reshape(cfg.n_head, cfg.head_dim, -1)


def kv_rows(state: dict, layer: int, proj: str, n_heads: int) -> torch.Tensor:
    """(n_heads, hd, d+1): a K or V projection's head rows with the bias as last column."""
    name = f"blocks.{layer}.attn.{proj}"
    return head_rows(state[f"{name}.weight"], state.get(f"{name}.bias"), n_heads)


def aligned_attention(state: dict, layer: int, plan: LayerPlan, n_src: int) -> dict:
    """The layer's attention tensors with KV heads permuted and mapped per plan, their
    query heads and O columns following (by the plan's read maps): the same function, a new
    basis, when each read map is its K/V map's inverse transpose."""
    out = {}
    k_read, v_read = plan.reads()
    for proj, rot in (("q_proj", k_read), ("k_proj", plan.k_rot), ("v_proj", plan.v_rot)):
        for kind in ("weight", "bias"):  # biases are optional rows
            name = f"blocks.{layer}.attn.{proj}.{kind}"
            if name in state:
                out[name] = move_heads(state[name], n_src, plan.order, rot)
    o = f"blocks.{layer}.attn.o_proj.weight"  # (d, H*hd): its columns are the heads' rows
    out[o] = move_heads(state[o].T, n_src, plan.order, v_read).T.contiguous()
    return out


def pooled_model(model: Transformer, conversion: Conversion,
                 plans: list[LayerPlan] | None) -> Transformer:
    cfg, state = pooled_state(model, conversion, plans)
    # holds state's tensors themselves (built on meta): untouched ones stay shared with the source
    return model_from_state(cfg, state, "the converted model").train(model.training)


def pooled_state(model: Transformer, conversion: Conversion,
                 plans: list[LayerPlan] | None) -> tuple[ModelConfig, dict]:
    """(the target config, its state): the source's tensors, the attention ones rewritten
    per plans, then K/V pooled."""
    src_cfg, n_kv_head = config_of(model), conversion.n_kv_head
    try:
        cfg = src_cfg.with_kv_heads(n_kv_head)
    except ConfigError as e:
        raise ConvertError(str(e)) from None
    state = model_state(model)  # detached views of the source's tensors: nothing copied
    for layer, plan in enumerate(plans or []):
        state.update(aligned_attention(state, layer, plan, src_cfg.n_kv_head))
    generator = torch.Generator().manual_seed(conversion.seed)
    for name, tensor in state.items():
        if name.endswith(KV_TENSORS):
            state[name] = pool_kv_heads(tensor, src_cfg.n_kv_head, n_kv_head, cfg.head_dim,
                                        conversion.method, generator, cfg.init_std)
    return cfg, state


def kv_errors(model: Transformer, converted: dict[str, torch.Tensor],
              plans: list[LayerPlan] | None, windows: torch.Tensor,
              progress: bool = False) -> list[dict]:
    """Per layer, the K and V reconstruction error of a conversion (its state) on windows
    (held out): sum over source heads of |aligned source head - its pooled head|^2 over the
    source's own attention inputs, relative to the source heads' energy; a source head is
    compared with what its query heads now read in its place (convert/align.py's kv_error)."""
    grams = attention_input_grams(model, windows, progress=progress)
    return kv_errors_from_grams(model, converted, plans, grams)


def kv_errors_from_grams(model: Transformer, converted: dict[str, torch.Tensor],
                         plans: list[LayerPlan] | None, grams: list[torch.Tensor]) -> list[dict]:
    src, dst, cfg = model_state(model), converted, config_of(model)
    S, G = cfg.n_kv_head, dst["blocks.0.attn.k_proj.weight"].shape[0] // cfg.head_dim
    rows = []
    for i, gram in enumerate(grams):
        plan = plans[i] if plans else LayerPlan(torch.arange(S))
        err = {"layer": i}
        for proj, read in zip(("k_proj", "v_proj"), plan.reads()):
            heads = kv_rows(src, i, proj, S)[plan.order]  # (S, hd, d+1) in plan order
            err[proj[0]] = round(kv_error(heads, kv_rows(dst, i, proj, G), gram, read), 6)
        rows.append(err)
    return rows


# ---- sources for experiments: the same function with more KV heads, or reordered ----------

def expand_kv_heads(model: Transformer, repeats: int) -> Transformer:
    """The same function with each KV head repeated `repeats` times (repeats = the group
    size gives MHA): query head h then reads its own copy of the head it read. Pooling the
    copies back by mean recovers the source exactly."""
    cfg = config_of(model)
    if repeats <= 0 or cfg.n_head % (cfg.n_kv_head * repeats):
        raise ConvertError(f"repeats={repeats}: {cfg.n_kv_head} KV heads x repeats must divide "
                           f"the {cfg.n_head} query heads")
    state = model_state(model)
    for name, t in state.items():
        if name.endswith(KV_TENSORS):  # (n_kv*hd, ...) -> (n_kv*repeats*hd, ...)
            heads = t.view(cfg.n_kv_head, cfg.head_dim, *t.shape[1:])
            state[name] = heads.repeat_interleave(repeats, dim=0).reshape(-1, *t.shape[1:])
    return model_from_state(cfg.with_kv_heads(cfg.n_kv_head * repeats), state,
                            "the expanded model").train(model.training)


def permute_kv_heads(model: Transformer, orders: list[torch.Tensor]) -> Transformer:
    """The same function with layer i's KV head j taken from source head orders[i][j], the
    query heads that read it (Q rows) and their O columns moved along."""
    cfg = config_of(model)
    state = model_state(model)
    for layer, order in enumerate(orders):
        if sorted(order.tolist()) != list(range(cfg.n_kv_head)):
            raise ConvertError(f"orders[{layer}] = {order.tolist()} is not a permutation of "
                               f"the {cfg.n_kv_head} KV heads")
        state.update(aligned_attention(state, layer, LayerPlan(order), cfg.n_kv_head))
    return model_from_state(cfg, state, "the permuted model").train(model.training)
