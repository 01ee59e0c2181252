"""Choose and align K/V heads before pooling them: both leave the MHA function unchanged.

- Grouping (`group=similar`, after AsymGQA arXiv 2406.14963 and QCQA arXiv 2406.10247):
  which source KV heads share a pooled head is free, since permuting KV heads together
  with the query heads that read them (Q rows) and those heads' O columns is exact. We
  pick the equal-size partition with the least within-group spread of K and V
  activations on calibration tokens.
- Alignment (`align=procrustes`, after Jin et al. 2025, "Align attention heads before
  merging them"): heads that compute the same thing in different bases average to noise.
  V head s may be replaced by R v for any orthogonal R if the O columns of its query heads
  become O R^T; K head s by P k for P a 2x2 rotation in each RoPE plane (those commute
  with RoPE: plane i is dims i and i + hd/2 of the half-split layout) if its query heads
  become P q. R and P come from orthogonal Procrustes (torch.linalg.svd) towards the
  group's mean (generalised Procrustes).

Everything is computed from one statistic per layer: C = X^T X of the attention input
X = [x, 1] (the 1 carries optional K/V biases) over calibration tokens. Head activations
are A_s = X W_s^T with W_s = [weight rows, bias] (hd, d+1), so every cross-covariance
A_s^T A_t = W_s C W_t^T is an (hd, hd) matrix: no activations are stored.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from tqdm import tqdm

GROUPINGS = ("contiguous", "similar")
ALIGNMENTS = ("none", "procrustes")
GPA_ITERS = 8  # generalised Procrustes converges in a few sweeps at this size


@dataclass
class LayerPlan:
    """New KV head position j holds source head order[j]; pooled head g pools positions
    g*m .. g*m+m-1. k_rot/v_rot (S, hd, hd) rotate position j's rows (k' = P k, v' = R v);
    None: no rotation (the permutation alone is exact in any dtype)."""
    order: torch.Tensor
    k_rot: torch.Tensor | None = None
    v_rot: torch.Tensor | None = None


# ---- calibration statistic ----------------------------------------------------------

@torch.no_grad()
def attention_input_grams(model, windows: torch.Tensor, batch_size: int = 8,
                          progress: bool = False) -> list[torch.Tensor]:
    """Per layer, C = X^T X (d+1, d+1) in fp32 over every token of windows (N, T), where
    X = [input of that layer's attention, 1]. progress: a tqdm bar over the tokens."""
    grams: list[torch.Tensor | None] = [None] * len(model.blocks)

    def accumulate(layer):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (B*T, d)
            x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)  # (B*T, d+1)
            c = x.T @ x
            grams[layer] = c if grams[layer] is None else grams[layer] + c
        return hook

    handles = [b.attn.register_forward_pre_hook(accumulate(i)) for i, b in enumerate(model.blocks)]
    bar = tqdm(total=windows.numel(), unit="tok", desc="calibration forward", disable=not progress)
    try:
        for batch in windows.split(batch_size):
            model(batch.to(model.device), last_only=True)  # the head's logits are not needed
            bar.update(batch.numel())
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    return grams


def head_rows(weight: torch.Tensor, bias: torch.Tensor | None, n_heads: int) -> torch.Tensor:
    """A K or V projection (n*hd, d) and its optional bias -> W (n, hd, d+1) in fp32."""
    bias = torch.zeros(weight.shape[0]) if bias is None else bias
    rows = torch.cat([weight.float(), bias.float().to(weight.device)[:, None]], dim=1)
    return rows.view(n_heads, -1, rows.shape[1])


