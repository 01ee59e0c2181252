"""The real-model experiment's cheap parts on tiny random models: the MHA expansion and KV
head permutation (against transformers' GQA Llama as the reference), the proofs the
experiment runs on SmolLM2 in miniature, calibration options, corpora and the report math.
The SmolLM2 run itself (download, GGUF, minutes of forwards) is not part of CI."""
from __future__ import annotations


import pytest
import torch

from experiments import real_model as rm
from convert.align import Alignment, Grouping
from convert.heads import (Calibration, ConvertError, Conversion, Method, convert_model,
                           expand_kv_heads, permute_kv_heads)
from convert.command import convert_checkpoint
from store.checkpoint import read_meta
from model.kv_cache import kv_bytes_per_token
from store.hf import import_hf


@pytest.fixture(scope="module")
def hf_gqa(tmp_path_factory):
    """A random GQA Llama (6 query heads, 2 KV heads: groups of 3 as SmolLM2's 9/3) saved
    with transformers, and its logits on fixed tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=64, tie_word_embeddings=True,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, mean=0.0 if p.dim() > 1 else 1.0, std=0.2)
    out = tmp_path_factory.mktemp("hf_gqa")
    model.save_pretrained(out)
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return out, tokens, model(tokens).logits


def logits(model, tokens):
    with torch.no_grad():
        return model.eval()(tokens)


def test_expanded_mha_has_transformers_gqa_logits_and_mean_pools_back_exactly(hf_gqa):
    path, tokens, reference = hf_gqa
    gqa = import_hf(path)
    mha = expand_kv_heads(gqa, 3)
    assert (mha.config.n_head, mha.config.n_kv_head) == (6, 6)
    torch.testing.assert_close(logits(mha, tokens), reference, atol=1e-5, rtol=0)
    k = mha.blocks[0].attn.k_proj.weight.view(6, 8, 48)
    assert torch.equal(k[3], k[5]) and not torch.equal(k[2], k[3])  # copies sit in groups of 3
    back = convert_model(mha, Conversion(2, "mean"))
    for name, t in gqa.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], t, atol=1e-7, rtol=0)
    with pytest.raises(ConvertError, match="must divide"):
        expand_kv_heads(gqa, 2)


def test_permuted_heads_keep_the_function_and_similar_grouping_recovers_the_groups(hf_gqa):
    """The experiment's proof in miniature: the permuted MHA has the same logits; pooled
    back to 2 KV heads, group=similar finds the copies (original logits), contiguous mean
    pools unrelated heads (it does not)."""
    path, tokens, reference = hf_gqa
    mha = expand_kv_heads(import_hf(path), 3)
    orders = [torch.tensor([0, 3, 1, 4, 2, 5]), torch.tensor([5, 1, 0, 2, 4, 3])]
    permuted = permute_kv_heads(mha, orders)
    torch.testing.assert_close(logits(permuted, tokens), reference, atol=1e-5, rtol=0)
    k = permuted.blocks[0].attn.k_proj.weight.view(6, 8, 48)
    assert torch.equal(k[0], k[2]) and not torch.equal(k[0], k[1])  # the copies are apart
    calib = torch.randint(0, 96, (4, 32), generator=torch.Generator().manual_seed(2))
    similar = convert_model(permuted, Conversion(2, "mean", group="similar"), calib=calib)
    torch.testing.assert_close(logits(similar, tokens), reference, atol=1e-5, rtol=0)
    contiguous = convert_model(permuted, Conversion(2, "mean"))
    assert (logits(contiguous, tokens) - reference).abs().max() > 1e-2
    with pytest.raises(ConvertError, match="not a permutation"):
        permute_kv_heads(mha, [torch.tensor([0, 0, 1, 2, 3, 4])])


def test_calibration_shape():
    assert Calibration(64).shape(8192) == (64, 1024)  # not the full context
    assert Calibration(64).shape(256) == (64, 256)
    assert Calibration(64, 512).shape(8192) == (64, 512)
    assert Calibration(64, 512, tokens=5000).shape(8192) == (10, 512)  # a budget: ceil
    with pytest.raises(ConvertError, match="exceeds the model's context"):
        Calibration(4, 512).shape(256)
    with pytest.raises(ConvertError, match=">= 0"):
        Calibration(4, tokens=-1).shape(256)


def test_conversion_calibrates_on_short_windows_and_reports_its_cost(tmp_path, capsys):
    """An HF dir whose context is longer than its data's val split: calib_seq_len makes
    the windows fit, a plain mean conversion gets its K/V error measured, and the time,
    tokens and peak memory land in meta.json and on stderr."""
    from hf_fixtures import CORPUS, tiny_hf_llama
    tiny_hf_llama(tmp_path / "hf", "spm")  # context 256
    (tmp_path / "corpus").mkdir()
    for d in range(30):
        (tmp_path / "corpus" / f"doc{d}.txt").write_text("".join(CORPUS[d % 5:d % 5 + 3]))
    data = {"source": "text_files", "files": [f"{tmp_path}/corpus/*.txt"],
            "cache_dir": str(tmp_path / "cache"), "num_proc": 1}
    out = convert_checkpoint(tmp_path / "hf", tmp_path / "mean", Conversion(2),
                             Calibration(windows=3, seq_len=32), data=data)
    meta = read_meta(out)
    assert meta["kv_error"]["seq_len"] == 32 and meta["kv_error"]["windows"] == 3
    assert meta["calibration"]["kv_error_tokens"] == 96 and meta["calibration"]["fit_tokens"] == 0
    assert meta["calibration"]["peak_rss_mb"] > 10 and meta["calibration"]["seconds"] >= 0
    err = capsys.readouterr().err
    assert "calibration:" in err and "peak memory" in err
    from convert.command import main as convert_main
    code = convert_main([f"ckpt={tmp_path / 'hf'}", "n_kv_head=2", "calib_seq_len=300",
                         f"out={tmp_path / 'long'}", "data.source=text_files", f"data.files=[{tmp_path}/corpus/*.txt]",
                         f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: calib_seq_len=300 exceeds the model's context 256")
    assert "\n" not in err.strip() and not (tmp_path / "long").exists()
    fit = convert_checkpoint(tmp_path / "hf", tmp_path / "fit", Conversion(2, align="procrustes"),
                             Calibration(seq_len=32, tokens=100), data=data)
    calib = read_meta(fit)["converted_from"]
    assert (calib["calib_windows"], calib["calib_seq_len"]) == (4, 32)  # ceil(100 / 32)
    assert read_meta(fit)["calibration"]["fit_tokens"] == 128


def test_mla_method_converts_at_the_targets_kv_bytes(tmp_path):
    """method mla of pair gqa3>mqa: an MLA model with MQA's KV bytes per token, fitted on the
    calibration corpus (its rope/latent split searched: meta.json lists the tries)."""
    from hf_fixtures import CORPUS, tiny_hf_llama
    from store.checkpoint import read_config
    tiny_hf_llama(tmp_path / "hf", "spm")  # 2 layers, 4 heads of 16, d 64
    (tmp_path / "train").mkdir()
    for d in range(30):
        (tmp_path / "train" / f"doc{d}.py").write_text("".join(CORPUS[d % 5:d % 5 + 3]))
    cfg = rm.load_settings(["preset=quick", "calib_windows=4", "calib_seq_len=32",
                            "train_max_tokens=0"])
    out = rm.convert({"gqa3": tmp_path / "hf"}, "gqa3>mqa", "mla", cfg,
                     {"train": tmp_path / "train"}, tmp_path / "cache")
    config, meta = read_config(out), read_meta(out)
    mqa_bytes = 2 * 1 * 16 * 4 * 2  # K and V of one head of 16 dims, fp32, 2 layers
    assert kv_bytes_per_token(config) == mqa_bytes == meta["converted_from"]["budget"]
    assert config.kv_rank + config.rope_dim == 32 and config.kv_rank > 0
    tried = meta["converted_from"]["split_search"]
    assert config.rope_dim == min(tried, key=lambda t: t["calib_loss"])["rope_dim"]


def test_corpora_are_disjoint_and_prose_is_docstrings(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    doc = "An English paragraph about a module. " * 10
    for i in range(60):
        (root / f"m{i}.py").write_text(f'"""{doc}{i}"""\nX = {i}\n')
    corpora = rm.write_corpora(tmp_path / "cache", root)
    names = {c: {p.name.removesuffix(".txt") for p in corpora[c].iterdir()} for c in corpora}
    assert names["code"] and names["prose"] and names["train"]
    assert not (names["code"] & names["train"]) and not (names["prose"] & names["train"])
    assert not (names["code"] & names["prose"])
    assert len(names["code"]) + len(names["prose"]) + len(names["train"]) == 60
    prose = next(corpora["prose"].iterdir()).read_text()
    assert prose.startswith("An English paragraph") and "X =" not in prose


def test_methods_follow_what_model_align_offers():
    assert rm.named_conversion("similar+procrustes", 1) == Conversion(
        1, method="mean", group="similar", align="procrustes")
    assert rm.named_conversion("first", 3, seed=5) == Conversion(3, "first", seed=5)
    methods = rm.available_methods()
    # expected from convert's own enums: the paper's three, each other grouping alone, each
    # fitted alignment alone, then each grouping with each alignment, in the enums' order
    groupings = [str(g) for g in Grouping if g is not Grouping.contiguous]
    fitted = [str(a) for a in Alignment if a is not Alignment.none]
    assert methods == [*map(str, Method), *groupings, *fitted,
                       *[f"{g}+{a}" for g in groupings for a in fitted], "mla"]
    assert {"similar", "procrustes", "linear", "similar+linear", "linear_readers"} <= set(methods)
    # every conversion convert offers (a paper method, or mean after any grouping and
    # alignment) has exactly one name
    offered = {(str(m), "contiguous", "none") for m in Method} | {
        ("mean", str(g), str(a)) for g in Grouping for a in Alignment}
    named = [rm.named_conversion(m, 1) for m in methods if m != "mla"]
    assert sorted((str(c.method), str(c.group), str(c.align)) for c in named) == sorted(offered)


def test_gap_closed():
    row = lambda method, prose, code, tokens=0: {
        "source": "s", "target": "MQA", "method": method, "tokens": tokens,
        "prose_nll": prose, "code_nll": code}
    rows = [row("original", 2.0, 1.0), row("mean", 6.0, 3.0), row("procrustes", 5.0, 1.5),
            row("mean", 4.0, 2.0, 100), row("procrustes", 3.0, 2.0, 100)]
    rows[0]["target"] = "GQA-3"
    rm.gap_closed(rows)
    assert rows[2]["prose_gap_closed"] == 0.25 and rows[2]["code_gap_closed"] == 0.75
    assert rows[1]["prose_gap_closed"] == 0.0
    assert rows[4]["prose_gap_closed"] == 0.5 and rows[4]["code_gap_closed"] == 0.0


def test_settings_refuse_bad_input(capsys):
    assert rm.main(["preset=nope"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert rm.main(["preset=quick", "methods=[mean]", "pairs=[gqa3>mha9]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pair") and err.count("\n") == 1
    assert rm.main(["preset=quick", "methods=[mean,bogus]"]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err
    cfg = rm.load_settings(["preset=quick", "methods=[mean,similar+linear]"])
    assert list(cfg.methods) == ["mean", "similar+linear"]
    assert rm.main(["preset=quick", "distill=[0,1.5]"]) == 2
    assert "λ in [0, 1]" in capsys.readouterr().err


def test_distillation_runs_pass_their_weight_and_plain_runs_keep_their_keys():
    """λ = 0 adds no override, so plain uptraining runs cached before distillation existed
    are found again; λ > 0 passes train.py's own uptrain.distill options."""
    cfg = rm.load_settings(["preset=quick", "distill=[0,0.5]", "distill_temperature=2"])
    assert rm.distill_args(cfg, 0.0) == []
    assert rm.distill_args(cfg, 0.5) == ["uptrain.distill=0.5", "uptrain.distill_temperature=2.0"]


def test_a_gguf_with_the_wrong_sha256_is_refused(tmp_path, monkeypatch):
    from experiments import smollm2
    gguf = tmp_path / smollm2.GGUF
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"not the model")
    with pytest.raises(smollm2.ModelFetchError, match="expected b179c952"):
        smollm2.gguf_file(tmp_path)
    monkeypatch.setattr(smollm2, "GGUF_SHA256", smollm2.sha256_of(gguf))
    assert smollm2.gguf_file(tmp_path) == gguf  # the checked file, not downloaded again
