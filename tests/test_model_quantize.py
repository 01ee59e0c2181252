"""model/quantize.py: per-channel int8 error bound, a trained model's logits and val loss
after quantization, cached decode == full forward, compiled == eager, checkpoint round
trip, and the command and generate.py options around it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from generate import GenerateConfig, run
from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.quantize import (Int8Linear, dequantize, int8_matmul, load_quantized, main,
                            quantization_of, quantize_model, quantize_per_channel,
                            save_quantized, weight_bytes)
from model.sampling import SamplingConfig, generate
from model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
GREEDY = SamplingConfig(temperature=0)
SEQ = 64


def corpus(seed: int, n: int) -> torch.Tensor:
    """Bytes of `def fN(x):\\n    return x + N\\n` lines, N random: a learnable pattern."""
    g = torch.Generator().manual_seed(seed)
    text = "".join(f"def f{k}(x):\n    return x + {k}\n"
                   for k in torch.randint(0, 30, (n,), generator=g).tolist())
    return torch.tensor(list(text.encode()))


def windows(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = (len(tokens) - 1) // SEQ
    return tokens[:n * SEQ].view(n, SEQ), tokens[1:n * SEQ + 1].view(n, SEQ)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on a busy 2-core machine two OpenMP threads spin-wait for
    each other and cost ~20x the CPU time of one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> Transformer:
    """A tiny GQA model trained for 100 steps on the byte corpus (~2 s)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      ffn_hidden=128, max_seq_len=SEQ)
    model = Transformer(cfg)
    x, y = windows(corpus(0, 1500))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(x), (16,), generator=g)
        loss = F.cross_entropy(model(x[idx]).flatten(0, 1), y[idx].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def quantized(model: Transformer, mode: str) -> Transformer:
    q = Transformer(model.config)
    q.load_state_dict(model.state_dict())
    return quantize_model(q.eval(), mode)


@torch.no_grad()
def val_loss(model: Transformer) -> float:
    x, y = windows(corpus(1, 200))  # held out: another seed's lines
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()


def test_per_channel_error_is_at_most_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 200, generator=g) * torch.logspace(-4, 2, 96)[:, None]
    w[5] = 0.0  # an all-zero row must not divide by zero
    w[7, 3] = 1e3  # an outlier widens only its own row's step
    q, scales = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    err = (w - dequantize(q, scales)).abs()  # (N, K)
    assert (err <= scales[:, None] / 2 * (1 + 1e-6)).all()
    # half a step of each row's own range (max|row| / 127): the outlier in row 7 and the
    # large rows leave the small rows' precision alone
    assert (err <= w.abs().amax(1, keepdim=True) / 254 * (1 + 1e-6)).all()
    assert (q.abs().amax(1)[torch.arange(96) != 5] == 127).all()  # the full range is used
    assert not dequantize(q, scales)[5].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_matmul_equals_dequantized_reference(dtype):
    """Every path of int8_matmul (fp32: dequantize + matmul; bf16 on CPU:
    torch._weight_int8pack_mm) against x @ dequantized.T in float64, bias included."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=True)
    layer = Int8Linear.from_linear(linear).to(dtype)
    x = torch.randn(3, 5, 96, generator=g).to(dtype)
    ref = x.double() @ dequantize(layer.weight, layer.scales).double().T + layer.bias.double()
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 5, 80)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("n, k, offset", [(16, 24, 0), (64, 20, 0), (33, 40, 0), (7, 48, 0),
                                          (33, 32, 1)])
def test_int8_bf16_any_shape_and_alignment_equals_dequantized_reference(n, k, offset,
                                                                         monkeypatch):
    """torch._weight_int8pack_mm's CPU kernel reads in_features 16 at a time with aligned
    loads and no remainder: K % 16 != 0 (garbage or a segfault before) takes the
    dequantized path, any N takes the kernel, and so does a misaligned view of x, copied."""
    kernel, calls = torch._weight_int8pack_mm, []
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or kernel(*a))
    g = torch.Generator().manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(k, n)).to(torch.bfloat16)
    x = torch.randn(3 * 5 * k + offset, generator=g).bfloat16()[offset:].view(3, 5, k)
    ref = x.double() @ dequantize(layer.weight, layer.scales).double().T + layer.bias.double()
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 5, n)
    assert len(calls) == (k % 16 == 0)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_int8_fp16_sum_does_not_overflow():
    """fp16 with small weights (so small scales) and a few outlier features, as Llama's
    down_proj inputs have: the sum over the unscaled int8 values, 4 * 127 * 300 from the
    outliers alone, passes fp16's 65504 (inf before); the output is the dequantized
    reference's, |y| ~ 7."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(1024, 64, bias=False)
    torch.nn.init.normal_(linear.weight, std=0.002, generator=g)
    linear.weight.data[:, :4] = 0.006  # the rows' largest: int8 127 for the outlier features
    layer = Int8Linear.from_linear(linear.half())
    x = torch.randn(2, 1024, generator=g)
    x[:, :4] = 300.0
    x = x.half()
    ref = x.double() @ dequantize(layer.weight, layer.scales).double().T
    out = layer(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("mode", ["int8", "int8_head"])
def test_trained_model_logits_and_val_loss_stay_close(trained, mode):
    q = quantized(trained, mode)
    assert quantization_of(q) == mode and quantization_of(trained) == "none"
    n_int8 = sum(isinstance(m, Int8Linear) for m in q.modules())
    assert n_int8 == 2 * 7 + (mode == "int8_head")
    x, _ = windows(corpus(1, 100))
    with torch.no_grad():
        ref, out = trained(x), q(x)
    rel = (out - ref).norm() / ref.norm()
    print(f"{mode}: logits rel err {rel:.4f}")
    assert rel < 0.02, rel
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.98
    loss_f, loss_q = val_loss(trained), val_loss(q)
    assert loss_f < 1.0, loss_f  # trained: from ln(128) = 4.85
    print(f"{mode}: val loss fp32 {loss_f:.4f} int8 {loss_q:.4f}")
    assert abs(loss_q - loss_f) / loss_f < 0.01, (loss_f, loss_q)
    assert weight_bytes(q) < weight_bytes(trained) / 2


def test_cached_decode_equals_own_full_forward(trained):
    q = quantized(trained, "int8_head")
    prompt = torch.stack([corpus(s, 2)[:7] for s in (3, 4, 5)])  # (3, 7)
    cached = generate(q, prompt, 24, GREEDY)
    assert torch.equal(cached, generate(q, prompt, 24, GREEDY, use_cache=False))


def test_compiled_int8_decode_equals_eager(trained):
    q = quantized(trained, "int8_head")
    prompt = torch.stack([corpus(s, 2)[:7] for s in (3, 4)])
    eager = generate(q, prompt, 16, GREEDY)
    assert torch.equal(generate(q, prompt, 16, GREEDY, compile=True), eager)
    assert all(m.weight.dtype == torch.int8 for m in q.modules() if isinstance(m, Int8Linear))


@pytest.mark.parametrize("mode", ["int8", "int8_head"])
def test_checkpoint_round_trip_gives_identical_logits(trained, tmp_path, mode):
    q = quantized(trained, mode)
    path = save_quantized(tmp_path / "q", q, meta={"step": 100})
    loaded = load_quantized(path)
    assert loaded.meta["quantization"]["mode"] == mode and loaded.meta["step"] == 100
    assert quantization_of(loaded.model) == mode
    x, _ = windows(corpus(2, 30))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), q(x))
    for name, t in q.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], t), name
    with pytest.raises(CheckpointError, match="int8-quantized"):
        load_checkpoint(path)  # training/conversion must not read int8 weights as floats