def head_grams(rows: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """rows (S, hd, d+1), C -> G[s, t] = A_s^T A_t, (S, S, hd, hd) in fp64."""
    S, hd, _ = rows.shape
    flat = rows.reshape(S * hd, -1).to(gram.device)
    grams = (flat @ gram @ flat.T).cpu().double()  # on the CPU first: MPS has no float64
    return grams.view(S, hd, S, hd).transpose(1, 2)


# ---- Procrustes ---------------------------------------------------------------------

def procrustes(m: torch.Tensor, proper: bool) -> torch.Tensor:
    """m = A^T B (..., n, n) -> the orthogonal Q (..., n, n) minimising |A Q - B|; proper:
    Q must be a rotation (det +1), as only rotations commute with RoPE."""
    u, _, vh = torch.linalg.svd(m)
    if proper:
        sign = torch.linalg.det(u @ vh).sign()  # -1: flip the weakest direction
        u = torch.cat([u[..., :-1], u[..., -1:] * sign[..., None, None]], dim=-1)
    return u @ vh


def rope_planes(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The dims of a K head that RoPE rotates, as (P, 2) planes of the half-split layout
    over the first rotary dims (all of them unless the config says otherwise), and the
    dims it leaves alone, which any orthogonal map may mix."""
    rotary = getattr(cfg, "rotary_dim", 0) or cfg.head_dim
    if getattr(cfg, "positions", "rope") != "rope":
        rotary = 0
    half = rotary // 2
    planes = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1)
    return planes, torch.arange(rotary, cfg.head_dim)


def k_procrustes(m: torch.Tensor, planes: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """The orthogonal Q minimising |A Q - B| for m = A^T B (..., hd, hd) among those that
    commute with RoPE: a 2x2 rotation in each plane, any orthogonal map on the free dims."""
    q = torch.zeros_like(m)
    rows, cols = planes[:, :, None], planes[:, None, :]  # (P, 2, 1), (P, 1, 2)
    q[..., rows, cols] = procrustes(m[..., rows, cols], proper=True)
    if len(free):
        q[..., free[:, None], free] = procrustes(m[..., free[:, None], free], proper=False)
    return q


def generalised_procrustes(g: torch.Tensor, solve) -> torch.Tensor:
    """g (m, m, hd, hd) the group's head grams -> Q (m, hd, hd) so that A_s Q_s are as close
    as possible to their mean: align every head to the first, then to the running mean."""
    m = g.shape[0]
    q = solve(g[:, 0])  # (m, hd, hd): each head onto member 0
    for _ in range(GPA_ITERS):
        cross = torch.einsum("stij,tjk->sik", g, q) / m  # A_s^T mean_t(A_t Q_t)
        q = solve(cross)
    return q


# ---- grouping -----------------------------------------------------------------------

def distances(g: torch.Tensor, solve) -> torch.Tensor:
    """(S, S) squared distance |A_s Q - A_t|^2 after the best Q (solve), or none (None)."""
    norms = energy(g)
    matched = torch.einsum("stii->st", g) if solve is None else (solve(g) * g).sum(dim=(2, 3))
    return norms[:, None] + norms[None, :] - 2 * matched  # tr(Q^T A_s^T A_t) = <Q, G_st>


def energy(g: torch.Tensor) -> torch.Tensor:
    """(S,) |A_s|^2 from the head grams."""
    return torch.einsum("ssii->s", g)


def spread(d: torch.Tensor, groups: list[list[int]]) -> float:
    """Within-group spread: sum over groups of sum_{s<t} d(s, t) / m (for squared
    Euclidean d, exactly the sum of squared distances to the group mean)."""
    return sum(d[g][:, g].sum().item() / 2 / len(g) for g in groups)


def similar_groups(d: torch.Tensor, n_groups: int) -> list[list[int]]:
    """An equal-size partition of range(S) with small within-group spread under d:
    greedy construction (each next group: the free head whose nearest free heads are
    closest, with them) or the contiguous partition, whichever is tighter, then
    best-improvement swaps of two heads between groups until no swap lowers the spread (a
    local optimum; exact on planted copies)."""
    size = d.shape[0] // n_groups
    free, groups = list(range(d.shape[0])), []
    while free:
        sub = d[free][:, free]
        near = sub.argsort(dim=1, stable=True)[:, :size]  # each free head, then its nearest
        tightest = near[sub.gather(1, near).sum(dim=1).argmin()].tolist()
        groups.append(sorted(free[i] for i in tightest))
        free = [h for h in free if h not in groups[-1]]
    contiguous = [list(range(g * size, (g + 1) * size)) for g in range(n_groups)]
    groups = min(groups, contiguous, key=lambda g: spread(d, g))  # never worse than the paper's
    current = spread(d, groups)
    while True:
        trials = [swap(groups, a, i, b, j) for a, b in itertools.combinations(range(n_groups), 2)
                  for i in range(size) for j in range(size)]
        best = min(trials, key=lambda g: spread(d, g), default=groups)
        if spread(d, best) >= current - 1e-9 * abs(current):
            return groups
        groups, current = best, spread(d, best)


def swap(groups: list[list[int]], a: int, i: int, b: int, j: int) -> list[list[int]]:
    out = [list(g) for g in groups]
    out[a][i], out[b][j] = groups[b][j], groups[a][i]
    return out


# ---- the plan -----------------------------------------------------------------------

def plan_layer(k_rows: torch.Tensor, v_rows: torch.Tensor, gram: torch.Tensor, n_dst: int,
               rope: tuple[torch.Tensor, torch.Tensor], group: str, align: str) -> LayerPlan:
    """k_rows, v_rows (S, hd, d+1) from head_rows; gram C of this layer; rope from
    rope_planes."""
    S = k_rows.shape[0]
    gk, gv = head_grams(k_rows, gram), head_grams(v_rows, gram)
    solve_k = (lambda m: k_procrustes(m, *rope)) if align == "procrustes" else None
    solve_v = (lambda m: procrustes(m, proper=False)) if align == "procrustes" else None
    if group == "similar":  # K and V weigh the same: each scaled by its mean head energy
        d = distances(gk, solve_k) / energy(gk).mean() + distances(gv, solve_v) / energy(gv).mean()
        order = torch.tensor([h for g in similar_groups(d, n_dst) for h in g])
    else:
        order = torch.arange(S)
    if align == "none":
        return LayerPlan(order)
    m = S // n_dst
    k_rot, v_rot = [], []
    for g in order.view(n_dst, m):
        idx = (g[:, None], g[None, :])
        # Q minimises |A Q - B| over row activations; on column vectors k' = Q^T k
        k_rot.append(generalised_procrustes(gk[idx], solve_k).transpose(1, 2))
        v_rot.append(generalised_procrustes(gv[idx], solve_v).transpose(1, 2))
    return LayerPlan(order, torch.cat(k_rot).float(), torch.cat(v_rot).float())


def move_heads(t: torch.Tensor, n_src: int, order: torch.Tensor,
               rot: torch.Tensor | None) -> torch.Tensor:
    """t: rows of n_src head groups, (n_src*r*hd, ...) with r heads per group (r = 1 for
    K/V; for Q and O^T the query heads reading each KV head; 1-D for a bias). Group j of
    the result is source group order[j], each of its heads' rows rotated by rot[j]."""
    x = t.reshape(n_src, -1, t[0].numel())[order.to(t.device)]  # (S, r*hd, c)
    if rot is not None:
        hd = rot.shape[-1]
        x = torch.einsum("sij,srjc->sric", rot.to(t.device), x.float().view(n_src, -1, hd, x.shape[-1]))
    return x.reshape(t.shape).to(t.dtype)


def kv_error(aligned: torch.Tensor, pooled: torch.Tensor, gram: torch.Tensor) -> float:
    """What pooling loses: sum_s |A_s' - B_g(s)|^2 / sum_s |A_s'|^2 over the tokens of
    gram, A_s' the (permuted, rotated) source heads (S, hd, d+1), B the pooled heads
    (G, hd, d+1); rotations keep |A_s|, so the denominator is the source's energy."""
    m = aligned.shape[0] // pooled.shape[0]
    diff = aligned - pooled.repeat_interleave(m, dim=0)  # (S, hd, d+1)
    sq = lambda w: torch.einsum("shi,ij,shj->", w, gram.to(w.device), w).item()
    return sq(diff) / max(sq(aligned), 1e-30)
