"""Conversion to MLA (convert/latent.py): exact when nothing is dropped, for every family
gqalab reads; exact on a planted model at its true (rank, RoPE planes) and not below; the
cache's bytes; bad shapes refused before anything is loaded or calibrated."""
import json

import pytest
import torch

from convert import command
from convert.align import attention_input_grams
from convert.command import convert_to_latent, main
from convert.heads import Calibration, ConvertError
from convert.latent import LatentConversion, factor, latent_model, reader_grams, search_split
from model.config import ModelConfig
from model.kv_cache import LatentCache, kv_bytes_per_token
from model.sampling import SamplingConfig, generate
from model.transformer import Transformer
from store.checkpoint import load_checkpoint
from hf_fixtures import hf_tokenizer, tiny_hf_llama

NO_DATA = Calibration(windows=0)


@pytest.fixture(scope="module")
def llama_mha(tmp_path_factory):
    """(dir, transformers model): tiny_hf_llama, 2 layers of 4 MHA heads of 16 dims, d 64."""
    src = tmp_path_factory.mktemp("llama_mha")
    return src, tiny_hf_llama(src, "bpe")[0]


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def converted_logits(out, tokens):
    ckpt = load_checkpoint(out)
    with torch.no_grad():
        return ckpt.model(tokens), ckpt.config


def tiny_hf_gqa_llama(out_dir):
    """tiny_hf_llama's shape with 2 KV heads for 4 query heads (GQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = hf_tokenizer("bpe", out_dir)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=False, attn_implementation="eager")).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, mean=0.0 if p.dim() > 1 else 1.0, std=0.1)
    model.save_pretrained(out_dir)
    return model


@pytest.mark.parametrize("n_kv", [4, 2])
def test_full_rank_with_every_rope_dim_is_the_llama_source(tmp_path, llama_mha, n_kv):
    src, model = llama_mha if n_kv == 4 else (tmp_path / "src", tiny_hf_gqa_llama(tmp_path / "src"))
    kv_rank, rope_dim = 64, n_kv * 16  # d_model 64 = min(2 n_kv hd, d_model); every head's RoPE
    out = convert_to_latent(src, tmp_path / "mla",
                            LatentConversion(kv_rank, rope_dim), NO_DATA)
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    got, cfg = converted_logits(out, tokens)
    assert (cfg.kv_rank, cfg.rope_dim, cfg.n_kv_head) == (kv_rank, rope_dim, 4)
    torch.testing.assert_close(got, hf_logits(model, tokens), atol=1e-4, rtol=0)


def test_full_rank_is_the_gpt2_and_neox_source(hf_family, tmp_path):
    family, src, model, _ = hf_family
    rotary = 0 if family == "gpt2" else 4  # NeoX rotates a quarter of each 16-dim head
    out = convert_to_latent(src, tmp_path / "mla", LatentConversion(64, 4 * rotary), NO_DATA)
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    got, cfg = converted_logits(out, tokens)
    assert cfg.rope_dim == 4 * rotary and cfg.rotary_dim == cfg.head_dim
    torch.testing.assert_close(got, hf_logits(model, tokens), atol=1e-4, rtol=0)


# ---- a planted source: [K_nope; V] of rank R, positional energy in P complex components --

R, PLANES = 5, (0, 3)  # latent rank; the RoPE planes holding K (one component each)


def planted_model() -> Transformer:
    """GQA (4 query, 2 KV heads of 8 dims): per layer KV head 1's planes are a complex multiple
    of head 0's, only PLANES are nonzero (so 2 components: RoRoPE finds them, whole-head
    selection needs 4), and V has rank R."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, head_dim=8,
                      max_seq_len=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for block in model.blocks:
            k = torch.zeros(2, 8, 32)
            for i in PLANES:
                z = torch.complex(torch.randn(32), torch.randn(32))
                for g, a in enumerate((1.0, complex(0.6, -1.3))):
                    k[g, i], k[g, i + 4] = (a * z).real, (a * z).imag
            block.attn.k_proj.weight.copy_(k.reshape(16, 32))
            block.attn.v_proj.weight.copy_(torch.randn(16, R) @ torch.randn(R, 32) * 0.3)
    return model


def max_error(conversion: LatentConversion) -> float:
    model = planted_model()
    tokens = torch.randint(0, 64, (2, 48))
    grams = attention_input_grams(model, tokens)
    mla, _ = latent_model(model, conversion, grams)
    with torch.no_grad():
        return (mla(tokens) - model(tokens)).abs().max().item()


