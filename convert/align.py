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
- Least squares (`align=linear`): the maps that leave the function unchanged are wider
  than rotations. V is read only through O, so any invertible hd x hd map on a V head folds
  into its query heads' O columns; K is read only through q.k after RoPE, which turns each
  plane as a complex number, so a complex scalar (rotation and scale) on a K plane is exact
  with the reading Q plane divided by its conjugate, and dims RoPE leaves alone (NeoX's
  partial rotary, GPT-2) take any invertible map folded into Q. Under these freedoms the
  best shared head of a group is a truncated SVD of the group's stacked activations: V (and
  K's free dims) the top-hd principal subspace, each K plane the complex rank-1
  approximation of the group's planes (the GQA-shaped cousin of MHA2MLA's joint low-rank
  KV, arXiv 2502.14837, and Palu, 2407.21118). The readers then take each head's
  least-squares map from the shared head back to its own, so no inverse is ever formed.
  Procrustes + mean is one point of this family: its K/V error is never lower.
  `align=linear_readers` weights each head's error by what reads it (V through its query
  heads' O columns, K through their queries' energy per plane), then fits the same way.

Everything is computed from one statistic per layer: C = X^T X of the attention input
X = [x, 1] (the 1 carries optional K/V biases) over calibration tokens. Head activations
are A_s = X W_s^T with W_s = [weight rows, bias] (hd, d+1), so every cross-covariance
A_s^T A_t = W_s C W_t^T is an (hd, hd) matrix: no activations are stored.
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

import torch
from tqdm import tqdm

class Grouping(enum.StrEnum):
    """Which source KV heads share a pooled head."""
    contiguous = "contiguous"  # the paper's: query head h reads KV head h // group_size
    similar = "similar"  # the least within-group spread on calibration tokens


class Alignment(enum.StrEnum):
    """What maps each source head before pooling (the module docstring)."""
    none = "none"
    procrustes = "procrustes"
    linear = "linear"
    linear_readers = "linear_readers"


GROUPINGS, ALIGNMENTS = tuple(Grouping), tuple(Alignment)
LINEAR = (Alignment.linear, Alignment.linear_readers)  # the shared head is fitted, not a mean of rewritten heads
GPA_ITERS = 8  # generalised Procrustes converges in a few sweeps at this size


@dataclass
class LayerPlan:
    """New KV head position j holds source head order[j]; pooled head g is the mean of
    positions g*m .. g*m+m-1. k_rot/v_rot (S, hd, hd) map position j's K/V rows before the
    mean (k' = P k, v' = R v); None: no map (the permutation alone is exact in any dtype).
    k_read/v_read (S, hd, hd) map the rows of the query heads reading position j (Q rows,
    O columns as rows of O^T); None: the same as k_rot/v_rot, right for orthogonal maps.
    A function-preserving rewrite has read = rot^-T. A linear plan instead has rot = m P_j,
    so the mean is the fitted shared head sum_j P_j W_j, and read = each reader's
    least-squares map (their source head ~ read^T shared head)."""
    order: torch.Tensor
    k_rot: torch.Tensor | None = None
    v_rot: torch.Tensor | None = None
    k_read: torch.Tensor | None = None
    v_read: torch.Tensor | None = None

    def reads(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K readers' map, V readers' map)."""
        return (self.k_rot if self.k_read is None else self.k_read,
                self.v_rot if self.v_read is None else self.v_read)


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


# ---- least squares (align=linear) --------------------------------------------------------

def complex_matrix(z: torch.Tensor) -> torch.Tensor:
    """z (...) complex -> (..., 2, 2): multiplication by z on (re, im) = a plane's (dim i,
    dim i + rot/2), which is how RoPE's half-split layout turns it."""
    return torch.stack([torch.stack([z.real, -z.imag], -1), torch.stack([z.imag, z.real], -1)], -2)


