"""model/int8_dot.py: the integer dot-product kernels against an independent float64
reference (activations quantized per block of 32 by the reference's own arithmetic, weights
dequantized), every row-tile size and group size, both ISA bodies where this CPU runs them;
the layers that use them; and what happens without a compiler."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import one_thread  # noqa: F401  (autouse: one thread)
from model import int8_dot
import model.quantized as mq
from model.config import ModelConfig
from model.quantized import (Int4Linear, Int8Linear, JointInt4, dequantize, quantize_groupwise,
                             quantize_model, quantize_per_channel, unpack_nibbles)
from model.sampling import SamplingConfig, generate
from model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not int8_dot.available()[0], reason=int8_dot.available()[1])
# the bodies this CPU can run: AVX2's everywhere the kernels load, AVX-512's on VNNI CPUs
BODIES = [False] + ([True] if int8_dot.isa() == "avx512" else [])


def reference_rows(x: torch.Tensor) -> torch.Tensor:
    """What the kernels multiply x as (int8_dot.quantize_activations, torch ops in fp32),
    in float64; its own bound is tested below."""
    return int8_dot.quantize_activations(x).double()


def random_rows(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[0, :32] = 0  # an all-zero block: scale 0, no division by it
    return x


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("avx512", BODIES)
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_mm_equals_reference(m, avx512, group_size):
    """y = Σ_blocks scale · d_x · (q_w · q_x) + minimum · Σx: the q part from the quantized
    activations, the minimums' part from the exact ones (the kernel keeps each block's float
    sum); weights as stored, scales and minimums rounded to fp16."""
    n, k = 48, 256
    w, x = torch.randn(n, k) * 0.1, random_rows(m, k, seed=m)
    q, scales, zeros = quantize_groupwise(w, group_size)
    minimums = zeros - 8 * scales
    nibbles, scales_mins = int8_dot.pack_int4(q, scales, minimums)
    s16, m16 = (t.half().double().repeat_interleave(group_size, 1) for t in (scales, minimums))
    ref = reference_rows(x) @ (q.double() * s16).T + x.double() @ m16.T
    y = torch.ops.gqalab_int8_dot.int4_mm(x, nibbles, scales_mins, group_size, avx512)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("avx512", BODIES)
def test_int8_mm_equals_reference(m, avx512):
    """Weights at the ends of int8's range (-127, 127) included: the AVX-512 body offsets
    them by 128, the AVX2 body moves x's sign onto them."""
    n, k = 64, 160
    w, x = torch.randn(n, k), random_rows(m, k, seed=10 + m)
    q, scales = quantize_per_channel(w)
    q[0, :k // 2], q[1, :k // 2] = 127, -127
    ref = reference_rows(x) @ dequantize(q, scales).double().T
    y = torch.ops.gqalab_int8_dot.int8_mm(x, int8_dot.pack_int8(q), scales, avx512)
    torch.testing.assert_close(y.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


def test_activations_are_two_int8_parts_within_d_over_508():
    """x ~= d * (hi + lo / 254) per block of 32, d = max|block| / 127: within d / 508 (plus
    fp32 rounding), the block's largest value exact, an all-zero block zero."""
    x = random_rows(3, 96, seed=0)
    back = int8_dot.quantize_activations(x)
    d = x.view(3, 3, 32).abs().amax(-1, keepdim=True) / 127
    err = (back - x).view(3, 3, 32).abs()
    assert (err <= d / 508 + 1e-6 * d * 127).all()
    assert err.max() > d.min() / 5000  # not exact: the remainder is rounded too
    assert not back[0, :32].any()
    big = x.abs().argmax(dim=1)
    torch.testing.assert_close(back[torch.arange(3), big], x[torch.arange(3), big])


@pytest.mark.parametrize("layer_type", ["int4", "int8"])
def test_layers_multiply_through_the_kernel(layer_type):
    """Int4Linear / Int8Linear on CPU go through the kernel (packed at creation) and equal
    the reference over their own dequantized weights, bias added, in the input's dtype."""
    linear = torch.nn.Linear(128, 48, bias=True)
    layer = (Int4Linear.from_linear(linear, group_size=32) if layer_type == "int4"
             else Int8Linear.from_linear(linear))
    assert layer.dot_weight is not None
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(0))
    rows = x.view(-1, 128)
    if layer_type == "int4":  # weight = q * scale + minimum, scale and minimum in fp16
        s16, m16 = (t.half().double().repeat_interleave(32, 1)
                    for t in (layer.scales, layer.zeros - 8 * layer.scales))
        q = unpack_nibbles(layer.weight).double()
        ref = reference_rows(rows) @ (q * s16).T + rows.double() @ m16.T
    else:
        ref = reference_rows(rows) @ dequantize(layer.weight, layer.scales).double().T
    ref = ref.view(2, 3, 48) + linear.bias.detach().double()
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 48)
    torch.testing.assert_close(out.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_joined_projections_equal_the_layers_one_by_one(monkeypatch, bias):
    """quantize_model stacks each attention's q, k, v and each MLP's gate, up (JointInt4, one
    kernel call each): the logits equal, bit for bit, those of the same model quantized
    without joining (the same rows, the same activation rounding), biases included, and so
    do greedy ids compiled."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      ffn_hidden=128, max_seq_len=64, attn_bias=bias, mlp_bias=bias, init_std=0.2)
    joined, separate = Transformer(cfg).eval(), Transformer(cfg).eval()
    separate.load_state_dict(joined.state_dict())
    quantize_model(joined, "int4", 32)
    monkeypatch.setattr(mq, "join_projections", lambda model: 0)
    quantize_model(separate, "int4", 32)
    assert sum(isinstance(m, JointInt4) for m in joined.modules()) == 2 * 2
    assert not any(isinstance(m, JointInt4) for m in separate.modules())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(joined(ids), separate(ids))
    prompt = ids[:, :5]
    greedy = SamplingConfig(temperature=0)
    assert torch.equal(generate(joined, prompt, 8, greedy, compile=True),
                       generate(separate, prompt, 8, greedy))


def test_without_a_compiler_the_layers_keep_their_other_paths(tmp_path):
    """A failed build (CXX=false, an empty kernel cache): available() says why in one
    phrase, the int4 layer packs for torch's kernel and still equals the float reference."""
    code = ("import torch; from model import int8_dot\n"
            "from model.quantized import Int4Linear, dequantize_int4\n"
            "ok, why = int8_dot.available(); print(ok); print(why)\n"
            "lin = torch.nn.Linear(64, 32); layer = Int4Linear.from_linear(lin, 32)\n"
            "print(layer.dot_weight is None, layer.cpu_weight is not None)\n"
            "x = torch.randn(4, 64); ref = x @ dequantize_int4(layer.weight, layer.scales, "
            "layer.zeros).T + lin.bias\n"
            "print(torch.allclose(layer(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()))\n")
    env = {**os.environ, "CXX": "false", "GQALAB_KERNEL_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ok, why, packed, close = proc.stdout.strip().splitlines()
    assert ok == "False" and why.startswith("the kernels did not build")
    assert packed == "True True" and close == "True" and not list(tmp_path.glob("*.so"))