def test_planted_rank_and_planes_are_exact_there_and_not_below():
    rope_dim = 2 * len(PLANES)
    assert max_error(LatentConversion(R, rope_dim)) < 1e-4
    assert max_error(LatentConversion(R - 1, rope_dim)) > 1e-2
    assert max_error(LatentConversion(R, rope_dim - 2)) > 1e-2
    # whole head planes (MHA2MLA's selection) need both heads' planes: 4 components
    assert max_error(LatentConversion(R, rope_dim, rope="select")) > 1e-2
    assert max_error(LatentConversion(R, 2 * rope_dim, rope="select")) < 1e-4


def test_converted_model_decodes_cached_as_uncached():
    """The absorbed decode over the latent cache, with the kept (repeated) frequencies."""
    model, _ = latent_model(planted_model(), LatentConversion(6, 8, rope="select"), None)
    freqs = model.config.rope_freqs
    assert len(set(freqs)) == 2 and len(freqs) == 4  # planes 0 and 3 of both heads
    prompt = torch.randint(0, 64, (1, 9))
    greedy = SamplingConfig(temperature=0)
    cached = generate(model, prompt, 12, greedy)
    assert torch.equal(cached, generate(model, prompt, 12, greedy, use_cache=False))


# ---- bytes --------------------------------------------------------------------------------

@pytest.mark.parametrize("conversion, width", [(LatentConversion(7, 4), 11),
                                               (LatentConversion(budget=4 * 2 * 20), 20),
                                               (LatentConversion(budget=4 * 2 * 9, rope_dim=2), 9)])
def test_kv_bytes_are_rank_plus_rope_width_times_4_times_layers(conversion, width):
    model, _ = latent_model(planted_model(), conversion, None)
    cfg = model.config
    assert cfg.kv_rank + cfg.rope_dim == width
    assert kv_bytes_per_token(cfg) == width * 4 * cfg.n_layer
    cache = LatentCache.for_model(cfg, 1, 10, torch.float32, "cpu")
    assert sum(t.numel() * t.element_size() for t in cache.latent) == 10 * width * 4 * 2
    if conversion.budget:
        assert kv_bytes_per_token(cfg) == conversion.budget


def test_default_budget_split_keeps_one_head_of_rope():
    kv_rank, rope_dim = LatentConversion(budget=15_360).shape(
        ModelConfig(n_layer=30, n_head=9, n_kv_head=3, d_model=576, head_dim=64))
    assert (kv_rank, rope_dim) == (64, 64)