def plane_dot(m: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """m (..., hd, hd) = A^T B -> (..., P) complex a_p^H b_p of each plane read as complex
    activations a = x_i + i x_j."""
    i, j = planes[:, 0], planes[:, 1]
    return torch.complex(m[..., i, i] + m[..., j, j], m[..., i, j] - m[..., j, i])


def block_gram(g: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """g (m, m, hd, hd) -> (m*k, m*k): the Gram of the group's activations on dims (k,),
    stacked side by side."""
    m, k = g.shape[0], len(dims)
    return g[:, :, dims[:, None], dims].transpose(1, 2).reshape(m * k, m * k)


def shared_head(g: torch.Tensor, planes: torch.Tensor, free: torch.Tensor,
                lift: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The best shared head of a group under the exact maps (a complex scalar per plane,
    any map on the free dims): g (m, m, hd, hd) the group's head grams -> (pool (m, hd, hd),
    the energy it misses), the shared head being W = sum_s pool_s W_s. Per plane the top
    eigenvector of the complex (m, m) Gram (rank-1 complex SVD); on the free dims the top
    principal subspace of the stacked heads (truncated SVD). lift (m, hd, hd), symmetric and
    a multiple of the identity on each plane: weigh head s's error by lift_s^2."""
    if lift is not None:
        g = lift[:, None] @ g @ lift[None]  # the lifted heads A_s L_s
    m, hd = g.shape[0], g.shape[-1]
    pool, missed = g.new_zeros(m, hd, hd), 0.0
    if len(planes):
        vals, vecs = torch.linalg.eigh(plane_dot(g, planes).permute(2, 0, 1))
        pool[:, planes[:, :, None], planes[:, None, :]] = complex_matrix(vecs[..., -1].T)
        missed += vals[:, :-1].sum().item()  # (P, m) ascending: all but each plane's top
    if len(free):
        k = len(free)
        vals, vecs = torch.linalg.eigh(block_gram(g, free))
        pool[:, free[:, None], free] = vecs[:, -k:].reshape(m, k, k).transpose(1, 2)
        missed += vals[:-k].sum().item()
    return (pool if lift is None else pool @ lift), missed


def read_maps(pool: torch.Tensor, g: torch.Tensor, planes: torch.Tensor, free: torch.Tensor,
              solve) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool, read) (m, hd, hd): the shared head turned (solve: an exact orthogonal map) to
    the frame nearest the group's mean and scaled to its members' mean energy, so it starts
    uptraining like a source head; then each head's least-squares map read_s from it, with
    source head s ~ read_s^T shared head (the best for any weighting of the error)."""
    cross = torch.einsum("sij,stjk->tik", pool, g)  # (m, hd, hd): B^T A_t = sum_s P_s G_st
    q = solve(cross.mean(0))  # B q is nearest mean_t A_t
    gbb = torch.einsum("tik,tlk->il", cross, pool)  # B^T B
    energy = torch.einsum("ssii->", g) / len(g)
    scale = (energy / torch.trace(q.T @ gbb @ q)).sqrt() if energy > 0 else 1.0
    pool, cross, gbb = scale * q.T @ pool, scale * q.T @ cross, scale ** 2 * q.T @ gbb @ q
    read = torch.zeros_like(pool)
    if len(planes):  # the complex c_s = b^H a_s / b^H b; read^T multiplies by it
        c = plane_dot(cross, planes) / plane_dot(gbb, planes).real.clamp_min(1e-30)
        read[:, planes[:, :, None], planes[:, None, :]] = complex_matrix(c.conj())
    if len(free):  # (B^T B)^+ B^T A_s
        f = (free[:, None], free)
        read[(slice(None), *f)] = torch.linalg.pinv(gbb[f], hermitian=True) @ cross[(slice(None), *f)]
    return pool, read


def sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag_embed(vals.clamp_min(0).sqrt()) @ vecs.transpose(-1, -2)


def reader_lift(reads: torch.Tensor, planes: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """reads (S, hd, hd): per KV head the summed second moment of what reads it (K: its
    query heads' queries, R = sum_h Q_h C Q_h^T; V: its O columns, sum_h O_h^T O_h) -> the
    lift L_s = R_s^(1/2) weighing its error by R (|e L|^2 = tr(e R e^T)); on each plane
    only R's energy there (RoPE turns queries and keys at different positions, so only
    it survives the average)."""
    lift = torch.zeros_like(reads)
    if len(planes):
        rows, cols = planes[:, :, None], planes[:, None, :]
        energy = reads[:, rows, cols].diagonal(dim1=-2, dim2=-1).sum(-1) / 2  # (S, P)
        lift[:, rows, cols] = energy.sqrt()[..., None, None] * torch.eye(2, dtype=reads.dtype)
    if len(free):
        lift[:, free[:, None], free] = sqrt_psd(reads[:, free[:, None], free])
    return lift


def pair_losses(g: torch.Tensor, planes: torch.Tensor, free: torch.Tensor,
                lift: torch.Tensor | None) -> torch.Tensor:
    """(S, S): the energy a shared head of heads s and t misses (0 on the diagonal)."""
    S = g.shape[0]
    d = torch.zeros(S, S, dtype=g.dtype)
    for s, t in itertools.combinations(range(S), 2):
        idx = torch.tensor([s, t])
        d[s, t] = d[t, s] = shared_head(g[idx[:, None], idx], planes, free,
                                        None if lift is None else lift[idx])[1]
    return d


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
               rope: tuple[torch.Tensor, torch.Tensor], group: str, align: str,
               readers: tuple[torch.Tensor, torch.Tensor] | None = None) -> LayerPlan:
    """k_rows, v_rows (S, hd, d+1) from head_rows; gram C of this layer; rope from
    rope_planes; readers (align=linear_readers): (q_rows (H, hd, d+1), o_cols (H, hd, d)),
    the query heads' Q rows and O columns."""
    S, hd = k_rows.shape[:2]
    gk, gv = head_grams(k_rows, gram), head_grams(v_rows, gram)
    v_dims = (torch.zeros(0, 2, dtype=torch.long), torch.arange(hd))  # V: no RoPE, all free
    solve_k = lambda m: k_procrustes(m, *rope)
    solve_v = lambda m: procrustes(m, proper=False)
    lift_k = lift_v = None
    pick = lambda lift, g: None if lift is None else lift[g]  # a group's lifts
    if align == "linear_readers":
        lift_k, lift_v = reader_lifts(*readers, gram, S, rope, v_dims)
    if group == "similar":  # K and V weigh the same: each scaled by its mean head energy
        ek, ev = energy(gk).mean(), energy(gv).mean()
        aligned = align != "none"
        groups = similar_groups(distances(gk, solve_k if aligned else None) / ek
                                + distances(gv, solve_v if aligned else None) / ev, n_dst)
        if align in LINEAR:  # pairs' least-squares losses, or procrustes's groups if better
            missed = lambda g: (shared_head(gk[g][:, g], *rope, pick(lift_k, g))[1] / ek
                                + shared_head(gv[g][:, g], *v_dims, pick(lift_v, g))[1] / ev)
            d = pair_losses(gk, *rope, lift_k) / ek + pair_losses(gv, *v_dims, lift_v) / ev
            groups = min(similar_groups(d, n_dst), groups,
                         key=lambda gs: sum(missed(torch.tensor(g)) for g in gs))
        order = torch.tensor([h for g in groups for h in g])
    else:
        order = torch.arange(S)
    if align == "none":
        return LayerPlan(order)
    m = S // n_dst
    maps = {"k_rot": [], "v_rot": [], "k_read": [], "v_read": []}
    for g in order.view(n_dst, m):
        idx = (g[:, None], g[None, :])
        if align == "procrustes":  # Q minimises |A Q - B| over row activations: k' = Q^T k
            maps["k_rot"].append(generalised_procrustes(gk[idx], solve_k).transpose(1, 2))
            maps["v_rot"].append(generalised_procrustes(gv[idx], solve_v).transpose(1, 2))
            continue
        for kv, grams, dims, solve, lift in (("k", gk, rope, solve_k, lift_k),
                                             ("v", gv, v_dims, solve_v, lift_v)):
            pool = shared_head(grams[idx], *dims, pick(lift, g))[0]
            pool, read = read_maps(pool, grams[idx], *dims, solve)
            maps[f"{kv}_rot"].append(m * pool)  # the mean of the group is sum_s pool_s W_s
            maps[f"{kv}_read"].append(read)
    return LayerPlan(order, **{k: torch.cat(v).float() if v else None for k, v in maps.items()})


def reader_lifts(q_rows: torch.Tensor, o_cols: torch.Tensor, gram: torch.Tensor, S: int,
                 rope, v_dims) -> tuple[torch.Tensor, torch.Tensor]:
    """(K lift, V lift) (S, hd, hd) for align=linear_readers (see reader_lift): query head
    h reads KV head h // (H / S)."""
    H, hd = q_rows.shape[:2]
    q = q_rows.reshape(H * hd, -1).to(gram.device)
    q_moment = (q @ gram @ q.T).cpu().double().view(H, hd, H, hd).diagonal(dim1=0, dim2=2)
    o = o_cols.double()
    o_moment = o @ o.transpose(1, 2)  # (H, hd, hd): O_h^T O_h
    per_kv = lambda r: r.view(S, H // S, hd, hd).sum(1)
    return (reader_lift(per_kv(q_moment.permute(2, 0, 1)), *rope),
            reader_lift(per_kv(o_moment), *v_dims))


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


def kv_error(heads: torch.Tensor, pooled: torch.Tensor, gram: torch.Tensor,
             read: torch.Tensor | None = None) -> float:
    """What pooling loses: sum_s |A_s - B_s|^2 / sum_s |A_s|^2 over the tokens of gram, A_s
    the source heads (S, hd, d+1) in plan order, B_s what head s's readers now see in its
    place, in its basis: read_s^T times its pooled head (pooled (G, hd, d+1)); read None:
    the pooled head itself. For orthogonal read maps this is |read_s A_s - pooled|^2."""
    m = heads.shape[0] // pooled.shape[0]
    seen = pooled.repeat_interleave(m, dim=0)  # (S, hd, d+1)
    if read is not None:
        seen = read.transpose(1, 2).to(seen) @ seen
    sq = lambda w: torch.einsum("shi,ij,shj->", w, gram.to(w.device), w).item()
    return sq(heads - seen) / max(sq(heads), 1e-30)
