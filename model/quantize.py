"""Int8 weight-only quantization for decode, and quantized checkpoints.

At batch 1 a decode step reads every weight once, so its speed is bounded by the bytes of
the weights. Int8 weights with one scale per output channel (symmetric, round to nearest)
read 4x fewer bytes than fp32. Activations, embeddings, norms and the KV cache stay in
float.

    python -m model.quantize ckpt=runs/x/checkpoints/step_1000 out=ckpts/x-int8 [mode=int8_head]
    python -m model.quantize --help  (a Hydra app: configs/quantize.yaml, QuantizeConfig below)

The matmul (int8_matmul) takes the fastest correct path measured on torch 2.13's CPU:
- bfloat16 activations on CPU: torch._weight_int8pack_mm (AVX512/AVX2 kernel), eager and
  compiled (inductor autotunes it against its own C++ GEMM template), where in_features is
  a multiple of 16 (the kernel has no remainder loop; int8pack_rows);
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
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from torch import nn

import cli
from data.tokenizer import tokenizer_files
from model.checkpoint import (QUANTIZED, Checkpoint, CheckpointError, check_out,
                              load_checkpoint, model_from_state, read_config, read_meta,
                              read_weights, save_checkpoint)
from model.transformer import Transformer

MODES = ("int8", "int8_head")  # the blocks' linear layers; and the output head too
TRAIN_CONFIG = "train_config.yaml"


# ---------------------------------------------------------------- the arithmetic

def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (N, K) float -> int8 (N, K), fp32 scales (N,): weight ~= int8 * scales[:, None].
    scale = max|row| / 127, so nothing clips and |weight - dequantized| <= scale / 2."""
    w = weight.detach().float()
    scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scales[:, None]).to(torch.int8), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]  # (N, K)


def int8pack_rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) as the rows (M, K) torch._weight_int8pack_mm's CPU kernel can read. Its
    AVX512 loop takes each row 16 values at a time with aligned 32-byte loads and no
    remainder (AVX2: 8 and 16 bytes), so K % 16 == 0 (the caller checks) and every row
    32-byte aligned: a view that is not (an offset, an odd row stride) faults or reads
    garbage, so it is copied to a fresh (64-byte aligned) tensor. N and M may be anything:
    it tiles them by 4 with remainders. Compiled, inductor passes its own buffers."""
    rows = x.reshape(-1, x.shape[-1])  # (M, K)
    if not torch.compiler.is_compiling() and (rows.data_ptr() % 32 or rows.stride(0) % 16):
        rows = rows.clone(memory_format=torch.contiguous_format)
    return rows


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) float @ weight (N, K) int8 with per-row scales (N,) -> (..., N) in x's
    dtype. The path per device and dtype is explained in the module docstring."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[-1] % 16 == 0:
        y = torch._weight_int8pack_mm(int8pack_rows(x), weight, scales.to(x.dtype))
        return y.view(*x.shape[:-1], weight.shape[0])
    if torch.compiler.is_compiling() and x.dtype == torch.float32:
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

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, scales = quantize_per_channel(linear.weight)
        float_kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight, layer.scales = q.to(linear.weight.device), scales.to(**float_kw)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.weight, self.scales)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 per-channel")


# ---------------------------------------------------------------- the model

def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r} is unknown: use int8 (the blocks' linear layers) "
                         f"or int8_head (those and the output head)")


def replace_linears(model: Transformer, mode: str, make) -> list[str]:
    """Swap each nn.Linear that mode covers for make(linear), in place; their names."""
    check_mode(mode)
    names = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            full = f"{parent_name}.{name}" if parent_name else name
            if isinstance(child, nn.Linear) and (full != "lm_head" or mode == "int8_head"):
                setattr(parent, name, make(child))
                names.append(full)
    if "lm_head" in names:
        # the head now has its own int8 weight; the float embedding stays for the lookup
        model.config = dataclasses.replace(model.config, tie_embeddings=False)
    return names


def empty_int8(linear: nn.Linear) -> Int8Linear:
    return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None)


@torch.no_grad()
def quantize_model(model: Transformer, mode: str = "int8") -> Transformer:
    """Quantize model's linear layers to int8 in place (mode: int8 = those of the blocks,
    int8_head = also the output head); layers already int8 are kept. Returns model."""
    replace_linears(model, mode, Int8Linear.from_linear)
    return model


def quantization_of(model: nn.Module) -> str:
    """'none', 'int8' or 'int8_head': what quantize_model did to model."""
    layers = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    return "none" if not layers else "int8_head" if "lm_head" in layers else "int8"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights in memory, each shared (tied) tensor once."""
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ---------------------------------------------------------------- checkpoints

