"""The ablation end to end at its `quick` setting: real train.py runs, real conversions,
the CSV, the markdown table and both PNGs; a second invocation reuses every run."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from convert.command import data_config, token_windows
from experiments.report import read_csv
from store.checkpoint import load_checkpoint, read_meta

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def run_quick(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "experiments.gqa_ablation", "preset=quick",
                           f"out={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    proc = run_quick(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    settings = OmegaConf.load(REPO / "experiments" / "configs" / "quick.yaml")
    return out, settings, read_csv(out / "results.csv")


def test_every_variant_method_and_alpha_has_a_row(quick):
    out, s, rows = quick
    expected = ({("base", None)} | {(m, a) for m in s.methods for a in [0.0, *s.alphas]}
                | {("scratch", None)})
    for g in {*s.kv_heads, *s.scratch_kv_heads}:
        got = {(r["method"], r["alpha"]) for r in rows if r["n_kv_head"] == g}
        want = {e for e in expected if e[0] != "base"}
        if g not in s.scratch_kv_heads:
            want = {e for e in want if e[0] != "scratch"}
        if g not in s.kv_heads:
            want = {("scratch", None)}
        assert got == want, g
    control = {(r["method"], r["alpha"]) for r in rows if r["n_kv_head"] == s.n_head}
    assert control == {("base", None)} | {("continued", a) for a in s.alphas}
    assert len(rows) == (1 + len(s.kv_heads) * len(s.methods) * (1 + len(s.alphas))
                         + len(s.scratch_kv_heads) + len(s.alphas))


def mean_pooling_kv_errors(converted: Path, meta: dict) -> list[tuple[float, float]]:
    """Per layer, the (K, V) error of contiguous mean pooling, from the activations: run the
    source over the val windows the conversion measured on, project each attention input
    with the source's K/V heads and with the pooled heads its query heads now read;
    sum |source - pooled|^2 / sum |source|^2 over tokens and heads, in float64."""
    src = Path(meta["converted_from"]["path"])
    source, pooled = load_checkpoint(src).model.eval(), load_checkpoint(converted).model
    measured = meta["kv_error"]
    windows = token_windows(data_config(src, {}), "val", measured["seq_len"],
                            measured["windows"], source.config.vocab_size)
    inputs = {}  # layer -> its attention's input over every token
    hooks = [b.attn.register_forward_pre_hook(
        lambda m, args, i=i: inputs.setdefault(i, []).append(args[0].double().flatten(0, 1)))
        for i, b in enumerate(source.blocks)]
    with torch.no_grad():
        source(windows)
    for hook in hooks:
        hook.remove()
    S, G, hd = source.config.n_kv_head, pooled.config.n_kv_head, source.config.head_dim

    def project(linear, x, heads):  # (tokens, heads, hd)
        bias = None if linear.bias is None else linear.bias.detach().double()
        return F.linear(x, linear.weight.detach().double(), bias).unflatten(-1, (heads, hd))

    errors = []
    for i, (a, b) in enumerate(zip(source.blocks, pooled.blocks)):
        x = torch.cat(inputs[i])
        err = []
        for proj in ("k_proj", "v_proj"):
            ours = project(getattr(a.attn, proj), x, S)
            read = project(getattr(b.attn, proj), x, G).repeat_interleave(S // G, dim=1)
            err.append(float((ours - read).pow(2).sum() / ours.pow(2).sum()))
        errors.append(tuple(err))
    return errors


def test_rows_agree_with_the_runs_they_came_from(quick):
    out, s, rows = quick
    mha = next(r for r in rows if r["method"] == "base")
    for r in rows:
        # KV bytes scale exactly with the KV heads; uptraining ran round(alpha x base) steps
        assert r["kv_bytes_per_token"] * mha["n_kv_head"] == mha["kv_bytes_per_token"] * r["n_kv_head"]
        if r["alpha"]:
            assert r["steps"] == round(r["alpha"] * s.base_steps)
    for done in (out / "runs").glob("gqa*-a*/checkpoints/latest"):
        meta = read_meta(done)
        assert meta["step"] == round(meta["uptrain_alpha"] * s.base_steps)
        assert meta["converted_from"]["method"] in s.methods
    recomputed = 0
    for converted in (out / "converted").iterdir():  # options and K/V errors travel in meta
        meta, name = read_meta(converted), converted.name.split("-", 1)[1]
        options = meta["converted_from"]
        assert (options["group"] == "similar") == ("similar" in name)
        assert (options["align"] == "procrustes") == ("procrustes" in name)
        layers = meta["kv_error"]["layers"]
        assert len(layers) == 2 and all(0 < e["k"] and 0 < e["v"] for e in layers)  # fewer heads: lossy
        row = next(r for r in rows if r["method"] == name and r["alpha"] == 0
                   and converted.name.startswith(f"gqa{r['n_kv_head']}-"))
        assert row["k_error"] == pytest.approx(sum(e["k"] for e in layers) / 2, abs=1e-4)
        assert row["v_error"] == pytest.approx(sum(e["v"] for e in layers) / 2, abs=1e-4)
        if name == "mean":  # the recorded errors, recomputed from the K/V heads themselves
            recomputed += 1
            for got, want in zip(layers, mean_pooling_kv_errors(converted, meta), strict=True):
                assert (got["k"], got["v"]) == pytest.approx(want, abs=2e-6), converted.name
    assert recomputed == len(s.kv_heads)
    for done in (out / "runs").glob("mha-continued-*/checkpoints/latest"):  # the control
        meta = read_meta(done)
        assert meta["step"] == round(meta["uptrain_alpha"] * s.base_steps)
        assert load_checkpoint(done).config.n_kv_head == s.n_head


def test_uptraining_lowers_the_converted_models_val_loss(quick):
    _, s, rows = quick
    for g in s.kv_heads:
        for m in s.methods:
            loss = {r["alpha"]: r["val_loss"] for r in rows if r["n_kv_head"] == g and r["method"] == m}
            assert loss[max(s.alphas)] < loss[0.0], (g, m, loss)


def test_report_files_and_a_rerun_reuses_every_run(quick):
    out, s, rows = quick
    md = (out / "results.md").read_text()
    assert "| model | KV heads | method |" in md and "KV bytes/token" in md
    for png in ("fig4_conversion_methods.png", "fig5_alpha.png"):
        assert (out / png).read_bytes().startswith(PNG)
    def files() -> dict[str, tuple]:  # every run's and conversion's file: mtime and bytes
        return {str(p.relative_to(out)): (p.stat().st_mtime_ns,
                                          hashlib.sha256(p.read_bytes()).hexdigest())
                for d in ("runs", "converted") for p in sorted((out / d).rglob("*"))
                if p.is_file()}
    before = files()
    assert any(k.endswith("model.safetensors") for k in before)
    again = run_quick(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert files() == before  # nothing retrained or reconverted: only loads and measurements
    rerun = read_csv(out / "results.csv")
    assert [r["val_loss"] for r in rerun] == [r["val_loss"] for r in rows]
