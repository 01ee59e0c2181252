"""The C++ kernels of decode on x86 CPUs, built once and loaded as torch ops:

    model/int8_dot.cpp           integer dot products for int4/int8 layers (model/int8_dot.py)
    model/decode_attention*.cpp  decode attention over the float and int8 KV caches
                                 (model/decode_attention.py)

They are compiled into one library per source, torch and compiler, in ~/.cache/gqalab/kernels
(or $GQALAB_KERNEL_CACHE), with the compiler torch.compile uses ($CXX, else g++), and loaded as
torch ops that dispatch without Python, so a compiled decode step calls them as extern
kernels. Each has an AVX-512 and an AVX2 body; which one runs follows torch's CPU capability
(ATEN_CPU_CAPABILITY=avx2 picks AVX2). No compiler, another CPU, a failed build or
GQALAB_KERNELS=0: available() says why and callers keep their other paths.

    available()   # (the kernels run here, a phrase for the report)
    ready         # set by a successful load(): a plain global, which dynamo reads as a constant
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

HERE = Path(__file__).parent
# (source, its own flags): the SIMD file is compiled once per ISA and includes no torch
SOURCES = [(HERE / "int8_dot.cpp", ()), (HERE / "decode_attention.cpp", ()),
           (HERE / "decode_attention_simd.cpp",
            ("-DGQALAB_ISA=avx512", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl",
             "-mfma")),
           (HERE / "decode_attention_simd.cpp", ("-DGQALAB_ISA=avx2", "-mavx2", "-mfma"))]
HEADERS = [HERE / "decode_attention.h"]
OPS = {"gqalab_int8_dot": ("int4_mm", "int8_mm"),
       "gqalab_attention": ("attend", "attend_int8")}
ready = False  # the ops are loaded
avx512 = False  # their isa argument


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
    text = b"".join(p.read_bytes() for p in sorted({s for s, _ in SOURCES} | set(HEADERS)))
    key = hashlib.sha256(text + torch.__version__.encode() + compiler.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("GQALAB_KERNEL_CACHE", "~/.cache/gqalab/kernels")).expanduser()
    return cache / f"gqalab-kernels-{key}.so"


def _run(cmds: list[list[str]]) -> None:
    """Run the compiler commands side by side; the first failure's stderr is raised."""
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for c in cmds]
    errors = [(p.communicate()[1], p.returncode) for p in procs]
    for (err, code), cmd in zip(errors, cmds):
        if code:
            raise subprocess.CalledProcessError(code, cmd, stderr=err)


def _build(out: Path) -> None:
    """Compile SOURCES into out; linked under a temporary name first, so a process that
    loads it never sees half a file."""
    from torch.utils import cpp_extension  # imported here: it is slow and only builds need it
    out.parent.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = cpp_extension.library_paths()
    common = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w",
              *(f"-I{p}" for p in cpp_extension.include_paths())]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objects = [f"{tmp}/{i}.o" for i in range(len(SOURCES))]
        _run([[cxx, str(src), *common, *flags, "-c", "-o", obj]
              for (src, flags), obj in zip(SOURCES, objects)])
        linked = f"{tmp}/lib.so"
        _run([[cxx, *objects, "-shared", "-fopenmp", *(f"-L{p}" for p in libs),
               *(f"-Wl,-rpath,{p}" for p in libs), "-lc10", "-ltorch_cpu", "-ltorch", "-o",
               linked]])
        os.replace(linked, out)


def _fake_mm(x: torch.Tensor, packed: torch.Tensor, *_) -> torch.Tensor:
    return x.new_empty(x.shape[0], packed.shape[0] * 16)  # 16 output rows per panel


def _fake_attend(q: torch.Tensor, *_) -> torch.Tensor:
    return torch.empty_like(q)


@functools.cache
def load() -> str | None:
    """Build (once) and load the ops; None, or why they cannot be used here."""
    if os.environ.get("GQALAB_KERNELS") == "0":
        return "turned off (GQALAB_KERNELS=0)"
    if isa() is None:
        return f"no AVX2 or AVX-512 VNNI ({torch.backends.cpu.get_cpu_capability()})"
    try:
        path = _library_path()
        if not path.exists():
            _build(path)
        torch.ops.load_library(str(path))
        for namespace, ops in OPS.items():
            fake = _fake_mm if namespace == "gqalab_int8_dot" else _fake_attend
            for op in ops:
                torch.library.register_fake(f"{namespace}::{op}")(fake)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return f"the kernels did not build: {detail.strip().splitlines()[-1] if detail else e}"
    global ready, avx512
    ready, avx512 = True, isa() == "avx512"
    return None


def available() -> tuple[bool, str]:
    """(the kernels can run here, why not)."""
    why_not = load()
    return why_not is None, why_not or f"C++ kernels ({isa()})"
