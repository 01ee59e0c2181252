"""model/quantized.py: per-channel int8 and per-group int4 error bounds, a trained model's
logits and val loss after quantization, cached decode == full forward, compiled == eager,
checkpoint round trips, the command and generate.py options around it; and the int8 KV
cache on the trained model (greedy ids and attention outputs against the float cache)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from generate import GenerateConfig, run
from store.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.config import ModelConfig
from model.quantized import (MODES, Int4Linear, Int8Linear, QuantizeError, QuantSpec,
                             dequantize, dequantize_int4, quantization_of, quantize_groupwise,
                             quantize_model, spec_of,
                             quantize_per_channel, pack_nibbles, set_int8_kernel,
                             weight_bytes)
from model import int8_dot, kernels
from store.quantize import load_quantized, main, save_quantized
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


def quantized(model: Transformer, mode: str, group_size: int = 32) -> Transformer:
    q = Transformer(model.config)
    q.load_state_dict(model.state_dict())
    return quantize_model(q.eval(), mode, group_size)


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


@pytest.mark.parametrize("dtype, kernel", [(torch.float32, "dequant"), (torch.float32, "bf16"),
                                           (torch.bfloat16, None)])
def test_int8_matmul_equals_dequantized_reference(dtype, kernel):
    """Every eager path of int8_matmul (fp32: dequantize + matmul, or through bf16 for
    torch._weight_int8pack_mm; bf16 on CPU: that kernel) against x @ dequantized.T in
    float64, bias included."""
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=True)
    layer = Int8Linear.from_linear(linear).to(dtype)
    x = torch.randn(3, 5, 96, generator=g).to(dtype)
    ref = x.double() @ dequantize(layer.weight, layer.scales).double().T + layer.bias.double()
    set_int8_kernel(kernel)
    try:
        out = layer(x)
    finally:
        set_int8_kernel(None)
    assert out.dtype == dtype and out.shape == (3, 5, 80)
    tol = 1e-5 if kernel == "dequant" else 2e-2  # bf16 activations: ~3 significant digits
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


@pytest.mark.parametrize("mode", ["int8", "int8_head", "int4_int8head"])
def test_checkpoint_round_trip_gives_identical_logits(trained, tmp_path, mode):
    q = quantized(trained, mode, 32)
    path = save_quantized(tmp_path / "q", q, meta={"step": 100})
    loaded = load_quantized(path)
    # int8 weights as fresh tensors, not views into the file at an odd offset (where
    # int4_int8head's head lands, _weight_int8pack_mm's aligned loads crashed)
    assert all(m.weight.data_ptr() % 64 == 0 for m in loaded.model.modules()
               if isinstance(m, Int8Linear))
    assert loaded.meta["quantization"]["mode"] == mode and loaded.meta["step"] == 100
    assert quantization_of(loaded.model) == mode
    x, _ = windows(corpus(2, 30))
    with torch.no_grad():
        assert torch.equal(loaded.model(x), q(x))
    for name, t in q.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], t), name
    with pytest.raises(CheckpointError, match=r"quantized \(int8 or int4\)"):
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
        run(GenerateConfig(ckpt=str(src), prompt_ids=[1, 2], quantize="int3", device="cpu"))


@pytest.mark.parametrize("args, message", [
    (["mode=int3"], "mode=int3: Invalid value 'int3', expected one of [int8, int8_head, int4,"),
    (["mode=int8", "overwrite=maybe"], "overwrite=maybe: Value 'maybe' is not a valid bool"),
    (["bogus=1"], "unknown key bogus: the keys here are ckpt, out, mode, group_size, overwrite"),
])
def test_command_errors_are_one_line_and_write_nothing(trained, tmp_path, capsys, args,
                                                       message):
    src = save_checkpoint(tmp_path / "float", trained)
    out = tmp_path / "out"
    assert main([f"ckpt={src}", f"out={out}", *args]) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


@pytest.mark.parametrize("mode, bits", [("int8", (8, 0)), ("int8_head", (8, 8)), ("int4", (4, 0)),
                                        ("int4_head", (4, 4)), ("int4_int8head", (4, 8))])
def test_every_mode_shorthand_round_trips_through_quant_spec(trained, mode, bits):
    spec = QuantSpec.parse(mode, 32)
    assert (spec.weight_bits, spec.head_bits) == bits
    assert spec.group_size == (32 if 4 in bits else 0)  # int8 has no groups
    assert spec.mode == mode and QuantSpec(*bits, 32) == spec and mode in MODES
    q = quantize_model(Transformer(trained.config), spec)  # a spec or its shorthand: the same
    assert spec_of(q) == spec and quantization_of(q) == mode
    assert isinstance(q.lm_head, {0: nn.Linear, 8: Int8Linear, 4: Int4Linear}[spec.head_bits])


@pytest.mark.parametrize("fields, message", [
    (dict(weight_bits=8, head_bits=4), "weight_bits=8 head_bits=4 is not a supported format"),
    (dict(weight_bits=2), "weight_bits=2 head_bits=0 is not a supported format"),
    (dict(weight_bits=4, group_size=48), "group_size=48 is not supported: use one of 32, 64, 128"),
])
def test_quant_spec_refuses_what_no_layer_stores(fields, message):
    with pytest.raises(QuantizeError, match=message):
        QuantSpec(**fields)
    with pytest.raises(QuantizeError, match="quantize='int3' is unknown: use int8 or int4"):
        QuantSpec.parse("int3")


def test_an_int4_int8head_dir_written_before_quant_spec_loads_to_its_logits(monkeypatch):
    """tests/data/int4_int8head: written (with its logits) by the mode-string code that
    QuantSpec replaced: the same layer formats and the same logits load from it, through
    the kernels that wrote them (torch's: the int8 dot products, later, round activations
    differently)."""
    from safetensors.torch import load_file
    monkeypatch.setattr(int8_dot, "available", lambda: (False, "off for this test"))
    monkeypatch.setattr(kernels, "ready", False)
    data = ROOT / "tests" / "data"
    loaded = load_quantized(data / "int4_int8head").model
    assert spec_of(loaded) == QuantSpec(weight_bits=4, head_bits=8, group_size=32)
    formats = {name: type(m).__name__ for name, m in loaded.named_modules()
               if isinstance(m, (Int4Linear, Int8Linear))}
    assert formats.pop("lm_head") == "Int8Linear" and len(formats) == 7
    assert set(formats.values()) == {"Int4Linear"}
    want = load_file(data / "int4_int8head_logits.safetensors")
    with torch.no_grad():  # the CPU's int4 kernel tiles per ISA: equal up to float rounding
        torch.testing.assert_close(loaded(want["tokens"]), want["logits"], atol=1e-5, rtol=1e-4)


def test_command_refuses_existing_out_and_quantized_source(trained, tmp_path, capsys):
    src = save_checkpoint(tmp_path / "float", trained)
    out = tmp_path / "int8"
    assert main([f"ckpt={src}", f"out={out}"]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main([f"ckpt={src}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "store.quantize", f"ckpt={out}",
                           f"out={tmp_path / 'again'}"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "already exists" in err and "already quantized" in proc.stderr
    assert (out / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "again").exists()


# ---------------------------------------------------------------- int4

def reference_int4(w: torch.Tensor, group_size: int):
    """An independent per-group quantizer in float64, one group at a time: codes 0..15
    from the group's min and max, dequantized as min + code * step."""
    N, K = w.shape
    codes, deq, steps = (torch.empty(N, K, dtype=torch.float64) for _ in range(3))
    for n in range(N):
        for g in range(0, K, group_size):
            grp = w[n, g:g + group_size].double()
            step = (grp.max() - grp.min()) / 15
            c = torch.round((grp - grp.min()) / step) if step > 0 else torch.zeros_like(grp)
            codes[n, g:g + group_size], steps[n, g:g + group_size] = c, step
            deq[n, g:g + group_size] = grp.min() + c * step
    return codes, deq, steps


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group_size):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g) * torch.logspace(-3, 1, 48)[:, None]
    w[3] = 0.5  # a constant row: zero range must not divide by zero
    w[9, 7] = 50.0  # an outlier widens only its own group's step
    q, scales, zeros = quantize_groupwise(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    assert scales.shape == zeros.shape == (48, 256 // group_size)
    codes, ref, steps = reference_int4(w, group_size)
    ours = dequantize_int4(pack_nibbles(q), scales, zeros)
    # the same codes as the reference (a rounding tie may land one code apart)
    assert (q.double() - codes).abs().max() <= 1 and (q.double() == codes).float().mean() > 0.999
    err = (w.double() - ours.double()).abs()
    assert (err <= steps / 2 + 1e-6 * w.abs().amax(1, keepdim=True).double()).all()
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    assert (ours[3] == 0.5).all()
    other_groups = torch.arange(256) // group_size != 0
    assert err[9, other_groups].max() < 0.02 * 50 / 15  # only group 0 of row 9 holds 50


@pytest.mark.parametrize("n, dtype", [(48, torch.float32), (48, torch.bfloat16),
                                      (40, torch.float32)])
def test_int4_linear_equals_dequantized_reference(n, dtype):
    """The CPU kernel (out_features % 16 == 0: the int8 dot products where they build, else
    torch's with activations through bf16) and the dequantize path (n = 40) against x @ the
    reference's dequantized weight in float64."""
    g = torch.Generator().manual_seed(1)
    linear = torch.nn.Linear(128, n, bias=True)
    layer = Int4Linear.from_linear(linear, group_size=32).to(dtype)
    packed = layer.dot_weight if kernels.ready else layer.cpu_weight
    assert (packed is not None) == (n % 16 == 0)
    _, ref_w, _ = reference_int4(linear.weight.detach(), 32)
    x = torch.randn(3, 5, 128, generator=g).to(dtype)
    ref = x.double() @ ref_w.T + linear.bias.detach().double()
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 5, n)
    # bf16 activations and scales (torch's kernel) or fp16 scales (dot): ~3 digits
    tol = 1e-5 if n % 16 and dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("mode", ["int4", "int4_head", "int4_int8head"])
def test_int4_trained_model_val_loss_stays_close(trained, mode):
    q = quantized(trained, mode, 32)
    assert quantization_of(q) == mode
    assert sum(isinstance(m, Int4Linear) for m in q.modules()) == 2 * 7 + (mode == "int4_head")
    assert isinstance(q.lm_head, {"int4": nn.Linear, "int4_head": Int4Linear,
                                  "int4_int8head": Int8Linear}[mode])
    loss_f, loss_q = val_loss(trained), val_loss(q)
    print(f"{mode} group 32: val loss fp32 {loss_f:.4f} int4 {loss_q:.4f}")
    assert abs(loss_q - loss_f) / loss_f < 0.05, (loss_f, loss_q)
    assert weight_bytes(q) < weight_bytes(trained) / 3  # int4_head: the embedding stays float


def test_int4_cached_decode_equals_full_forward_and_compiled_equals_eager(trained):
    q = quantized(trained, "int4_head", 32)
    prompt = torch.stack([corpus(s, 2)[:7] for s in (3, 4)])  # (2, 7)
    cached = generate(q, prompt, 16, GREEDY)
    assert torch.equal(cached, generate(q, prompt, 16, GREEDY, use_cache=False))
    assert torch.equal(generate(q, prompt, 16, GREEDY, compile=True), cached)


def test_int4_group_size_must_divide_the_inputs(trained):
    q = Transformer(trained.config)
    with pytest.raises(ValueError, match="group_size=128 does not divide .*use group_size=32 or 64"):
        quantize_model(q, "int4", 128)  # d_model 64
    assert quantization_of(q) == "none"  # refused before any layer was replaced
    with pytest.raises(ValueError, match="use one of 32, 64, 128"):
        quantize_model(q, "int4", 48)


def test_int4_checkpoint_round_trip_and_command(trained, tmp_path, capsys):
    src = save_checkpoint(tmp_path / "float", trained)
    out = tmp_path / "int4"
    assert main([f"ckpt={src}", f"out={out}", "mode=int4_head", "group_size=32"]) == 0
    info = json.loads((out / "meta.json").read_text())["quantization"]
    assert info["mode"] == "int4_head" and info["group_size"] == 32
    loaded = load_quantized(out).model
    q = quantized(trained, "int4_head", 32)
    for name, t in q.state_dict().items():  # the stored nibbles, scales and zeros
        assert torch.equal(loaded.state_dict()[name], t), name
    x, _ = windows(corpus(2, 30))
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))  # the kernel layout rebuilt on load
    prompt = corpus(3, 2)[:7].tolist()
    capsys.readouterr()
    run(GenerateConfig(ckpt=str(out), prompt_ids=prompt, max_new_tokens=12, temperature=0,
                       device="cpu", quant_kernels="force"))  # the kernel on any CPU: test_isa
    printed, err = capsys.readouterr()
    assert printed.split() == [str(t) for t in generate(q, prompt, 12, GREEDY)[0].tolist()]
    kernel = "int8 dot products" if kernels.ready else "_weight_int4pack_mm_for_cpu"
    assert "quantization int4_head (group 32)" in err and f"int4: kernel {kernel}" in err
    # a group size that does not fit: one line, nothing written
    bad = tmp_path / "bad"
    assert main([f"ckpt={src}", f"out={bad}", "mode=int4", "group_size=128"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "group_size=128 does not divide" in err
    assert not bad.exists()


@pytest.mark.parametrize("kernel", ["bf16", "fused", "dequant"])
def test_every_int8_kernel_decodes_like_the_default(trained, kernel):
    """Each fp32 int8 path gives the reference's greedy ids eager, and the fused loop
    compiled (bf16, the default on AVX2/AVX-512, is compiled in
    test_compiled_int8_decode_equals_eager; dequant compiled is fp32's folded GEMM)."""
    q = quantized(trained, "int8_head")
    prompt = torch.stack([corpus(s, 2)[:7] for s in (3, 4)])
    ref = generate(q, prompt, 12, GREEDY, use_cache=False)
    torch._dynamo.reset()
    set_int8_kernel(kernel)
    try:
        assert torch.equal(generate(q, prompt, 12, GREEDY), ref)
        if kernel == "fused":  # compiled bf16 and dequant are covered elsewhere
            assert torch.equal(generate(q, prompt, 12, GREEDY, compile=True), ref)
    finally:
        set_int8_kernel(None)
        torch._dynamo.reset()


# ---------------------------------------------------------------- int8 KV cache

def test_kv_int8_greedy_ids_match_the_float_cache(trained):
    """N = 48 new tokens from 3 prompts (window 32: the first block is int8 after the
    prompt's 7 + 25 tokens). Compiled == eager for this cache is in test_model_kv_cache."""
    prompt = torch.stack([corpus(s, 2)[:7] for s in (3, 4, 5)])
    ref = generate(trained, prompt, 48, GREEDY)
    assert torch.equal(generate(trained, prompt, 48, GREEDY, kv_cache="int8"), ref)


def test_kv_int8_attention_output_on_trained_inputs(trained):
    """The trained model's own q, k, v (a 56-token window: one int8 block, the rest in the
    ring): every layer's decode attention output within 1% (relative norm) of fp32."""
    from model.attention import apply_rope
    from tests.test_model_kv_cache import attention_error
    x, _ = windows(corpus(1, 40))
    inputs = {}
    handles = [b.attn.register_forward_hook(lambda m, args, out: inputs.setdefault(m, args[0]))
               for b in trained.blocks]
    with torch.no_grad():
        trained(x[:2, :56])
        for h in handles:
            h.remove()
        cos, sin = trained.rope_cos[:56, None], trained.rope_sin[:56, None]  # (T, 1, hd)
        for block in trained.blocks:
            a, h = block.attn, inputs[block.attn]  # (B, T, d)
            B, T, _ = h.shape
            q = apply_rope(a.q_proj(h).view(B, T, a.n_head, -1), cos, sin).transpose(1, 2)
            k = apply_rope(a.k_proj(h).view(B, T, a.n_kv_head, -1), cos, sin).transpose(1, 2)
            v = a.v_proj(h).view(B, T, a.n_kv_head, -1).transpose(1, 2)
            err = attention_error(q, k, v, window=8)
            print(f"layer {a.layer}: int8 KV attention rel err {err:.4f}")
            assert err < 0.01, err