# ---- refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["mla.kv_rank=65"], "kv_rank=65 is outside 1..64"),
    (["mla.kv_rank=8", "mla.rope_dim=3"], "mla.rope_dim=3 must be even"),
    (["mla.kv_rank=8", "mla.rope_dim=66"], "exceeds the source's 64 rotary dims"),
    (["mla.budget=100"], "mla.budget=100 B/token fits no split: it must be a multiple of 8"),
    (["mla.budget=64", "mla.rope_dim=8"], "no more than mla.rope_dim=8"),
    (["mla.kv_rank=8", "mla.budget=160"], "not both"),
    (["mla.kv_rank=8", "n_kv_head=2"], "MLA has no KV heads"),
    (["mla.kv_rank=8", "mla.rope=best"], "best"),
    (["mla.kv_rank=8", "mla.fit=best"], "best"),
    (["mla.kv_rank=8", "mla.balance=0"], "mla.balance=0.0 must be > 0"),
])
def test_bad_shapes_are_refused_in_one_line_before_loading_or_calibrating(
        llama_mha, tmp_path, capsys, monkeypatch, args, message):
    src = llama_mha[0]
    capsys.readouterr()
    for step in ("attention_input_grams", "token_windows"):
        monkeypatch.setattr(command, step, lambda *a, **k: pytest.fail("calibrated"))
    code = main([f"ckpt={src}", f"out={tmp_path / 'mla'}", "calib_windows=4", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert message in err
    assert not (tmp_path / "mla").exists()


def test_learned_positions_refuse_a_rope_width():
    with pytest.raises(ConvertError, match="learned positions"):
        LatentConversion(8, 2).shape(ModelConfig(positions="learned"))


def test_cli_writes_the_shape_and_fit_into_meta(llama_mha, tmp_path, capsys):
    src = llama_mha[0]
    assert main([f"ckpt={src}", f"out={tmp_path / 'mla'}", "mla.budget=384",
                 "calib_windows=0"]) == 0
    meta = json.loads((tmp_path / "mla" / "meta.json").read_text())
    made = meta["converted_from"]
    assert (made["kv_rank"], made["rope_dim"], made["calib_windows"]) == (32, 16, 0)
    assert (made["fit"], made["balance"], made["split_search"]) == ("readers", 0.1, [])
    assert [e["layer"] for e in meta["latent_fit"]] == [0, 1]
    assert "wrote" in capsys.readouterr().out


# ---- the latent's fit and the budget's split ----------------------------------------------

def samples(n: int = 400, d: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, d) correlated, with a mean; C = [x, 1]^T [x, 1])."""
    torch.manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64) @ torch.randn(d, d, dtype=torch.float64) + 0.5
    xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    return x, xb.T @ xb


def test_reader_weighted_factor_reaches_the_weighted_optimum():
    """factor(readers=A^T A) attains Eckart-Young's bound for E|A (W x + b - W_u W_d x - b')|^2,
    the discarded singular values of A W L (S = L L^T, x centred: the bias takes the mean);
    the unweighted fit does worse on that objective, and readers=None is readers=I."""
    x, gram = samples()
    n, d, r = 12, x.shape[1], 4
    w = torch.randn(n, d + 1, dtype=torch.float64)
    a = torch.randn(n, n, dtype=torch.float64)
    cov = torch.cov(x.T, correction=0)
    bound = torch.linalg.svdvals(a @ w[:, :d] @ torch.linalg.cholesky(cov))[r:].square().sum()

    def weighted_error(down, up, bias):
        err = x @ w[:, :d].T + w[:, d] - (x @ down.T @ up.T + bias)  # (N, n)
        return (err @ a.T).square().mean(0).sum()

    weighted = factor(w, gram, r, True, a.T @ a)
    assert weighted_error(*weighted[:3]) == pytest.approx(bound.item(), rel=1e-8)
    assert weighted_error(*factor(w, gram, r, True)[:3]) > 1.05 * bound
    for got, want in zip(factor(w, gram, r, True), factor(w, gram, r, True, torch.eye(n, dtype=torch.float64))):
        torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(want))


def test_reader_grams_weigh_errors_as_the_output_sees_them():
    """Against samples: a value error e on KV head g costs sum_h |O_h e|^2 over its query
    heads; a key error costs balance / hd x sum_h E|O_h (v - mean v)|^2 E[(q_h . e)^2]."""
    x, gram = samples(d=8)
    H, G, hd, d = 4, 2, 3, 8
    q = torch.randn(H, hd, d + 1, dtype=torch.float64)
    v = torch.randn(G, hd, d + 1, dtype=torch.float64)
    o = torch.randn(d, H * hd, dtype=torch.float64)
    readers = reader_grams(q, v, o, gram, balance=0.3)
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    e = torch.randn(hd, dtype=torch.float64)
    for g in range(G):
        heads = range(g * 2, g * 2 + 2)
        o_h = [o[:, h * hd:(h + 1) * hd] for h in heads]
        values = xb @ v[g].T  # (N, hd)
        spread = [(values - values.mean(0)) @ oh.T for oh in o_h]
        key_cost = sum(s.square().sum(1).mean() * (xb @ q[h].T @ e).square().mean()
                       for s, h in zip(spread, heads)) * 0.3 / hd
        k_rows = slice(g * hd, (g + 1) * hd)
        v_rows = slice((G + g) * hd, (G + g + 1) * hd)
        assert e @ readers[k_rows, k_rows] @ e == pytest.approx(key_cost.item(), rel=1e-9)
        assert e @ readers[v_rows, v_rows] @ e == pytest.approx(
            sum((oh @ e).square().sum() for oh in o_h).item(), rel=1e-9)
    assert readers[:G * hd, G * hd:].abs().max() == 0  # K and V blocks apart


def test_split_search_keeps_the_rope_dim_of_least_calibration_loss():
    model = planted_model()  # 2 layers, 2 KV heads x 8 rotary dims
    tokens = torch.randint(0, 64, (3, 40))
    grams = attention_input_grams(model, tokens)
    budget = LatentConversion(budget=4 * 2 * 16)  # 16 values per layer
    chosen, tried = search_split(model, budget, grams, tokens)
    losses = {t["rope_dim"]: t["calib_loss"] for t in tried}
    assert {4, 6, 8, 10, 12} <= set(losses)  # the coarse grid: 2/8 .. 6/8 of the width
    assert chosen.rope_dim == min(losses, key=losses.get)
    assert chosen.shape(model.config) == (16 - chosen.rope_dim, chosen.rope_dim)
    with torch.no_grad():
        logits = latent_model(model, chosen, grams)[0](tokens[:, :-1])
    direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    assert losses[chosen.rope_dim] == pytest.approx(direct.item(), abs=1e-4)
    for given, windows in ((budget, None), (LatentConversion(budget=128, rope_dim=4), tokens),
                           (LatentConversion(8, 4), tokens)):
        assert search_split(model, given, grams, windows) == (given, [])