def is_quantized(path: str | Path) -> bool:
    return QUANTIZED in read_meta(path)


def save_quantized(path: str | Path, model: Transformer, meta: dict | None = None,
                   files: dict | None = None, overwrite: bool = False) -> Path:
    """A checkpoint dir of model as quantize_model left it: int8 weights and their scales
    in model.safetensors, the mode in meta.json, so loading does not quantize again."""
    mode = quantization_of(model)
    if mode == "none":
        raise CheckpointError("the model is not quantized: call quantize_model first")
    layers = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    meta = {**(meta or {}), QUANTIZED: {"mode": mode, "layers": len(layers),
                                       "scheme": "int8 weight-only, symmetric per-channel"}}
    return save_checkpoint(path, model, meta, files, overwrite=overwrite)


def load_quantized(path: str | Path, device: torch.device | str = "cpu",
                   dtype: torch.dtype | None = None) -> Checkpoint:
    """Load a save_quantized checkpoint: int8 weights as stored (never re-quantized),
    floats converted to dtype. Executes no code: safetensors and JSON only."""
    path = Path(path)
    meta = read_meta(path)
    mode = meta.get(QUANTIZED, {}).get("mode")
    if mode not in MODES:
        raise CheckpointError(f"{path} is not a quantized checkpoint (meta.json has no "
                              f"{QUANTIZED}.mode in {MODES})")
    state = read_weights(path)

    def build(cfg):  # int8 layers where the checkpoint has them, so no float copy is made
        model = Transformer(cfg)
        for name in replace_linears(model, mode, empty_int8):
            if state.get(f"{name}.weight", torch.empty(0, dtype=torch.int8)).dtype != torch.int8:
                raise CheckpointError(f"{path}: {name}.weight is {state[f'{name}.weight'].dtype}"
                                      f", a quantized checkpoint stores it as int8")
        return model
    model = model_from_state(read_config(path), state, path, dtype, build).to(device)
    return Checkpoint(model.eval(), model.config, path, meta)


def quantize_checkpoint(src: str | Path, out: str | Path, mode: str = "int8",
                        overwrite: bool = False) -> Path:
    """Write a quantized copy of float checkpoint src at out, tokenizer and train config
    included, provenance in meta.json."""
    src, out = Path(src), Path(out)
    check_mode(mode)
    check_out(src, out, overwrite, "int8")
    if (src / "meta.json").is_file() and is_quantized(src):
        raise CheckpointError(f"{src} is already quantized: pass the float checkpoint")
    ckpt = load_checkpoint(src)
    model = quantize_model(ckpt.model.float(), mode)
    meta = {**ckpt.meta, "quantized_from": str(src.resolve())}
    files = tokenizer_files(src)  # the tokenizer travels whole: model file and its configs
    if (src / TRAIN_CONFIG).is_file():
        files[TRAIN_CONFIG] = src / TRAIN_CONFIG
    return save_quantized(out, model, meta, files, overwrite=overwrite)


@dataclass
class QuantizeConfig:
    """python -m model.quantize's options (configs/quantize.yaml; --help describes them)."""
    ckpt: str = MISSING  # a float gqalab checkpoint dir
    out: str = MISSING  # the new, quantized checkpoint dir
    mode: str = "int8"  # int8 | int8_head (MODES)
    overwrite: bool = False  # replace an existing out


ConfigStore.instance().store(name="quantize_schema", node=QuantizeConfig)


@cli.hydra_main(config_path="../configs", config_name="quantize")
def command(cfg: DictConfig) -> None:
    cli.require(cfg)
    args: QuantizeConfig = OmegaConf.to_object(cfg)
    if args.mode not in MODES:
        raise cli.UserError(f"mode={args.mode!r} is unknown: use int8 (the blocks' linear "
                            f"layers) or int8_head (those and the output head)")
    out = quantize_checkpoint(args.ckpt, args.out, args.mode, args.overwrite)
    model = load_quantized(out).model
    print(f"wrote {out}: {args.mode} weights, {weight_bytes(model) / 2**20:,.2f} MiB "
          f"(from {args.ckpt})")


def main(argv: list[str] | None = None) -> int:
    """`python -m model.quantize key=value ...` (argv: those arguments); the exit status."""
    return cli.run_app(command, argv)


if __name__ == "__main__":
    sys.exit(main())
