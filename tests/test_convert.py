"""K/V head pooling (Ainslie et al. 2023 §2.1) against independent per-head loops, the
invariants that pin it down, and the convert command's refusals."""
import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import ModelConfig, Transformer
from store.checkpoint import load_checkpoint, read_meta, save_checkpoint
from convert.heads import ConvertError, Conversion, convert_model, pool_kv_heads
from convert.command import convert_checkpoint, main

N_HEAD, HD = 8, 8


def tiny_model(n_kv_head=N_HEAD, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=61, n_layer=2, n_head=N_HEAD, n_kv_head=n_kv_head,
                      d_model=N_HEAD * HD, max_seq_len=32, init_std=0.1)
    return Transformer(cfg).eval()


def kv_weights(model):
    return [(b.attn.k_proj.weight, b.attn.v_proj.weight) for b in model.blocks]


def head(weight, h):
    return weight[h * HD:(h + 1) * HD]


def logits(model, seed=1):
    tokens = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("G", [4, 2, 1])
def test_mean_pooling_is_the_mean_of_each_contiguous_group(G):
    src = tiny_model()
    dst = convert_model(src, Conversion(G, "mean"))
    group = N_HEAD // G
    assert dst.config.n_kv_head == G and dst.blocks[0].attn.n_kv_head == G
    for (sk, sv), (dk, dv) in zip(kv_weights(src), kv_weights(dst)):
        for source, pooled in ((sk, dk), (sv, dv)):
            assert pooled.shape == (G * HD, N_HEAD * HD)
            for g in range(G):
                members = [head(source, h) for h in range(N_HEAD) if h // group == g]
                expected = sum(members) / len(members)
                torch.testing.assert_close(head(pooled, g), expected, atol=1e-6, rtol=1e-6)


def test_first_keeps_the_first_head_of_each_group():
    src = tiny_model()
    dst = convert_model(src, Conversion(2, "first"))
    for (sk, sv), (dk, dv) in zip(kv_weights(src), kv_weights(dst)):
        for g in range(2):
            assert torch.equal(head(dk, g), head(sk, 4 * g))
            assert torch.equal(head(dv, g), head(sv, 4 * g))


def test_random_is_a_fresh_seeded_init_at_init_std():
    src = tiny_model()
    a, b, c = (convert_model(src, Conversion(2, "random", seed=s)) for s in (0, 0, 1))
    ka, kb, kc = (m.blocks[0].attn.k_proj.weight for m in (a, b, c))
    assert torch.equal(ka, kb) and not torch.equal(ka, kc)
    k_all = torch.cat([w for pair in kv_weights(a) for w in pair])
    assert abs(k_all.std().item() - src.config.init_std) < 0.01
    assert abs(k_all.mean().item()) < 0.01
    src_k = src.blocks[0].attn.k_proj.weight
    for g in range(2):  # no relation to any source head
        assert not any(torch.allclose(head(ka, g), head(src_k, h)) for h in range(N_HEAD))


def test_pool_kv_heads_rejects_unknown_method():
    with pytest.raises(ConvertError, match="unknown method 'median'"):
        pool_kv_heads(torch.zeros(64, 64), 8, 2, HD, "median")


@pytest.mark.parametrize("method", ["mean", "first", "random"])
def test_everything_but_k_and_v_is_shared_not_copied_and_the_source_is_untouched(method):
    src = tiny_model()
    before = {k: v.clone() for k, v in src.state_dict().items()}
    dst = convert_model(src, Conversion(2, method))
    src_state = src.state_dict()
    for name, value in dst.state_dict().items():
        if ".k_proj." not in name and ".v_proj." not in name:  # the same storage: no copy
            assert value.data_ptr() == src_state[name].data_ptr(), name
    for name, value in src.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert dst.lm_head.weight is dst.embed.weight  # still tied
    assert not any(t.is_meta for t in [*dst.parameters(), *dst.buffers()])


@pytest.mark.parametrize("method", ["mean", "first"])
def test_same_head_count_is_the_identity(method):
    src = tiny_model()
    torch.testing.assert_close(logits(convert_model(src, Conversion(N_HEAD, method))), logits(src),
                               atol=0, rtol=0)


@pytest.mark.parametrize("G", [4, 2, 1])
@pytest.mark.parametrize("method", ["mean", "first"])
def test_identical_heads_within_groups_keep_the_logits(G, method):
    src = tiny_model()
    group = N_HEAD // G
    with torch.no_grad():  # every head of a group gets its group's first head's K/V rows
        for k, v in kv_weights(src):
            for w in (k, v):
                heads = w.view(G, group, HD, -1)
                heads.copy_(heads[:, :1].expand_as(heads).clone())
    torch.testing.assert_close(logits(convert_model(src, Conversion(G, method))), logits(src),
                               atol=1e-5, rtol=1e-5)


def test_pooling_twice_equals_pooling_once():
    src = tiny_model()
    direct = convert_model(src, Conversion(2, "mean"))
    twice = convert_model(convert_model(src, Conversion(4, "mean")), Conversion(2, "mean"))
    for (a, b), (c, d) in zip(kv_weights(direct), kv_weights(twice)):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b, d, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(direct), logits(twice), atol=1e-5, rtol=1e-5)


