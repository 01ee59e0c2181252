"""Integer dot-product kernels for int4 and int8 layers on x86 CPUs (model/int8_dot.cpp).

Weight-only kernels convert every weight to float before multiplying, and at batch 1 on two
cores that conversion, not memory, bounds them (torch's int4 and int8 kernels read at 9-18
GB/s where an fp32 GEMV reads 24). These kernels do what llama.cpp does instead: quantize
the activations to int8 per block of 32 inputs and multiply bytes by bytes (AVX-512 VNNI's
vpdpbusd, AVX2's maddubs), 16 output rows per instruction, fp32 out. Unlike llama.cpp, each
activation is two int8 parts, the rounded value and its rounded remainder (x ~= d * (hi +
lo / 254), d = max|block| / 127): two byte products per weight, which VNNI affords where a
b1 step waits on memory, for an activation error of at most d / 508 (one int8 alone cost
SmolLM2-135M 0.8% perplexity at int4_int8head; bf16 activations, torch's kernels, 0.1%).

    available()                     # built, loaded and usable on this CPU (or why not)
    pack_int4(q, scales, minimums)  # the kernel's layouts, from plain quantized weights
    int4_mm(x, packed, scales_mins, group_size) / int8_mm(x, packed, scales)

The C++ is compiled once per source, torch and compiler into ~/.cache/gqalab/kernels (or
$GQALAB_KERNEL_CACHE) with the compiler torch.compile uses ($CXX, else g++), and loaded as
torch ops (gqalab_int8_dot::int4_mm, ::int8_mm) that dispatch without Python, so a compiled
decode step calls them as extern kernels. Each function has an AVX-512 VNNI and an AVX2
body; which one runs follows torch's CPU capability (ATEN_CPU_CAPABILITY=avx2 picks AVX2).
No compiler, another CPU, or a failed build: available() says why and callers keep their
other paths.
"""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("int8_dot.cpp")
PANEL, BLOCK = 16, 32  # output rows per packed panel; activation inputs per int8 scale
# set by a successful load(): plain globals, which dynamo reads as constants
ready = False  # the ops are loaded
_avx512 = False  # their isa argument


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@functools.cache
def isa() -> str | None:
    """'avx512' (AVX-512 with VNNI), 'avx2', or None: which body runs on this CPU, as far as
    torch's capability (ATEN_CPU_CAPABILITY included) allows."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512" and "avx512_vnni" in _cpu_flags():
        return "avx512"
    return "avx2" if capability in ("AVX2", "AVX512") else None


def _library_path() -> Path:
    compiler = os.environ.get("CXX", "g++")
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() +
                         compiler.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("GQALAB_KERNEL_CACHE", "~/.cache/gqalab/kernels")).expanduser()
    return cache / f"int8_dot-{key}.so"


def _build(out: Path) -> None:
    """Compile SOURCE into out; written to a temporary name first, so a process that loads
    it never sees half a file."""
    from torch.utils import cpp_extension  # imported here: it is slow and only builds need it
    out.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = cpp_extension.library_paths()
    cmd = [os.environ.get("CXX", "g++"), str(SOURCE), "-O3", "-std=c++17", "-shared", "-fPIC",
           "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
           *(f"-I{p}" for p in cpp_extension.include_paths()),
           *(f"-L{p}" for p in libs), *(f"-Wl,-rpath,{p}" for p in libs),
           "-lc10", "-ltorch_cpu", "-ltorch"]
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        cmd += ["-o", tmp.name]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp.name, out)
    finally:
        Path(tmp.name).unlink(missing_ok=True)


@functools.cache
def load() -> str | None:
    """Build (once) and load the ops; None, or why they cannot be used here."""
    if os.environ.get("GQALAB_INT8_DOT") == "0":
        return "turned off (GQALAB_INT8_DOT=0)"
    if isa() is None:
        return f"no AVX2 or AVX-512 VNNI ({torch.backends.cpu.get_cpu_capability()})"
    try:
        path = _library_path()
        if not path.exists():
            _build(path)
        torch.ops.load_library(str(path))
        for op in ("int4_mm", "int8_mm"):
            torch.library.register_fake(f"gqalab_int8_dot::{op}")(_fake)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return f"the kernels did not build: {detail.strip().splitlines()[-1] if detail else e}"
    global ready, _avx512
    ready, _avx512 = True, isa() == "avx512"
    return None


def available() -> tuple[bool, str]:
    """(the kernels can run here, a phrase for the report)."""
    why_not = load()
    return why_not is None, why_not or f"int8 dot products ({isa()})"


def _fake(x: torch.Tensor, packed: torch.Tensor, *_) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0] * PANEL)


def fits(n: int, k: int, group_size: int = BLOCK) -> bool:
    """A layer with n outputs and k inputs fits the kernels' panels and blocks."""
    return n % PANEL == 0 and k % BLOCK == 0 and group_size % BLOCK == 0


def pack_int4(q: torch.Tensor, scales: torch.Tensor,
              minimums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (N, K) uint8 in 0..15, scales and minimums (N, G) with weight = q * scale + minimum
    -> the int4 kernel's nibbles (N/16, K/8, 16, 4) and fp16 (N/16, G, 2, 16) as int16."""
    N, K = q.shape
    panels = q.view(N // PANEL, PANEL, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # (P, K/8, 16, 4, 2)
    nibbles = (panels[..., 0] | (panels[..., 1] << 4)).contiguous()
    pair = torch.stack([scales, minimums], dim=-1).float()  # (N, G, 2)
    scales_mins = pair.view(N // PANEL, PANEL, -1, 2).permute(0, 2, 3, 1)  # (P, G, 2, 16)
    # fp16 bits held as int16, so that model.to(dtype) leaves them alone
    return nibbles, scales_mins.to(torch.float16).contiguous().view(torch.int16)


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8 -> the int8 kernel's (N/16, K/4, 16, 4)."""
    N, K = q.shape
    return q.view(N // PANEL, PANEL, K // 4, 4).permute(0, 2, 1, 3).contiguous()


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) -> the values the kernels multiply x as, fp32 (tests; the kernels quantize
    inside): per block of 32, d = max|x| / 127, t = x / d, hi = round(t) and lo =
    round((t - hi) * 254), both int8; x ~= d * (hi + lo / 254), within d / 508."""
    blocks = x.float().view(x.shape[0], -1, BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    t = blocks * torch.where(d > 0, 1 / d, 0)
    hi = torch.round(t)
    lo = torch.round((t - hi) * 254).clamp(-127, 127)
    return ((hi * 254 + lo) * (d / 254)).view_as(x)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).float().contiguous()


def int4_mm(x: torch.Tensor, nibbles: torch.Tensor, scales_mins: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x (..., K) float @ a packed int4 weight -> (..., N) fp32."""
    y = torch.ops.gqalab_int8_dot.int4_mm(_rows(x), nibbles, scales_mins, group_size,
                                          _avx512)
    return y.view(*x.shape[:-1], -1)


def int8_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) float @ a packed int8 weight with per-row fp32 scales -> (..., N) fp32."""
    y = torch.ops.gqalab_int8_dot.int8_mm(_rows(x), packed, scales.float(), _avx512)
    return y.view(*x.shape[:-1], -1)