def test_command_writes_a_checkpoint_generate_loads_directly(trained, tmp_path, capsys):
    src = save_checkpoint(tmp_path / "float", trained)
    out = tmp_path / "int8"
    assert main([f"ckpt={src}", f"out={out}", "mode=int8_head"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["quantization"]["mode"] == "int8_head"
    prompt = corpus(3, 2)[:7].tolist()
    capsys.readouterr()
    run(GenerateConfig(ckpt=str(out), prompt_ids=prompt, max_new_tokens=12, temperature=0,
                       device="cpu"))
    printed, err = capsys.readouterr()
    want = generate(quantized(trained, "int8_head"), prompt, 12, GREEDY)[0].tolist()
    assert printed.split() == [str(t) for t in want]
    assert "quantization int8_head" in err and "weights:" in err
    # the same text from the float checkpoint quantized at load time
    run(GenerateConfig(ckpt=str(src), prompt_ids=prompt, max_new_tokens=12, temperature=0,
                       device="cpu", quantize="int8_head"))
    assert capsys.readouterr().out == printed


def test_generate_rejects_an_unknown_mode(trained, tmp_path):
    src = save_checkpoint(tmp_path / "float", trained)
    with pytest.raises(ValueError, match="int8_head"):
        run(GenerateConfig(ckpt=str(src), prompt_ids=[1, 2], quantize="int4", device="cpu"))


@pytest.mark.parametrize("args, message", [
    (["mode=int4"], "mode='int4' is unknown"),
    (["mode=int8", "overwrite=maybe"], "overwrite=maybe: Value 'maybe' is not a valid bool"),
    (["bogus=1"], "unknown key bogus: the keys here are ckpt, out, mode, overwrite"),
])
def test_command_errors_are_one_line_and_write_nothing(trained, tmp_path, capsys, args,
                                                       message):
    src = save_checkpoint(tmp_path / "float", trained)
    out = tmp_path / "out"
    assert main([f"ckpt={src}", f"out={out}", *args]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_command_refuses_existing_out_and_quantized_source(trained, tmp_path, capsys):
    src = save_checkpoint(tmp_path / "float", trained)
    out = tmp_path / "int8"
    assert main([f"ckpt={src}", f"out={out}"]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main([f"ckpt={src}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "model.quantize", f"ckpt={out}",
                           f"out={tmp_path / 'again'}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "already exists" in err and "already quantized" in proc.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "again").exists()