def test_gqa_source_converts_to_mqa():
    src = tiny_model(n_kv_head=4)
    dst = convert_model(src, Conversion(1, "mean"))
    k = src.blocks[1].attn.k_proj.weight
    expected = sum(head(k, h) for h in range(4)) / 4
    torch.testing.assert_close(dst.blocks[1].attn.k_proj.weight, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("G, method, message", [
    (3, "mean", "does not divide the source's 8 KV heads: pick one of [1, 2, 4, 8]"),
    (16, "mean", "exceeds the source's 8 KV heads"),
    (0, "mean", "n_kv_head must be a positive integer"),
    (-2, "mean", "n_kv_head must be a positive integer"),
    (2, "avg", "unknown method 'avg'"),
])
def test_bad_targets_are_refused_with_one_line(G, method, message):
    with pytest.raises(ConvertError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        convert_model(tiny_model(), Conversion(G, method))
    assert "\n" not in str(e.value)


def test_upsampling_a_gqa_source_is_refused():
    with pytest.raises(ConvertError, match="exceeds the source's 2 KV heads"):
        convert_model(tiny_model(n_kv_head=2), Conversion(4))


# ---- checkpoints and the command -------------------------------------------------------

@pytest.fixture
def source_ckpt(tmp_path):
    path = save_checkpoint(tmp_path / "mha", tiny_model(),
                           meta={"step": 120, "max_steps": 120},
                           files={"tokenizer.model": write(tmp_path / "tok", b"\x00tok\xff")})
    (path / "train_config.yaml").write_text("max_steps: 120\nlr: 0.001\n")
    return path


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_convert_checkpoint_writes_model_tokenizer_config_and_provenance(source_ckpt, tmp_path):
    before = tree_digest(source_ckpt)
    out = convert_checkpoint(source_ckpt, tmp_path / "gqa2", Conversion(2, "mean", seed=3))
    assert tree_digest(source_ckpt) == before
    ckpt = load_checkpoint(out)
    assert ckpt.config.n_kv_head == 2 and ckpt.config.n_head == N_HEAD
    expected = convert_model(load_checkpoint(source_ckpt).model, Conversion(2, "mean"))
    torch.testing.assert_close(logits(ckpt.model), logits(expected), atol=0, rtol=0)
    assert (out / "tokenizer.model").read_bytes() == b"\x00tok\xff"
    assert (out / "train_config.yaml").read_text() == "max_steps: 120\nlr: 0.001\n"
    meta = json.loads((out / "meta.json").read_text())
    sha = hashlib.sha256((source_ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert meta["converted_from"] == {"path": str(source_ckpt.resolve()), "weights_sha256": sha,
                                      "method": "mean", "group": "contiguous", "align": "none",
                                      "calib_windows": 0, "calib_seq_len": 0,
                                      "source_n_kv_head": N_HEAD, "seed": 3}
    assert "kv_error" not in meta  # no data config: nothing to measure on
    assert meta["source_step"] == 120 and meta["max_steps"] == 120
    # a converted checkpoint converts again and keeps the original step count
    again = convert_checkpoint(out, tmp_path / "mqa", Conversion(1, "first"))
    assert json.loads((again / "meta.json").read_text())["source_step"] == 120


def run_main(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args, message", [
    (["n_kv_head=3"], "does not divide the source's 8 KV heads"),
    (["n_kv_head=16"], "exceeds the source's 8 KV heads"),
    (["n_kv_head=two"], "n_kv_head=two: Value 'two'"),
    (["n_kv_head=2", "method=median"],
     "method=median: Invalid value 'median', expected one of [mean, first, random]"),
    (["n_kv_head=2", "heads=2"], "unknown key heads: the keys here are ckpt, n_kv_head"),
])
def test_cli_refuses_bad_arguments(source_ckpt, tmp_path, capsys, args, message):
    before = tree_digest(source_ckpt)
    code, err = run_main([f"ckpt={source_ckpt}", f"out={tmp_path / 'new'}", *args], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "new").exists() and tree_digest(source_ckpt) == before


@pytest.mark.parametrize("out, overwrite, message", [
    ("{src}", "true", "is the source checkpoint itself"),
    ("{src}/sub", "true", "is inside the source checkpoint"),
    ("{tmp}", "true", "contains the source checkpoint"),
    ("{tmp}/exists", "false", "already exists: choose a new path or pass overwrite=true"),
])
def test_cli_never_writes_into_the_source_or_over_an_existing_dir(source_ckpt, tmp_path, capsys,
                                                                 out, overwrite, message):
    (tmp_path / "exists").mkdir()
    before = tree_digest(tmp_path)
    out = out.format(src=source_ckpt, tmp=tmp_path)
    code, err = run_main([f"ckpt={source_ckpt}", "n_kv_head=2", f"out={out}",
                          f"overwrite={overwrite}"], capsys)
    assert code == 2 and message in err and "\n" not in err
    assert tree_digest(tmp_path) == before


def test_cli_refuses_a_source_that_is_not_a_checkpoint(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    for src, message in ((tmp_path / "missing", "not found"),
                         (tmp_path / "notes", "not a gqalab checkpoint")):
        code, err = run_main([f"ckpt={src}", "n_kv_head=2", f"out={tmp_path / 'o'}"], capsys)
        assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_command_line_module_converts(source_ckpt, tmp_path):
    out = tmp_path / "mqa"
    run = subprocess.run([sys.executable, "-m", "convert", f"ckpt={source_ckpt}",
                          "n_kv_head=1", "method=mean", f"out={out}"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    assert "MQA" in run.stdout and load_checkpoint(out).config.n_kv_head == 1


# ---- grouping and alignment (convert/align.py) --------------------------------------------

import math  # noqa: E402

from convert.align import LayerPlan, similar_groups, spread  # noqa: E402
from store.checkpoint import model_state  # noqa: E402
from convert.heads import aligned_attention, kv_errors, plan_conversion, pooled_state  # noqa: E402
from helpers import planted_mha  # noqa: E402

CALIB = torch.randint(0, 61, (8, 32), generator=torch.Generator().manual_seed(2))


def random_plan(S, gen, rotate=True, permute=True):
    """A random permutation, random orthogonal V maps and random 2x2 rotations in each RoPE
    plane (dims i, i + hd/2) for K, built here independently of convert/align.py."""
    order = torch.randperm(S, generator=gen) if permute else torch.arange(S)
    if not rotate:
        return LayerPlan(order)
    v = torch.linalg.qr(torch.randn(S, HD, HD, generator=gen, dtype=torch.float64))[0].float()
    v[:, 0] *= torch.randn(S, 1, generator=gen).sign()  # reflections too: V has no RoPE
    angle = torch.rand(S, HD // 2, generator=gen) * 2 * math.pi
    i = torch.arange(HD // 2)
    k = torch.zeros(S, HD, HD)
    k[:, i, i], k[:, i + HD // 2, i + HD // 2] = angle.cos(), angle.cos()
    k[:, i, i + HD // 2], k[:, i + HD // 2, i] = -angle.sin(), angle.sin()
    return LayerPlan(order, k, v)


def add_bias(model, gen):
    """Give every Q/K/V/O projection a random bias (GPT-2, NeoX and Llama with
    attention_bias have them; alignment leaves O's alone: it is added after the heads)."""
    for block in model.blocks:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            old = getattr(block.attn, name)
            new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
            with torch.no_grad():
                new.weight.copy_(old.weight)
                new.bias.copy_(torch.randn(old.out_features, generator=gen) * 0.3)
            setattr(block.attn, name, new)
    return model


def rewritten(model, plans):
    """A copy of model holding its attention tensors rewritten by plans (no pooling)."""
    state = model_state(model)
    for layer, plan in enumerate(plans):
        state.update(aligned_attention(state, layer, plan, model.config.n_kv_head))
    new = copy.deepcopy(model)
    new.load_state_dict(state, strict=False)
    return new


@pytest.mark.parametrize("n_kv_head", [8, 4])  # GQA source: query heads move in groups
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rotate, permute", [(False, True), (True, False), (True, True)])
def test_permuting_and_rotating_heads_keeps_the_logits(n_kv_head, bias, rotate, permute):
    gen = torch.Generator().manual_seed(7)
    src = tiny_model(n_kv_head)
    if bias:
        add_bias(src, gen)
    plans = [random_plan(n_kv_head, gen, rotate, permute) for _ in src.blocks]
    new = rewritten(src, plans)
    torch.testing.assert_close(logits(new), logits(src), atol=1e-5, rtol=1e-5)
    moved = new.blocks[0].attn.k_proj.weight.view(n_kv_head, HD, -1)
    assert not torch.allclose(moved, src.blocks[0].attn.k_proj.weight.view(n_kv_head, HD, -1))


def test_fitted_grouping_and_rotations_keep_the_logits_before_pooling():
    src = add_bias(tiny_model(), torch.Generator().manual_seed(3))
    plans = plan_conversion(src, Conversion(2, group="similar", align="procrustes"), CALIB)
    for plan in plans:  # proper rotations: orthogonal with det +1 for K, orthogonal for V
        eye = torch.eye(HD).expand(N_HEAD, HD, HD)
        torch.testing.assert_close(plan.k_rot @ plan.k_rot.transpose(1, 2), eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(plan.v_rot @ plan.v_rot.transpose(1, 2), eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.linalg.det(plan.k_rot), torch.ones(N_HEAD))
    torch.testing.assert_close(logits(rewritten(src, plans)), logits(src), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("G", [4, 2, 1])
def test_contiguous_unaligned_is_todays_mean_bit_for_bit(G):
    src = tiny_model()
    explicit = convert_model(src, Conversion(G, "mean", group="contiguous", align="none"),
                             calib=CALIB)
    plain = kv_weights(convert_model(src, Conversion(G, "mean")))
    for (k, v), (ek, ev) in zip(plain, kv_weights(explicit)):
        assert torch.equal(k, ek) and torch.equal(v, ev)
    k = src.blocks[0].attn.k_proj.weight  # and today's formula: the fp32 mean of each group
    expected = torch.stack([head(k, h) for h in range(N_HEAD) if h // (N_HEAD // G) == 0]).mean(0)
    assert torch.equal(head(explicit.blocks[0].attn.k_proj.weight, 0), expected)


def planted(G, bias=False):
    """(an MHA model whose 8 KV heads are rotated copies, in shuffled order, of the G KV
    heads of a GQA model; that GQA model). Rotated copies with Q and O counter-rotated
    compute the GQA model's function exactly (asserted)."""
    gen = torch.Generator().manual_seed(11)
    base = tiny_model(G, seed=4)
    if bias:
        add_bias(base, gen)
    mha = add_bias(tiny_model(N_HEAD), gen) if bias else tiny_model(N_HEAD)
    plans = [random_plan(N_HEAD, gen) for _ in base.blocks]
    return planted_mha(base, mha, plans, logits), base


@pytest.mark.parametrize("G", [4, 2, 1])
def test_planted_rotated_copies_convert_without_loss_only_when_grouped_and_aligned(G):
    mha, base = planted(G)
    best = convert_model(mha, Conversion(G, "mean", group="similar", align="procrustes"), CALIB)
    torch.testing.assert_close(logits(best), logits(base), atol=1e-5, rtol=1e-5)
    errors = kv_errors(mha, model_state(best),
                       plan_conversion(mha, Conversion(G, group="similar", align="procrustes"), CALIB),
                       CALIB)
    assert all(e["k"] < 1e-6 and e["v"] < 1e-6 for e in errors)
    plain = convert_model(mha, Conversion(G, "mean"))
    assert (logits(plain) - logits(base)).abs().mean() > 0.1  # a clear loss
    assert all(e["k"] > 0.05 and e["v"] > 0.05 for e in kv_errors(mha, model_state(plain), None, CALIB))


def test_planted_copies_with_kv_biases_convert_without_loss():
    G = 2
    mha, base = planted(G, bias=True)
    fit = Conversion(G, group="similar", align="procrustes")
    cfg, state = pooled_state(mha, fit, plan_conversion(mha, fit, CALIB))
    assert cfg.n_kv_head == G and state["blocks.0.attn.k_proj.bias"].shape == (G * HD,)
    gqa = copy.deepcopy(base)
    gqa.load_state_dict(state, strict=False)
    torch.testing.assert_close(logits(gqa), logits(base), atol=1e-5, rtol=1e-5)


def test_kv_error_matches_activations_computed_directly():
    src = add_bias(tiny_model(), torch.Generator().manual_seed(5))
    _, dst = pooled_state(src, Conversion(2), None)
    inputs = []  # the attention input of layer 1, collected independently of the gram path
    hook = src.blocks[1].attn.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        src(CALIB)
    hook.remove()
    x = torch.cat(inputs).flatten(0, 1)  # (N, d)
    err = kv_errors(src, dst, None, CALIB)[1]
    assert torch.equal(dst["blocks.1.attn.k_proj.bias"],
                       src.blocks[1].attn.k_proj.bias.detach().view(2, 4, HD).mean(1).flatten())
    for proj in ("k_proj", "v_proj"):
        a = getattr(src.blocks[1].attn, proj)(x).view(-1, N_HEAD, HD)  # (N, S, hd)
        w = getattr(src.blocks[1].attn, proj).weight.view(2, 4, HD, -1).mean(1).flatten(0, 1)
        b = getattr(src.blocks[1].attn, proj).bias.view(2, 4, HD).mean(1).flatten()
        pooled = (x @ w.T + b).view(-1, 2, 1, HD).expand(-1, 2, 4, HD).reshape(-1, N_HEAD, HD)
        expected = ((a - pooled) ** 2).sum() / (a ** 2).sum()
        assert err[proj[0]] == pytest.approx(expected.item(), rel=1e-3)


def test_similar_groups_finds_planted_groups_and_never_loses_to_contiguous():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2])  # 3 groups of 3, scattered
    points = torch.randn(3, 4, generator=gen)[labels] + 1e-3 * torch.randn(9, 4, generator=gen)
    d = torch.cdist(points, points) ** 2
    found = similar_groups(d, 3)
    assert sorted(map(sorted, found)) == sorted(
        sorted(torch.nonzero(labels == c).flatten().tolist()) for c in range(3))
    for seed in range(5):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(seed))
        d = torch.cdist(x, x) ** 2
        for G in (4, 2):
            groups = similar_groups(d, G)
            assert sorted(h for g in groups for h in g) == list(range(8))
            assert all(len(g) == 8 // G for g in groups)
            contiguous = [list(range(g * 8 // G, (g + 1) * 8 // G)) for g in range(G)]
            assert spread(d, groups) <= spread(d, contiguous) + 1e-9


def test_bf16_source_stays_bf16_and_converts_like_fp32():
    src = tiny_model()
    fit = Conversion(2, "mean", group="similar", align="procrustes")
    fp32 = convert_model(src, fit, CALIB)
    bf16 = convert_model(copy.deepcopy(src).to(torch.bfloat16), fit, CALIB)
    assert {t.dtype for t in bf16.state_dict().values()} == {torch.bfloat16}
    assert (logits(bf16).float() - logits(fp32)).abs().max() < 0.1


@pytest.mark.parametrize("kwargs, message", [
    ({"group": "similar"}, "fit on calibration data"),
    ({"align": "procrustes"}, "fit on calibration data"),
    ({"group": "kmeans"}, "unknown group 'kmeans'"),
    ({"align": "svd"}, "unknown align 'svd'"),
    ({"method": "random", "group": "similar", "calib": CALIB}, "method=random keeps nothing"),
])
def test_bad_grouping_options_are_refused(kwargs, message):
    calib = kwargs.pop("calib", None)
    with pytest.raises(ConvertError, match=message):
        convert_model(tiny_model(), Conversion(2, **kwargs), calib)


def test_plain_conversion_notes_unmeasured_kv_error_when_the_data_is_gone(source_ckpt, tmp_path,
                                                                         capsys):
    """Only a fit needs the source's data: without it a plain conversion still writes the
    same model, says on one stderr line and in meta.json that K/V error was not measured;
    a calibrated one still fails with one error line and writes nothing."""
    (source_ckpt / "train_config.yaml").write_text(
        f"max_steps: 120\ndata:\n  source: text_files\n  files: ['{tmp_path}/gone/*.py']\n")
    code, err = run_main([f"ckpt={source_ckpt}", "n_kv_head=2", f"out={tmp_path / 'gqa'}"], capsys)
    assert code == 0 and err.startswith("note: K/V error not measured: ") and "\n" not in err
    assert "matches no files" in err
    meta = read_meta(tmp_path / "gqa")
    assert "kv_error" not in meta and "matches no files" in meta["kv_error_not_measured"]
    expected = convert_model(load_checkpoint(source_ckpt).model, Conversion(2, "mean"))
    torch.testing.assert_close(logits(load_checkpoint(tmp_path / "gqa").model), logits(expected),
                               atol=0, rtol=0)
    code, err = run_main([f"ckpt={source_ckpt}", "n_kv_head=2", "align=procrustes",
                          f"out={tmp_path / 'fit'}"], capsys)
    assert code == 2 and err.startswith("error: ") and "matches no files" in err
    assert "\n" not in err and not (tmp_path / "fit").exists()


def test_cli_refuses_calibrated_options_without_data(source_ckpt, tmp_path, capsys):
    code, err = run_main([f"ckpt={source_ckpt}", "n_kv_head=2", "group=similar",
                          f"out={tmp_path / 'new'}"], capsys)
    assert code == 2 and "fit on calibration data" in err and "data.*" in err
    assert not (tmp_path / "new").exists()
    code, err = run_main([f"ckpt={source_ckpt}", "n_kv_head=2", "data.vocab_sise=3",
                          f"out={tmp_path / 'new'}"], capsys)
    assert code == 2 and "unknown key data.vocab_sise: did you mean data.vocab_size?" in err


@pytest.fixture(scope="module")
def hf_llama_spm(tmp_path_factory):
    """(a tiny HF Llama dir with tokenizer.model, a corpus glob): an MHA source as the Hub
    ships it, without a train_config.yaml."""
    from hf_fixtures import CORPUS, tiny_hf_llama
    tmp = tmp_path_factory.mktemp("hf_convert")
    tiny_hf_llama(tmp / "hf", "spm")
    (tmp / "corpus").mkdir()
    for d in range(40):  # each doc longer than a 256-token window: any val split holds one
        (tmp / "corpus" / f"doc{d}.txt").write_text("".join(CORPUS[d % 5:d % 5 + 16]))
    return tmp / "hf", f"{tmp}/corpus/*.txt"


def fit_args(src, out, corpus, tmp_path, *more):
    return [f"ckpt={src}", "n_kv_head=2", "group=similar", "align=procrustes",
            "calib_windows=4", "data.source=text_files", f"data.files=[{corpus}]",
            f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1", f"out={out}", *more]


def test_an_hf_dir_or_its_import_calibrates_on_its_own_tokenizer(hf_llama_spm, tmp_path, capsys):
    """Without a train_config.yaml the data is tokenized with the checkpoint's own tokenizer
    (not a freshly trained one): converting the HF dir, its import, and its import with
    data.tokenizer named explicitly give the same weights, bit for bit, and the tokenizer
    travels; another data.tokenizer is refused."""
    from store.hf import main as hf_main
    from hf_fixtures import byte_bpe_tokenizer
    src, corpus = hf_llama_spm
    assert hf_main(["import", f"hf={src}", f"out={tmp_path / 'imp'}"]) == 0
    imp = tmp_path / "imp"
    runs = {"hf": fit_args(src, tmp_path / "hf", corpus, tmp_path),
            "imp_gqa": fit_args(imp, tmp_path / "imp_gqa", corpus, tmp_path),
            "named": fit_args(imp, tmp_path / "named", corpus, tmp_path, f"data.tokenizer={src}")}
    for args in runs.values():
        code, err = run_main(args, capsys)
        assert code == 0, err
    weights = [(tmp_path / out / "model.safetensors").read_bytes() for out in runs]
    assert weights[0] == weights[1] == weights[2]
    tokenizer = (src / "tokenizer.model").read_bytes()
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == tokenizer
    assert read_meta(tmp_path / "hf")["converted_from"]["calib_windows"] == 4
    other = byte_bpe_tokenizer(tmp_path / "other")
    code, err = run_main(fit_args(tmp_path / "imp", tmp_path / "bad", corpus, tmp_path,
                                  f"data.tokenizer={other}"), capsys)
    assert code == 2 and "differs from the tokenizer" in err and "\n" not in err
    assert not (tmp_path / "bad").exists()


def test_one_document_calibrates_on_all_of_it_and_notes_no_held_out_error(hf_llama_spm,
                                                                          tmp_path, capsys):
    """A corpus of one document has no train/val split: the fit reads windows of all of it
    ([BOS] text EOS, as the tokenizer frames it) and the held-out K/V error is noted as not
    measured, never an error."""
    from convert.command import data_config, token_windows
    from data.tokenizer import load_tokenizer
    import numpy as np
    from hf_fixtures import CORPUS
    src, _ = hf_llama_spm
    text = "".join(CORPUS) * 2
    (tmp_path / "one.txt").write_text(text)
    code, err = run_main(fit_args(src, tmp_path / "gqa", tmp_path / "one.txt", tmp_path), capsys)
    assert code == 0 and err.count("note: K/V error not measured: the corpus has 1 document") == 1
    meta = read_meta(tmp_path / "gqa")
    assert meta["converted_from"]["calib_windows"] == 4 and "kv_error" not in meta
    data = data_config(src, {"source": "text_files", "files": [str(tmp_path / "one.txt")],
                             "cache_dir": str(tmp_path / "cache"), "num_proc": 1})
    tok = load_tokenizer(src)
    ids = [tok.bos_id] * tok.add_bos + tok.encode(text) + [tok.eos_id]
    starts = np.linspace(0, len(ids) - 64, 4).astype(int)
    assert token_windows(data, "train", 64, 4).tolist() == [ids[s:s + 64] for s in starts]
