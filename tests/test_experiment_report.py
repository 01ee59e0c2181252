"""The ablation's writers and measurements, without training: CSV round trip, the table
read back against the rows, valid PNGs, val loss against a per-token reference, and the
settings' one-line refusals."""
import re

import pytest
import torch

from evaluation.scoring import val_loss
from experiments.gqa_ablation import ExperimentError, load_settings
from experiments.report import CONVERSIONS, read_csv, write_report
from model import ModelConfig, Transformer

PNG = b"\x89PNG\r\n\x1a\n"


def fake_rows(alphas=(0.0, 0.05, 0.1), kv_heads=(4, 2, 1), scratch=(2, 1)):
    names = {4: "GQA-4", 2: "GQA-2", 1: "MQA"}
    rows = [dict(variant="MHA", n_kv_head=8, method="base", alpha=None, steps=200,
                 val_loss=3.25, kv_bytes_per_token=8192, decode_tok_s=400.0, train_s=50.0,
                 k_error=None, v_error=None)]
    for i, g in enumerate(kv_heads):
        for j, method in enumerate(("mean", "first", "random")):
            for k, alpha in enumerate(alphas):
                rows.append(dict(variant=names[g], n_kv_head=g, method=method, alpha=alpha,
                                 steps=round(alpha * 200), val_loss=4 + i + j / 10 + k / 100,
                                 kv_bytes_per_token=1024 * g, decode_tok_s=400.0 + 100 / g,
                                 train_s=1.5, k_error=0.5 + j / 10 if alpha == 0 else None,
                                 v_error=0.25 + j / 10 if alpha == 0 else None))
    for g in scratch:
        rows.append(dict(variant=names[g], n_kv_head=g, method="scratch", alpha=None, steps=200,
                         val_loss=3.5 + g / 10, kv_bytes_per_token=1024 * g,
                         decode_tok_s=400.0 + 100 / g, train_s=40.0, k_error=None,
                         v_error=None))
    return rows


def table_cells(md: str, first_header: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with first_header."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header}"))
    body = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        body.append([c.strip() for c in line.strip("|").split("|")])
    return body


def test_report_files_and_round_trip(tmp_path):
    rows = fake_rows()
    paths = write_report(rows, tmp_path, "test", ["a note"])
    assert read_csv(paths["csv"]) == rows
    for kind in ("fig4", "fig5"):
        data = paths[kind].read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporaries


def test_loss_table_puts_every_value_in_its_row_and_column(tmp_path):
    rows = fake_rows()
    md = write_report(rows, tmp_path)["md"].read_text()
    body = table_cells(md, "model | KV heads | method")
    alphas = [0.0, 0.05, 0.1]
    assert len(body) == 1 + 3 * 3 + 2
    for cells in body:
        name, g, method = cells[0], int(cells[1]), cells[2]
        if method in ("base", "scratch"):
            expected = next(r for r in rows if r["n_kv_head"] == g and r["method"] == method)
            assert cells[3:6] == ["—"] * 3 and float(cells[6]) == expected["val_loss"]
            continue
        for alpha, cell in zip(alphas, cells[3:6]):
            expected = next(r for r in rows if (r["n_kv_head"], r["method"], r["alpha"])
                            == (g, method, alpha))
            assert name == expected["variant"] and float(cell) == pytest.approx(
                expected["val_loss"], abs=5e-4)
        assert cells[6] == "—"


def test_cost_table_relates_every_variant_to_mha(tmp_path):
    md = write_report(fake_rows(), tmp_path)["md"].read_text()
    body = table_cells(md, "model | KV heads | KV bytes/token")
    assert [c[0] for c in body] == ["MHA", "GQA-4", "GQA-2", "MQA"]
    for name, g, kv_bytes, rel_kv, tok_s, rel_tok in body:
        g = int(g)
        assert int(kv_bytes.replace(",", "")) == (8192 if g == 8 else 1024 * g)
        assert float(rel_kv.rstrip("×")) == pytest.approx(int(kv_bytes.replace(",", "")) / 8192,
                                                          rel=1e-3)
        assert float(rel_tok.rstrip("×")) == pytest.approx(float(tok_s) / 400, abs=0.01)


def test_report_with_one_alpha_and_no_scratch(tmp_path):
    paths = write_report(fake_rows(alphas=(0.0, 0.25), kv_heads=(2,), scratch=()), tmp_path)
    assert len(table_cells(paths["md"].read_text(), "model | KV heads | method")) == 1 + 3
    assert paths["fig4"].read_bytes().startswith(PNG)


