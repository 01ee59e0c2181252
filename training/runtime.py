"""The process around train.py's loop: the Accelerator (precision, FSDP policy, trackers),
torch.compile, the device's peak for MFU, and the stop signals a preempted job receives.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from omegaconf import DictConfig, OmegaConf
from torch.distributed.fsdp import FSDPModule

from model.transformer import Block


def make_accelerator(cfg: Any, run_dir: Path) -> Accelerator:
    precision = cfg.mixed_precision
    if precision == "auto":  # bf16 autocast on a CPU without AMX is ~7x slower than fp32
        precision = "bf16" if torch.cuda.is_available() else "no"
    if torch.cuda.is_available():  # TF32 tensor cores for what still runs in fp32
        torch.set_float32_matmul_precision("high")
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                              log_with="wandb" if cfg.logger.backend == "wandb" else None,
                              project_dir=str(run_dir),
                              fsdp_plugin=fsdp_plugin(precision, cfg.fsdp_reduce_dtype))
    # model.safetensors is the checkpoint's weights: keep them out of Accelerate's state.
    accelerator.register_save_state_pre_hook(lambda models, weights, out: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, inp: models.clear())
    return accelerator

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

def fsdp_plugin(precision: str, reduce: str) -> FullyShardedDataParallelPlugin | None:
    """Under an FSDP launch in bf16/fp16: compute in that dtype, gradients reduce-scattered
    in fp32 (reduce="fp32") or in the compute dtype (reduce="compute": half the traffic).
    Accelerate 1.15 would derive reduce_dtype = param_dtype, and a bf16 sum over 8+ ranks
    loses precision (PyTorch's FSDP2 docs and torchtitan reduce in fp32 by default).
    Everything else the plugin reads from the launcher's FSDP_* variables, as Accelerate's
    own default plugin does. None: not FSDP (the same test Accelerate makes), or fp32."""
    fsdp_launch = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if precision not in HALF_DTYPES or not fsdp_launch:
        return None
    compute = HALF_DTYPES[precision]
    return FullyShardedDataParallelPlugin(mixed_precision_policy={
        "param_dtype": compute, "output_dtype": compute,
        "reduce_dtype": torch.float32 if reduce == "fp32" else compute})

def fsdp_precision(model: torch.nn.Module) -> str | None:
    """The dtypes FSDP2 applies to the sharded blocks, read back from a block (what ran, not
    what was asked); None when the blocks are not FSDP2-sharded."""
    block = next((m for m in model.modules() if isinstance(m, Block) and isinstance(m, FSDPModule)),
                 None)
    state = getattr(block, "_get_fsdp_state", None)  # private: torch 2.13 has no public getter
    policy = getattr(state(), "_mp_policy", None) if state is not None else None
    if policy is None:  # not FSDP2, or a torch that moved it: say nothing rather than fail
        return None
    weights = next(block.parameters()).dtype  # the sharded master copy
    compute = policy.param_dtype or weights
    reduce = policy.reduce_dtype or compute  # FSDP2 reduces in the gradient's dtype if unset
    weights, compute, reduce = (str(d).removeprefix("torch.") for d in (weights, compute, reduce))
    return (f"FSDP2 mixed precision: weights and AdamW {weights}, compute {compute}, "
            f"gradient reduce-scatter {reduce}")

# Dense bf16 tensor-core peaks, TFLOP/s per device (vendor datasheets); matched in order
# against torch.cuda.get_device_name(). Anything else: set peak_tflops.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
                   ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
                   ("L4", 121.0))

def peak_tflops(configured: float | None, device: torch.device, precision: str) -> float | None:
    """The per-device peak MFU is measured against: the configured one if set, else a known
    GPU's bf16 peak when training in bf16/fp16; None (no MFU) otherwise, e.g. on CPU."""
    if configured is not None:
        return configured
    if device.type != "cuda" or precision == "no":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_TFLOPS if key in name), None)

def use_compile(cfg: Any, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.compile == "auto" else cfg.compile == "true"

def is_fsdp(accelerator: Accelerator) -> bool:
    """Sharded parameters: every rank must join each forward (eval, sampling, saving)."""
    return accelerator.distributed_type == DistributedType.FSDP

def start_trackers(accelerator: Accelerator, cfg: DictConfig, run_dir: Path) -> None:
    if cfg.logger.backend != "wandb":
        return
    w = cfg.logger.wandb
    mode = w.mode or os.environ.get("WANDB_MODE") or "offline"
    accelerator.init_trackers(w.project, config=OmegaConf.to_container(cfg, resolve=True),
                              init_kwargs={"wandb": {"mode": mode, "dir": str(run_dir),
                                                     "name": w.name or run_dir.name,
                                                     "entity": w.entity, "tags": list(w.tags)}})


# ---------------------------------------------------------------- preemption

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# A run stopped by a signal, its checkpoint written, exits 143 = 128 + SIGTERM: what a shell
# reports for a process SIGTERM killed, so whatever already treats that as "preempted, run
# again" (a Kubernetes podFailurePolicy, AWS Batch retry rules, a SLURM script) treats a
# graceful stop alike. One status for all three signals; 0 finished, 1 a crash, 2 refused.
REQUEUE_STATUS = 143

class GracefulStop:
    """on_signal=checkpoint: SIGTERM, SIGINT or SIGUSR1 only sets a flag; the loop finishes
    the optimizer step in flight, every rank agrees on the step (requested()), and that step
    is checkpointed. A second signal takes the signal's default action at once (kill): an
    impatient Ctrl-C or a scheduler's follow-up is obeyed, and the atomic checkpoint publish
    leaves `latest` at the last complete checkpoint. on_signal=exit: default actions only."""

    def __init__(self, on_signal: str):
        self.enabled = on_signal == "checkpoint"
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "GracefulStop":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second: no more grace
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signum = signum

    def requested(self, accelerator: Accelerator) -> str | None:
        """The name of a signal any rank received (one all-reduce of a scalar per step
        when there are several processes), else None."""
        signum = self.signum or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor([signum], device=accelerator.device, dtype=torch.int32)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signal.Signals(signum).name if signum else None
