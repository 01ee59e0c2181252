"""experiments/frontier.py: its settings, corpus and byte counts (the measurements are
evaluation's, tested there; the experiment itself runs on the real model)."""
from __future__ import annotations

from experiments import frontier as fr
from model.config import ModelConfig
from model.kv_cache import QuantizedKVCache, kv_bytes_per_token


def test_presets_load_and_bad_settings_are_refused(capsys):
    for preset in ("smoke", "quick", "full"):
        cfg = fr.load_settings([f"preset={preset}"])
        assert 15360 in cfg.mla_budgets and cfg.windows >= 32 and cfg.seq_len == 512
    for bad, message in ((["mla_budgets=[100]"], "multiples of 8"),
                         (["decode_prompt=600"], "decode_prompt=600"),
                         (["heads=[bogus]"], "bogus"), (["distill=2"], "distill=2.0")):
        assert fr.main(["preset=smoke", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err


def test_docstring_corpus_holds_every_long_docstring_of_the_prose_files(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    long = "A sentence about what the code does, long enough to count. " * 5
    for i in range(40):
        (root / f"m{i}.py").write_text(
            f'"""{long}module {i}"""\n\nclass C:\n    """{long}class {i}"""\n\n'
            f'    def f(self):\n        """short"""\n')
    folder = fr.docstring_corpus(tmp_path / "cache", root)
    files = [p for p in folder.iterdir() if p.name != "done"]
    prose_bucket = {p.name for p in root.iterdir() if fr.rm.bucket(p, root) == 1}
    assert {f.name.removesuffix(".txt") for f in files} == prose_bucket
    text = files[0].read_text()
    assert "module" in text and "class" in text and "short" not in text


def test_int8_cache_bytes_count_values_scales_and_the_window():
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                      max_seq_len=256)
    assert fr.cache_bytes(cfg, "float", 256) == kv_bytes_per_token(cfg)
    int8 = fr.cache_bytes(cfg, "int8", 256)
    whole = QuantizedKVCache.for_model(cfg, 1, 256, device="meta").nbytes
    assert int8 == whole / 256
    assert kv_bytes_per_token(cfg) / 4 < int8 < kv_bytes_per_token(cfg) / 2  # scales cost


def test_int8_latent_cache_bytes_are_int8_values_and_a_scale_per_32():
    cfg = ModelConfig(vocab_size=50, n_layer=3, n_head=4, d_model=32, max_seq_len=256,
                      kv_rank=58, rope_dim=6)  # width 64: two groups of 32
    assert fr.cache_bytes(cfg, "int8", 256) == 3 * (64 + 2 * 4)


def test_uptraining_picks_the_best_per_budget_below_the_original():
    """Per byte budget the lowest prose NLL first; the original's budget (where MLA is exact)
    and budgets outside uptrain_bytes are left out; int8 rows are never structures."""
    row = lambda kv_bytes, nll: {"kv_bytes": kv_bytes, "prose": {"nll": nll}}  # noqa: E731
    P = fr.Point
    points = {P("original"): row(46080, 2.7), P("MLA 46,080"): row(46080, 2.7),
              P("MLA 15,360"): row(15360, 4.2), P("MQA linear"): row(15360, 4.9),
              P("MQA mean"): row(15360, 9.6), P("MLA 7,680"): row(7680, 5.6),
              P("original", "int8"): row(12960, 2.7)}
    paths = {p.structure: "ckpt" for p in points}
    cfg = fr.load_settings(["preset=smoke", "uptrain_best=2"])
    chosen = [p.structure for _, p in fr.uptrain_candidates(points, paths, cfg)]
    assert chosen == ["MLA 15,360", "MQA linear", "MLA 7,680"]
    cfg = fr.load_settings(["preset=smoke", "uptrain_best=1", "uptrain_bytes=[15360]"])
    assert [p.structure for _, p in fr.uptrain_candidates(points, paths, cfg)] == ["MLA 15,360"]


def test_without_perplexity_uptraining_is_refused_and_the_report_leaves_it_blank(tmp_path,
                                                                                  capsys):
    """windows=0 measures the long-context columns alone: uptraining (which picks formats by
    perplexity) is refused, and the report's rows, table and plot carry what was measured."""
    assert fr.main(["preset=quick", "windows=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "budgets=[]" in err and "\n" not in err
    cfg = fr.load_settings(["preset=quick", "windows=0", "tasks=[]", "budgets=[]"])
    assert cfg.windows == 0
    P = fr.Point
    rows = [fr.flat(P("MQA linear"), {"kv_bytes": 15360.0, "passkey": {"accuracy": 0.25},
                                      "speed": {"tok_s": 61.5}}),
            fr.flat(P("MLA 15,360"), {"kv_bytes": 15360.0, "passkey": {"accuracy": 1.0}})]
    assert rows[0]["prose_ppl"] is None and rows[0]["code_nll_se"] is None
    assert (rows[0]["passkey"], rows[0]["tok_s"], rows[1]["tok_s"]) == (0.25, 61.5, None)
    table = fr.markdown(rows, ["notes"]).splitlines()
    assert table[-2] == "| MQA linear | float | 0 | 15,360 | — | — | — | 0.25 | 61.5 |"
    assert table[-1] == "| MLA 15,360 | float | 0 | 15,360 | — | — | — | 1.00 | — |"
    fr.plot(rows, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 0
    with_ppl = fr.flat(P("original"), {"kv_bytes": 46080.0, "prose": {"nll": 0.0, "se": 0.1},
                                       "code": {"nll": 1.0, "se": None}})
    assert (with_ppl["prose_ppl"], with_ppl["code_ppl"]) == (1.0, round(2.718281828, 3))
