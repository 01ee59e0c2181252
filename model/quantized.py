"""Int8 and int4 weight-only quantization for decode: the layers and quantize_model.

At batch 1 a decode step reads every weight once, so its speed is bounded by the bytes of
the weights. Int8 weights with one scale per output channel (symmetric, round to nearest)
read 4x fewer bytes than fp32; int4 weights with a scale and a zero point per group of
group_size inputs (asymmetric, gpt-fast's scheme) about 7x fewer. Activations,
embeddings, norms and the KV cache stay in float.

    quantize_model(model, "int4_int8head", group_size=32)  # in place; returns model
    python -m store.quantize ckpt=... out=...  (quantized checkpoint dirs: store/quantize.py)

On x86 CPUs with AVX2 or AVX-512 VNNI, both multiply through model/int8_dot.py where its C++
builds: integer dot products over activations quantized per block of 32 (two int8 parts
each), 1.7-2.6x fp32 compiled on the bench model at b1 where torch's weight-only kernels
gave 1.25-2.1x (SPEEDUP), and SmolLM2-135M's int4_int8head perplexity +0.01% (torch's kernels with bf16
activations: +0.13%). Each layer packs its weight for it once (pack_for_cpu; not saved) and
the paths below are what runs where it does not build or fit (n % 16, k % 32).

int4 (int4_matmul): on CPU, torch's _weight_int4pack_mm_for_cpu with bfloat16 activations
(its fp32 path is a scalar loop), eager and compiled (inductor keeps it as an extern
kernel, or on AMX CPUs autotunes it against its own int4 template). Its weight layout
depends on the CPU's ISA (AVX2 and AVX-512 tile differently), so checkpoints store plain
nibbles (pack_nibbles) and each process repacks them once (Int4Linear.pack_for_cpu);
out_features must be a multiple of 16 for it. Elsewhere: dequantize + matmul. Where the
kernel is slower than fp32 compiled (AVX2: cpu_choice), generate.py replaces the layers by
their dequantized float weights at load (dequantize_int4_layers).

int8 (int8_matmul) takes the fastest correct path measured on torch 2.13's CPU:
- bfloat16 activations on CPU: torch._weight_int8pack_mm (AVX512/AVX2 kernel), eager and
  compiled (behind an opaque op, int8pack_mm: inductor's own int8 template crashed),
  where in_features is a multiple of 16 (the kernel has no remainder loop);
- float32 activations in a compiled decode step: x (B, 1, K) * w (N, K) summed over K,
  which inductor fuses into one vectorised loop that reads the int8 rows. Both obvious
  spellings lose here: `F.linear(x, w.float()) * s` has its dequantized copy constant-
  folded by freezing into an fp32 weight (4x the bytes again), and _weight_int8pack_mm
  has no vectorised fp32 kernel on x86 (a scalar loop, ~1-3 GB/s);
- float16 activations: the scales applied to the weight before the matmul, since fp16's
  range (65504) does not hold a sum over unscaled int8 values;
- anywhere else (eager fp32, other devices): dequantize + matmul, which reads more bytes
  than an fp32 weight: int8 pays off compiled, or with bf16 activations.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import int8_dot, kernels
from model.transformer import Transformer


class QuantizeError(ValueError):
    """A quantization mode or group size that does not fit; the message names the fix."""
    user_error = True  # cli prints it as one line

GROUP_SIZES = (32, 64, 128)  # int4: inputs per scale/zero pair


class QuantMode(enum.StrEnum):
    """The shorthands of QuantSpec (the schemas' mode= and quantize= choices): the blocks'
    linear layers; _head: the output head too, in the same format; int4_int8head: int4
    blocks and an int8 head (llama.cpp's Q4_K_M keeps its head at 6 bits too: a small
    model's head is a large share of its bytes and the layer int4 hurts most)."""
    int8 = "int8"
    int8_head = "int8_head"
    int4 = "int4"
    int4_head = "int4_head"
    int4_int8head = "int4_int8head"


MODES = tuple(QuantMode)
BITS = {QuantMode.int8: (8, 0), QuantMode.int8_head: (8, 8), QuantMode.int4: (4, 0),
        QuantMode.int4_head: (4, 4), QuantMode.int4_int8head: (4, 8)}  # (weight_bits, head_bits)
MODES_HELP = ("int8 or int4 (the blocks' linear layers), int8_head or int4_head (those and the "
              "output head), or int4_int8head (int4 blocks, int8 head)")


@dataclass(frozen=True)
class QuantSpec:
    """How quantize_model stores each linear layer; every decision reads these fields.
    QuantSpec.parse takes the mode shorthands (MODES), .mode gives one back."""
    weight_bits: int = 8  # the blocks' linear layers: 8 (per channel) or 4 (per group)
    head_bits: int = 0  # the output head: 0 (stays float), 8 or 4
    group_size: int = 64  # int4: inputs per scale/zero pair (GROUP_SIZES); int8 has none: 0

    def __post_init__(self) -> None:
        if not self.int4:  # meaningless for int8: zeroed, so equal specs compare equal
            object.__setattr__(self, "group_size", 0)
        if (self.weight_bits, self.head_bits) not in BITS.values():
            raise QuantizeError(f"weight_bits={self.weight_bits} head_bits={self.head_bits} "
                                f"is not a supported format: use {MODES_HELP}")
        if self.int4 and self.group_size not in GROUP_SIZES:
            raise QuantizeError(f"group_size={self.group_size} is not supported: use one of "
                                f"{', '.join(map(str, GROUP_SIZES))}")

    @classmethod
    def parse(cls, mode: str, group_size: int = 64) -> "QuantSpec":
        """A mode shorthand (int8, int8_head, int4, int4_head, int4_int8head) as fields."""
        if mode not in BITS:
            raise QuantizeError(f"quantize={mode!r} is unknown: use {MODES_HELP}")
        return cls(*BITS[QuantMode(mode)], group_size)

    @property
    def mode(self) -> QuantMode:
        return next(m for m, bits in BITS.items() if bits == (self.weight_bits, self.head_bits))

    @property
    def int4(self) -> bool:
        """Some layer is int4 (so group_size counts)."""
        return 4 in (self.weight_bits, self.head_bits)

    def bits(self, name: str) -> int:
        """8 or 4: how the layer `name` is stored; 0: it stays float."""
        return self.head_bits if name == "lm_head" else self.weight_bits


# ---------------------------------------------------------------- the arithmetic

def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> int8 (N, K), fp32 scales (N,): weight ~= int8 * scales[:, None].
    scale = max|row| / 127, so nothing clips and |weight - dequantized| <= scale / 2."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scales[:, None]).to(torch.int8), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]  # (N, K)


@torch.library.custom_op("gqalab::int8pack_mm", mutates_args=())
def int8pack_mm(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """torch._weight_int8pack_mm on rows (M, K) bf16, weight (N, K) int8, scales (N,) bf16
    -> (M, N) bf16, as an op inductor cannot see into. Lowered as itself, it is autotuned
    against inductor's own C++ int8 GEMM template, and that template, picked at batch 1
    with the RMSNorm fused in front, corrupted the heap (torch 2.13, AVX-512: glibc's
    "malloc(): unaligned tcache chunk detected", or a segfault a few kernels later).
    The kernel reads each row 16 values at a time with aligned 32-byte loads and no
    remainder (AVX2: 8 and 16 bytes), so K % 16 == 0 (the caller checks) and every row
    must be 32-byte aligned: a view that is not (an offset, an odd row stride) faults or
    reads garbage, so it is copied to a fresh (64-byte aligned) tensor. N and M may be
    anything: it tiles them by 4 with remainders."""
    if rows.data_ptr() % 32 or rows.stride(0) % 16 or rows.stride(1) != 1:
        rows = rows.clone(memory_format=torch.contiguous_format)
    return torch._weight_int8pack_mm(rows, weight, scales)


@int8pack_mm.register_fake
def _(rows: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


INT8_KERNELS = ("dot", "bf16", "fused", "dequant")  # float32 activations on CPU: see int8_kernel
_int8_kernel_override: str | None = None
# read once: ATEN_CPU_CAPABILITY is fixed per process, and torch.compile cannot trace the call
CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()

# Decode speed of each quantized path over fp32 compiled (float weights, float cache), per
# CPU capability, one AVX-512 machine with and without ATEN_CPU_CAPABILITY=avx2. int8:
# generate.py compile=true, 6 layers d512 8 heads, b1, 2026-12. int4 (AVX-512: the same) and
# kv_int8: `python -m bench.decode --section i --quick` (the same shape, compiled step, two
# threads, quiet machine, 2026-12-07): int4 group 32 at b1, context 32 (AVX2: 1.07-1.45x
# over b1/b8 x 32/2k slots); kv_int8 at 2k slots x 8, its words packed (kv_cache.pack_int8:
# 0.49x on AVX2 as int8 bytes). latent_int8: MLA's int8 cache (QuantizedLatentCache) against
# its float LatentCache, SmolLM2-135M as MLA at 23,040 B/token, 4k slots x 8, compiled step
# (evaluation.speed.compiled_step_tok_s), 2026-12-07: a tie, so auto keeps the float cache.
# int8_dot, int4_dot: model/int8_dot.py's kernels (int4 at group 32), `python -m bench.decode
# --section i --quick --threads 2 --int8-kernel dot`, b1, context 32, quiet machine,
# 2026-12-07 (their lowest cell over b1/b8 x 32/2k slots: AVX-512 1.00x and 1.11x at b8 x
# 2k; AVX2 ~0.9x at b8 x 2k in that run, 1.07x and 1.09x re-timed alone, int8 1.13x at b8 x 32).
# kv_int8 again with model/decode_attention.py's kernel reading both caches (the same command,
# 2026-12-08): 1.98x / 1.52x at b8 x 2k slots (b1 x 2k: 1.18x / 1.20x); SmolLM2-135M at 4k x 8
# (section l): 1.19x / 1.69x.
SPEEDUP = {"AVX512": {"int8": 1.25, "int4": 2.06, "kv_int8": 1.98, "latent_int8": 0.96,
                      "int8_dot": 2.24, "int4_dot": 2.63},
           "AVX2": {"int8": 1.36, "int4": 1.45, "kv_int8": 1.52,
                    "int8_dot": 1.67, "int4_dot": 2.02}}


def cpu_choice(path: str) -> tuple[bool, str]:
    """(path's quantized kernel wins on this CPU, why) for path int8, int4 (torch's kernels),
    int8_dot, int4_dot, kv_int8 or latent_int8: it wins where it measured not slower than
    fp32 compiled (SPEEDUP). Where it does not, or was not measured, the caller runs fp32
    compute over the smaller storage (int8: dequant; int4: weights dequantized at load;
    kv_int8, latent_int8: the float cache)."""
    ratio = SPEEDUP.get(CPU_CAPABILITY, {}).get(path)
    why = (f"not measured on {CPU_CAPABILITY}" if ratio is None else
           f"{ratio:.2f}x fp32 compiled, measured on {CPU_CAPABILITY}")
    return ratio is not None and ratio >= 1, why


def int8_kernel() -> str:
    """How int8 layers multiply float activations on this CPU:
    - dot: model/int8_dot.py's integer dot products (activations as two int8 parts per
      block of 32), eager and compiled, where it built and measured faster than fp32;
    - bf16: activations cast to bfloat16 for torch._weight_int8pack_mm (vectorised on
      AVX2 and AVX-512), the output cast back; eager and compiled;
    - fused: compiled, x * w summed over K, one inductor loop reading the int8 rows
      (eager: dequant);
    - dequant: F.linear(x, w.float()) * scales; compiled, freezing folds the float copy
      into a constant, so this is fp32 speed: the fallback where no int8 path wins.
    Picked by the CPU's capability (cpu_choice: dot, else bf16, where measured faster);
    set_int8_kernel overrides it (bench/decode.py --int8-kernel)."""
    if _int8_kernel_override is not None:
        return _int8_kernel_override
    if kernels.ready and cpu_choice("int8_dot")[0]:  # loaded when int8 layers were packed
        return "dot"
    return "bf16" if cpu_choice("int8")[0] else "dequant"


def set_int8_kernel(name: str | None) -> None:
    """Force a kernel (one of INT8_KERNELS), None for the per-CPU choice. Compiled steps
    keep the kernel they were traced with: reset torch._dynamo after a change."""
    global _int8_kernel_override
    if name is not None and name not in INT8_KERNELS:
        raise QuantizeError(f"int8 kernel {name!r} is unknown: use one of {INT8_KERNELS}")
    _int8_kernel_override = name


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) float @ weight (N, K) int8 with per-row scales (N,) -> (..., N) in x's
    dtype. The path per device and dtype is explained in the module docstring."""
    on_cpu, k_ok = x.device.type == "cpu", x.shape[-1] % 16 == 0
    if on_cpu and k_ok and (x.dtype == torch.bfloat16 or
                           (x.dtype == torch.float32 and int8_kernel() == "bf16")):
        rows = x.to(torch.bfloat16).reshape(-1, x.shape[-1])  # (M, K)
        y = int8pack_mm(rows, weight, scales.to(torch.bfloat16))
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    if torch.compiler.is_compiling() and x.dtype == torch.float32 and \
            not (on_cpu and int8_kernel() == "dequant"):
        return (x.unsqueeze(-2) * weight).sum(-1) * scales  # (..., 1, K) * (N, K) -> (..., N)
    if x.dtype == torch.float16:  # a sum over unscaled int8 (up to 127 * K |x|) passes 65504
        return F.linear(x, weight.to(x.dtype) * scales.to(x.dtype)[:, None])
    return F.linear(x, weight.to(x.dtype)) * scales.to(x.dtype)


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight (out, in), float scales (out,) and optional bias.
    Buffers, not parameters: model.to(dtype) converts scales and bias and leaves the
    int8 weight alone, and torch.compile's freezing keeps it as an int8 constant."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("dot_weight", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scales = quantize_per_channel(linear.weight)
        float_kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight, layer.scales = q.to(linear.weight.device), scales.to(**float_kw)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer.pack_for_cpu()

    @torch.no_grad()
    def pack_for_cpu(self) -> "Int8Linear":
        """Add the int8 dot kernel's layout (model/int8_dot.py) where it runs here."""
        if (self.weight.device.type == "cpu" and int8_dot.available()[0]
                and int8_dot.fits(self.out_features, self.in_features)):
            self.dot_weight = int8_dot.pack_int8(self.weight)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dot_weight is not None and x.device.type == "cpu" and int8_kernel() == "dot":
            y = int8_dot.int8_mm(x, self.dot_weight, self.scales).to(x.dtype)
        else:
            y = int8_matmul(x, self.weight, self.scales)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 per-channel")


# ---------------------------------------------------------------- int4

def quantize_groupwise(weight: torch.Tensor, group_size: int):
    """weight (N, K) float -> q (N, K) uint8 in 0..15, scales and zeros (N, K // group_size)
    fp32, with weight ~= (q - 8) * scale + zero per group (the layout of torch's int4
    kernels: zero is the group's midpoint, min + 8 * scale). scale = (max - min) / 15 over
    the group, so nothing clips and |weight - dequantized| <= scale / 2."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)  # (N, G)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(N, K), scales, lo + 8 * scales


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) uint8 in 0..15 -> (N, K // 2): even k in the low nibble, odd k in the high."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # (N, K)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor) -> torch.Tensor:
    q = unpack_nibbles(packed).float()  # (N, K)
    N, G = scales.shape
    w = (q.view(N, G, -1) - 8) * scales.float()[..., None] + zeros.float()[..., None]
    return w.view(N, -1)


def int4_matmul(x: torch.Tensor, layer: "Int4Linear") -> torch.Tensor:
    """x (..., K) float @ layer's int4 weight -> (..., N) in x's dtype."""
    if x.device.type == "cpu" and layer.dot_weight is not None:
        y = int8_dot.int4_mm(x, layer.dot_weight, layer.dot_scales_mins, layer.group_size)
        return y.to(x.dtype)
    if x.device.type == "cpu" and layer.cpu_weight is not None:
        kernel_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        rows = x.reshape(-1, x.shape[-1]).to(kernel_dtype)  # (M, K)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, layer.cpu_weight, layer.group_size, layer.cpu_scales_zeros.to(kernel_dtype))
        return y.to(x.dtype).view(*x.shape[:-1], layer.out_features)
    w = dequantize_int4(layer.weight, layer.scales, layer.zeros)
    return F.linear(x, w.to(x.dtype))


class Int4Linear(nn.Module):
    """nn.Linear with an int4 weight: nibbles (out, in // 2) uint8, scales and zeros
    (out, in // group_size), optional bias. On CPU, pack_for_cpu adds the kernel's own
    layout as non-persistent buffers (not saved: it depends on the CPU)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 64,
                 bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2,
                                                   dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("zeros", torch.zeros(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("cpu_weight", None, persistent=False)
        self.register_buffer("cpu_scales_zeros", None, persistent=False)
        self.register_buffer("dot_weight", None, persistent=False)
        self.register_buffer("dot_scales_mins", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 64) -> "Int4Linear":
        layer = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None)
        q, scales, zeros = quantize_groupwise(linear.weight, group_size)
        float_kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight = pack_nibbles(q).to(linear.weight.device)
        layer.scales, layer.zeros = scales.to(**float_kw), zeros.to(**float_kw)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer.pack_for_cpu()

    @torch.no_grad()
    def pack_for_cpu(self) -> "Int4Linear":
        """Repack the nibbles for the int8 dot kernel (model/int8_dot.py) where it runs,
        else for _weight_int4pack_mm_for_cpu (N % 16 == 0 only; other layers and devices
        dequantize)."""
        if self.weight.device.type != "cpu":
            return self
        if int8_dot.available()[0] and int8_dot.fits(self.out_features, self.in_features,
                                                     self.group_size):
            q = unpack_nibbles(self.weight)
            self.dot_weight, self.dot_scales_mins = int8_dot.pack_int4(
                q, self.scales.float(), self.zeros.float() - 8 * self.scales.float())
        elif self.out_features % 16 == 0:
            q = unpack_nibbles(self.weight).to(torch.int32)  # (N, K)
            self.cpu_weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
            sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)  # (G, N, 2)
            self.cpu_scales_zeros = sz.to(torch.bfloat16).contiguous()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int4_matmul(x, self)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int4 group_size={self.group_size}")


class JointInt4(nn.Module):
    """Int4 layers that read one input (an attention's q, k, v; an MLP's gate, up), their
    int8 dot kernel weights stacked: one call instead of one each, the outputs split back
    (attention.project calls it). A call costs ~5 us whatever its size, and a b1 step of
    SmolLM2-135M made 210; the same rows, so the same outputs as the layers one by one."""

    def __init__(self, layers: list[Int4Linear]) -> None:
        super().__init__()
        self.sizes, self.group_size = [m.out_features for m in layers], layers[0].group_size
        self.register_buffer("dot_weight", torch.cat([m.dot_weight for m in layers]),
                             persistent=False)
        self.register_buffer("dot_scales_mins", torch.cat([m.dot_scales_mins for m in layers]),
                             persistent=False)
        bias = (None if all(m.bias is None for m in layers) else
                torch.cat([m.bias if m.bias is not None else m.scales.new_zeros(m.out_features)
                           for m in layers]))
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = int8_dot.int4_mm(x, self.dot_weight, self.dot_scales_mins, self.group_size)
        y = y.to(x.dtype) if self.bias is None else y.to(x.dtype) + self.bias
        return y.split(self.sizes, dim=-1)


def int4_on_dot(model: nn.Module) -> bool:
    """Whether model's int4 layers run the int8 dot kernel: packed for it alone or joined."""
    return any(isinstance(m, JointInt4) or (isinstance(m, Int4Linear) and
                                            m.dot_weight is not None) for m in model.modules())


JOINT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # layers reading one input


def join_projections(model: nn.Module) -> int:
    """Stack each group of JOINT whose layers are all Int4Linear packed for the int8 dot
    kernel into a JointInt4 on the group's first layer, in place (the layers' own packed
    copies are dropped: alone they fall back to dequantizing); how many groups."""
    joined = 0
    for module in list(model.modules()):
        for names in JOINT:
            layers = [getattr(module, name, None) for name in names]
            if all(isinstance(m, Int4Linear) and m.dot_weight is not None for m in layers) \
                    and len({m.group_size for m in layers}) == 1:
                layers[0].joint = JointInt4(layers)
                for m in layers:
                    m.dot_weight = m.dot_scales_mins = None
                joined += 1
    return joined


@torch.no_grad()
def dequantize_int4_layers(model: nn.Module) -> list[str]:
    """Replace each Int4Linear by an nn.Linear holding its dequantized weight in the scales'
    dtype, in place; their names. The fp32 path over int4's values, where no int4 kernel is
    faster (cpu_choice): the same function as Int4Linear's own dequantize path."""
    names = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int4Linear):
                w = dequantize_int4(child.weight, child.scales, child.zeros)
                linear = nn.Linear(child.in_features, child.out_features, child.bias is not None,
                                   device="meta")
                linear.weight = nn.Parameter(w.to(child.scales.dtype), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.clone(), requires_grad=False)
                setattr(parent, name, linear)
                names.append(f"{parent_name}.{name}" if parent_name else name)
    return names


# ---------------------------------------------------------------- the model

def as_spec(mode: "str | QuantSpec", group_size: int = 64) -> QuantSpec:
    """A QuantSpec as given, or the one a mode shorthand names."""
    return mode if isinstance(mode, QuantSpec) else QuantSpec.parse(mode, group_size)


def covered(model: Transformer, spec: QuantSpec) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of each nn.Linear that spec quantizes."""
    found = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, nn.Linear) and spec.bits(full):
                found.append((parent, name, full))
    return found


def replace_linears(model: Transformer, spec: QuantSpec, empty: bool = False) -> list[str]:
    """Swap each nn.Linear that spec covers for its quantized layer (empty: zeros, to be
    loaded into), in place; their names. int4 needs group_size to divide every int4
    layer's in_features: checked first, so a refused model is left as it was."""
    layers, group_size = covered(model, spec), spec.group_size
    for _, _, full in layers:
        k = model.get_submodule(full).in_features
        if spec.bits(full) == 4 and k % group_size:
            fits = [g for g in GROUP_SIZES if k % g == 0]
            raise QuantizeError(f"group_size={group_size} does not divide {full}'s "
                             f"{k} inputs: use group_size="
                             f"{' or '.join(map(str, fits)) or '(none fits: use int8)'}")
    for parent, name, full in layers:
        make = maker(spec.bits(full), group_size, empty)
        setattr(parent, name, make(getattr(parent, name)))
    if not empty:  # (an empty model is joined once its weights are loaded: store.quantize)
        join_projections(model)
    names = [full for _, _, full in layers]
    if "lm_head" in names:
        # the head now has its own quantized weight; the float embedding stays for the lookup
        model.config = dataclasses.replace(model.config, tie_embeddings=False)
    return names


def maker(bits: int, group_size: int, empty: bool = False):
    """linear -> its quantized layer in bits, 8 or 4 (empty: zeros, to be loaded into)."""
    if bits == 8:
        if empty:
            return lambda lin: Int8Linear(lin.in_features, lin.out_features, lin.bias is not None)
        return Int8Linear.from_linear
    if empty:
        return lambda lin: Int4Linear(lin.in_features, lin.out_features, group_size,
                                      lin.bias is not None)
    return functools.partial(Int4Linear.from_linear, group_size=group_size)


@torch.no_grad()
def quantize_model(model: Transformer, mode: "str | QuantSpec" = "int8",
                   group_size: int = 64) -> Transformer:
    """Quantize model's linear layers in place, as a QuantSpec or its mode shorthand says
    (int8/int4 = those of the blocks, int8_head/int4_head = also the output head,
    int4_int8head = int4 blocks and an int8 head; group_size: int4's inputs per scale).
    Layers already quantized are kept."""
    replace_linears(model, as_spec(mode, group_size))
    return model


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


def layer_bits(layer: nn.Module | None) -> int:
    return 4 if isinstance(layer, Int4Linear) else 8 if isinstance(layer, Int8Linear) else 0


def spec_of(model: nn.Module) -> QuantSpec | None:
    """What quantize_model did to model; None: nothing."""
    layers = quantized_layers(model)
    if not layers:
        return None
    head = layers.pop("lm_head", None)
    weight_bits = min((layer_bits(m) for m in layers.values()), default=8)
    return QuantSpec(weight_bits, layer_bits(head), group_size_of(model) or 64)


def quantization_of(model: nn.Module) -> str:
    """One of MODES, or 'none': what quantize_model did."""
    spec = spec_of(model)
    return "none" if spec is None else spec.mode


def group_size_of(model: nn.Module) -> int | None:
    sizes = {m.group_size for m in model.modules() if isinstance(m, Int4Linear)}
    return sizes.pop() if sizes else None


def describe(model: nn.Module) -> str:
    """The quantization for a report: 'int4 (group 64)', 'int8_head', 'none'."""
    mode, group = quantization_of(model), group_size_of(model)
    return mode if group is None else f"{mode} (group {group})"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights in memory, each shared (tied) tensor once."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())
