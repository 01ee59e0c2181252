"""align=linear (convert/align.py): the wider exact maps it relies on, checked on imported
Llama, GPT-2 and NeoX sources against maps built here; its K/V error against procrustes's
on a trained model; and a planted model that only it converts without loss."""
import math

import pytest
import torch

from helpers import planted_mha
from hf_fixtures import tiny_hf_family, tiny_hf_llama
from test_convert import add_bias, rewritten
from model import ModelConfig, Transformer
from convert.align import LayerPlan
from store.checkpoint import model_state
from convert.heads import (ConvertError, Conversion, convert_model, kv_errors,
                           plan_conversion, pooled_model)
from store.hf import import_hf

F64 = torch.float64


def logits(model, seed=1, T=24):
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)




def invertible(n_heads, n, gen):
    """Random well-conditioned, far from orthogonal maps (n_heads, n, n)."""
    scale = torch.rand(n_heads, n, generator=gen, dtype=F64) * 1.5 + 0.5
    return torch.diag_embed(scale) + 0.4 * torch.randn(n_heads, n, n, generator=gen, dtype=F64) / n ** 0.5


def exact_plan(cfg, S, gen, order=None, layout="half"):
    """Per KV head: K scaled by a random complex scalar (rotation r, angle t) in each RoPE
    plane, dims (i, i + rot/2) of the half-split layout ("pairs": the wrong layout (2i,
    2i+1), for the control), any invertible map on the dims RoPE leaves alone; V any
    invertible map. The readers take the inverse transposes: Q plane / conj(z), O M^-1."""
    hd = cfg.head_dim
    rot = cfg.rotary_dim if cfg.positions == "rope" else 0
    k = torch.zeros(S, hd, hd, dtype=F64)
    half = torch.arange(rot // 2)
    i, j = (half, half + rot // 2) if layout == "half" else (2 * half, 2 * half + 1)
    r = torch.rand(S, rot // 2, generator=gen, dtype=F64) * 1.5 + 0.5
    t = torch.rand(S, rot // 2, generator=gen, dtype=F64) * 2 * math.pi
    k[:, i, i], k[:, j, j], k[:, i, j], k[:, j, i] = r * t.cos(), r * t.cos(), -r * t.sin(), r * t.sin()
    free = torch.arange(rot, hd)
    k[:, free[:, None], free] = invertible(S, len(free), gen)
    v = invertible(S, hd, gen)
    order = torch.arange(S) if order is None else order
    return LayerPlan(order, k.float(), v.float(), torch.linalg.inv(k).mT.float(),
                     torch.linalg.inv(v).mT.float())


@pytest.fixture(scope="module", params=["llama", "llama+bias", "gpt2", "neox"])
def source(request, tmp_path_factory):
    """(name, our import of a tiny random HF model): Llama (full RoPE, no biases, or random
    ones added), GPT-2 (learned positions: no RoPE, biases), NeoX (RoPE on a quarter of each
    head, biases)."""
    name = request.param
    out = tmp_path_factory.mktemp(name.replace("+", "_"))
    if name.startswith("llama"):
        tiny_hf_llama(out, "bpe")
    else:
        tiny_hf_family(out, name)
    model = import_hf(out, dtype=torch.float32).eval()
    if name == "llama+bias":
        add_bias(model, torch.Generator().manual_seed(5))
    return name, model


def test_scaled_plane_rotations_and_invertible_maps_keep_the_logits(source):
    name, src = source
    cfg = src.config
    assert (cfg.positions, cfg.rotary_dim < cfg.head_dim) == {
        "gpt2": ("learned", False), "neox": ("rope", True)}.get(name, ("rope", False))
    gen = torch.Generator().manual_seed(0)
    plans = [exact_plan(cfg, cfg.n_kv_head, gen, torch.randperm(cfg.n_kv_head, generator=gen))
             for _ in src.blocks]
    new = rewritten(src, plans)
    torch.testing.assert_close(logits(new), logits(src), atol=1e-5, rtol=1e-5)
    k = plans[0].k_rot  # far from orthogonal: scales, not only rotations
    assert (k @ k.mT - torch.eye(cfg.head_dim)).abs().max() > 0.3
    if cfg.positions == "rope":  # controls: the same scalars on the wrong planes, or a
        wrong = [exact_plan(cfg, cfg.n_kv_head, gen, layout="pairs") for _ in src.blocks]
        assert (logits(rewritten(src, wrong)) - logits(src)).abs().max() > 1e-3
        squash = exact_plan(cfg, cfg.n_kv_head, gen)  # non-conformal 2x2 map on a plane
        half = cfg.rotary_dim // 2
        squash.k_rot[:, 0, 0], squash.k_read[:, 0, 0] = 2.0, 0.5
        squash.k_rot[:, 0, half] = squash.k_read[:, half, 0] = 0.0
        squash.k_rot[:, half, 0] = squash.k_read[:, 0, half] = 0.0
        squash.k_rot[:, half, half], squash.k_read[:, half, half] = 0.5, 2.0
        bad = rewritten(src, [squash] + [LayerPlan(torch.arange(cfg.n_kv_head))] * (cfg.n_layer - 1))
        assert (logits(bad) - logits(src)).abs().max() > 1e-3


# ---- fitted conversions ----------------------------------------------------------------

N_HEAD, HD = 8, 8


def tiny_model(n_kv_head=N_HEAD, seed=0, **family):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, n_layer=2, n_head=N_HEAD, n_kv_head=n_kv_head,
                      d_model=N_HEAD * HD, max_seq_len=32, init_std=0.1, **family)
    return Transformer(cfg).eval()


def markov_tokens(n, T, seed):
    """(n, T) tokens of a fixed random sparse bigram chain: structure a model can learn."""
    gen = torch.Generator().manual_seed(0)
    nxt = torch.randint(0, 61, (61, 3), generator=gen)  # each token has 3 successors
    gen.manual_seed(seed)
    x = torch.empty(n, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, 61, (n,), generator=gen)
    for t in range(1, T):
        x[:, t] = nxt[x[:, t - 1], torch.randint(0, 3, (n,), generator=gen)]
    return x


@pytest.fixture(scope="module")
def trained():
    """A tiny MHA model trained 30 AdamW steps on the chain (loss falls well below uniform)."""
    model = tiny_model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = markov_tokens(240, 25, seed=1)
    for batch in data.split(8):
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1),
                                                 batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.75 * math.log(61)
    return model.eval()


def fitted(model, G, group, align, calib):
    """(the converted model, its K/V errors per layer on calib)."""
    plans = plan_conversion(model, Conversion(G, group=group, align=align), calib)
    converted = pooled_model(model, Conversion(G), plans)
    return converted, kv_errors(model, model_state(converted), plans, calib)


@pytest.mark.parametrize("G", [4, 1])
def test_linear_error_never_exceeds_procrustes_on_any_layer(trained, G):
    """linear's family of maps holds procrustes's rotations and mean, and its fit is the
    optimum over it: on the calibration tokens no layer's K or V error is higher (contiguous
    groups; with group=similar too, as it keeps procrustes's groups when they fit better)."""
    calib = markov_tokens(16, 32, seed=2)
    for group in ("contiguous", "similar"):
        linear = fitted(trained, G, group, "linear", calib)[1]
        rotated = fitted(trained, G, group, "procrustes", calib)[1]
        for lin, pro in zip(linear, rotated):
            assert lin["k"] <= pro["k"] + 1e-6 and lin["v"] <= pro["v"] + 1e-6, (group, lin, pro)
        total = lambda errors: sum(e["k"] + e["v"] for e in errors)
        assert total(linear) < 0.95 * total(rotated)  # and clearly lower overall


FAMILIES = {"rope": {}, "partial rotary": {"rotary_dim": 4},
            "learned positions": {"positions": "learned", "norm": "layernorm", "attn_bias": True}}


def planted(G, family):
    """(an MHA model whose 8 KV heads are, in shuffled order, exact maps of the G KV heads
    of a GQA model: V any invertible map, K a scaled rotation per RoPE plane and any
    invertible map on the free dims, Q and O counter-mapped; that GQA model)."""
    gen = torch.Generator().manual_seed(11)
    base = tiny_model(G, seed=4, **FAMILIES[family])
    plans = [exact_plan(base.config, N_HEAD, gen, torch.randperm(N_HEAD, generator=gen))
             for _ in base.blocks]
    return planted_mha(base, tiny_model(N_HEAD, **FAMILIES[family]), plans, logits), base


@pytest.mark.parametrize("family, G, align", [
    ("rope", 2, "linear"), ("partial rotary", 2, "linear_readers"),
    ("learned positions", 1, "linear")])
def test_planted_maps_convert_exactly_under_linear_only(family, G, align):
    mha, base = planted(G, family)
    calib = torch.randint(0, 61, (8, 32), generator=torch.Generator().manual_seed(2))
    best, errors = fitted(mha, G, "similar", align, calib)
    torch.testing.assert_close(logits(best), logits(base), atol=1e-4, rtol=1e-4)
    assert all(e["k"] < 1e-6 and e["v"] < 1e-6 for e in errors)
    rotated, errors = fitted(mha, G, "similar", "procrustes", calib)
    assert (logits(rotated) - logits(base)).abs().mean() > 0.05
    assert all(e["k"] > 0.01 and e["v"] > 0.01 for e in errors)


def test_linear_needs_mean_pooling():
    with pytest.raises(ConvertError, match="align=linear fits each group's shared head"):
        convert_model(tiny_model(), Conversion(2, "first", align="linear"),
                      calib=torch.zeros(1, 8, dtype=torch.long))