def test_val_loss_equals_per_token_negative_log_likelihood():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layer=1, n_head=8, d_model=32,
                                    max_seq_len=16))
    tokens = torch.randint(0, 50, (5 * 16 + 1,))  # five non-overlapping windows of 16
    windows = tokens.unfold(0, 17, 16)  # (5, 17)
    nll = []
    with torch.no_grad():
        for w in windows:
            logp = model(w[None, :-1])[0].log_softmax(-1)  # (T, V)
            nll += [-logp[t, w[t + 1]].item() for t in range(16)]
    assert val_loss(model, tokens.numpy(), seq_len=16, n_windows=5, batch_size=2) == \
        pytest.approx(sum(nll) / len(nll), rel=1e-5)


@pytest.mark.parametrize("argv, message", [
    (["preset=huge"], "unknown preset 'huge'"),
    (["steps=5"], "Key 'steps' not in 'Settings'"),
    (["base_steps=many"], "could not be converted to Integer"),
    (["kv_heads=[3]"], "does not divide the source's 8 KV heads"),
    (["methods=[median]"], "unknown 'median'"),
    (["methods=[similar+median]"], "unknown 'similar+median'"),
    (["calib_windows=0"], "calib_windows must be a positive integer"),
    (["alphas=[0]"], "alphas must lie in (0, 1]"),
    (["base_steps=10", "alphas=[0.01]"], "is no step"),
])
def test_bad_settings_fail_with_one_line(argv, message):
    with pytest.raises(ExperimentError, match=re.escape(message)) as e:
        load_settings(argv)
    assert "\n" not in str(e.value)


def test_presets_load():
    for name in ("quick", "default"):
        cfg = load_settings([f"preset={name}"])
        assert cfg.preset == name and cfg.n_head == 8
    default = load_settings(["preset=default"])
    assert set(default.kv_heads) == {4, 2, 1} and set(default.methods) == set(CONVERSIONS)
    assert default.mha_control and default.calib_windows > 0
    assert min(default.alphas) * default.base_steps >= 50  # alpha = 0.05 must mean real steps


def with_control_and_best(rows, alphas=(0.0, 0.05, 0.1)):
    """fake_rows plus the MHA control and a similar+procrustes conversion with per-layer
    K/V errors."""
    rows = [dict(r) for r in rows]
    for k, alpha in enumerate(alphas[1:]):
        rows.append(dict(variant="MHA", n_kv_head=8, method="continued", alpha=alpha,
                         steps=round(alpha * 200), val_loss=3.2 - k / 10,
                         kv_bytes_per_token=8192, decode_tok_s=400.0, train_s=2.0,
                         k_error=None, v_error=None))
    for r in [r for r in rows if r["method"] == "mean"]:
        best = dict(r, method="similar+procrustes", val_loss=r["val_loss"] - 0.3)
        if r["alpha"] == 0:
            best["kv_layers"] = [{"layer": i, "k": 0.1 * i, "v": round(0.2 + i / 100, 4)} for i in range(2)]
        rows.append(best)
    return rows


def test_gap_table_measures_against_mha_trained_as_long(tmp_path):
    rows = with_control_and_best(fake_rows())
    md = write_report(rows, tmp_path)["md"].read_text()
    control = table_cells(md, "model | KV heads | method")[1]
    assert control[:3] == ["MHA", "8", "continued (control)"]
    assert [float(c) for c in control[3:6]] == [3.25, 3.2, 3.1]  # alpha 0 is the base
    body = table_cells(md, "model | method | α = 0")
    for cells in body:
        g = {"GQA-4": 4, "GQA-2": 2, "MQA": 1}[cells[0]]
        for alpha, cell in zip((0.0, 0.05, 0.1), cells[2:]):
            loss = lambda m: next(r["val_loss"] for r in rows if (r["n_kv_head"], r["method"],
                                                                  r["alpha"]) == (g, m, alpha))
            ref = 3.25 if alpha == 0 else loss_of_control(rows, alpha)
            expected = (loss("mean") - loss(cells[1])) / (loss("mean") - ref)
            assert cell == f"{100 * expected:.0f}%", (cells, alpha)
    assert {c[1] for c in body} == {"first", "random", "similar+procrustes"}


def loss_of_control(rows, alpha):
    return next(r["val_loss"] for r in rows if r["method"] == "continued" and r["alpha"] == alpha)


def test_kv_error_table_and_csv_hold_every_layer(tmp_path):
    rows = with_control_and_best(fake_rows())
    paths = write_report(rows, tmp_path)
    body = table_cells(paths["md"].read_text(), "model | method | val loss α = 0")
    assert [c[:2] for c in body] == [["GQA-4", "similar+procrustes"], ["GQA-2", "similar+procrustes"],
                                     ["MQA", "similar+procrustes"]]
    assert body[0][3:] == ["0.000", "0.200", "0.100", "0.210"]
    lines = paths["kv_csv"].read_text().splitlines()
    assert lines[0] == "variant,n_kv_head,method,layer,k_error,v_error" and len(lines) == 1 + 3 * 2
    assert lines[2] == "GQA-4,4,similar+procrustes,1,0.1,0.21"
    for png in ("fig4", "fig5"):
        assert paths[png].read_bytes().startswith(PNG)
