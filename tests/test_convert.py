"""K/V head pooling (Ainslie et al. 2023 §2.1) against independent per-head loops, the
invariants that pin it down, and the convert command's refusals."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import ModelConfig, Transformer
from model.checkpoint import load_checkpoint, save_checkpoint
from model.convert import ConvertError, convert_checkpoint, convert_model, main, pool_kv_heads

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
    dst = convert_model(src, G, "mean")
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
    dst = convert_model(src, 2, "first")
    for (sk, sv), (dk, dv) in zip(kv_weights(src), kv_weights(dst)):
        for g in range(2):
            assert torch.equal(head(dk, g), head(sk, 4 * g))
            assert torch.equal(head(dv, g), head(sv, 4 * g))


def test_random_is_a_fresh_seeded_init_at_init_std():
    src = tiny_model()
    a, b, c = (convert_model(src, 2, "random", seed=s) for s in (0, 0, 1))
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
def test_everything_but_k_and_v_is_copied_and_the_source_is_untouched(method):
    src = tiny_model()
    before = {k: v.clone() for k, v in src.state_dict().items()}
    dst = convert_model(src, 2, method)
    for name, value in dst.state_dict().items():
        if ".k_proj." not in name and ".v_proj." not in name:
            assert torch.equal(value, before[name]), name
    with torch.no_grad():  # the copy shares no storage with the source
        dst.blocks[0].attn.q_proj.weight.add_(1.0)
    for name, value in src.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert dst.lm_head.weight is dst.embed.weight  # still tied


@pytest.mark.parametrize("method", ["mean", "first"])
def test_same_head_count_is_the_identity(method):
    src = tiny_model()
    torch.testing.assert_close(logits(convert_model(src, N_HEAD, method)), logits(src),
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
    torch.testing.assert_close(logits(convert_model(src, G, method)), logits(src),
                               atol=1e-5, rtol=1e-5)


def test_pooling_twice_equals_pooling_once():
    src = tiny_model()
    direct = convert_model(src, 2, "mean")
    twice = convert_model(convert_model(src, 4, "mean"), 2, "mean")
    for (a, b), (c, d) in zip(kv_weights(direct), kv_weights(twice)):
        torch.testing.assert_close(a, c, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(b, d, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logits(direct), logits(twice), atol=1e-5, rtol=1e-5)


def test_gqa_source_converts_to_mqa():
    src = tiny_model(n_kv_head=4)
    dst = convert_model(src, 1, "mean")
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
        convert_model(tiny_model(), G, method)
    assert "\n" not in str(e.value)


def test_upsampling_a_gqa_source_is_refused():
    with pytest.raises(ConvertError, match="exceeds the source's 2 KV heads"):
        convert_model(tiny_model(n_kv_head=2), 4)


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
    out = convert_checkpoint(source_ckpt, tmp_path / "gqa2", 2, "mean", seed=3)
    assert tree_digest(source_ckpt) == before
    ckpt = load_checkpoint(out)
    assert ckpt.config.n_kv_head == 2 and ckpt.config.n_head == N_HEAD
    expected = convert_model(load_checkpoint(source_ckpt).model, 2, "mean")
    torch.testing.assert_close(logits(ckpt.model), logits(expected), atol=0, rtol=0)
    assert (out / "tokenizer.model").read_bytes() == b"\x00tok\xff"
    assert (out / "train_config.yaml").read_text() == "max_steps: 120\nlr: 0.001\n"
    meta = json.loads((out / "meta.json").read_text())
    sha = hashlib.sha256((source_ckpt / "model.safetensors").read_bytes()).hexdigest()
    assert meta["converted_from"] == {"path": str(source_ckpt.resolve()), "weights_sha256": sha,
                                      "method": "mean", "source_n_kv_head": N_HEAD, "seed": 3}
    assert meta["source_step"] == 120 and meta["max_steps"] == 120
    # a converted checkpoint converts again and keeps the original step count
    again = convert_checkpoint(out, tmp_path / "mqa", 1, "first")
    assert json.loads((again / "meta.json").read_text())["source_step"] == 120


def run_main(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("args, message", [
    (["n_kv_head=3"], "does not divide the source's 8 KV heads"),
    (["n_kv_head=16"], "exceeds the source's 8 KV heads"),
    (["n_kv_head=two"], "n_kv_head must be an integer, got 'two'"),
    (["n_kv_head=2", "method=median"], "unknown method 'median'"),
    (["n_kv_head=2", "heads=2"], "unexpected argument 'heads=2'"),
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
    run = subprocess.run([sys.executable, "-m", "model.convert", f"ckpt={source_ckpt}",
                          "n_kv_head=1", "method=mean", f"out={out}"],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr
    assert "MQA" in run.stdout and load_checkpoint(out).config.n_kv_head == 1
