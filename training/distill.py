"""Distillation from the unconverted model during uptraining (DHA, arXiv 2406.06567;
X-EcoMLA): the source's full next-token distributions carry far more signal per token than
the one-hot targets.

    loss = (1 - λ) · CE(student, targets) + λ · τ² · KL(teacher_τ ‖ student_τ)

with p_τ = softmax(logits / τ), the KL averaged over tokens like the CE, and τ² keeping
its gradient's scale independent of τ (Hinton et al. 2015). The teacher is the source
before conversion: init_from itself, or, when init_from is a convert output (its
meta.json's converted_from), that conversion's source, checked against the recorded hash.
It is frozen, in eval mode, and runs on the student's own micro-batches under the same
autocast (in the autocast dtype's weights when training in bf16/fp16: half the memory).

Under DDP and FSDP the teacher is replicated, one full copy per process, and never
wrapped: it has no gradients to synchronise, so DDP would add nothing, and a sharded
teacher would all-gather its every weight on every forward, doubling the forward's
communication, to save memory the student's training state dwarfs (16 bytes/param of fp32
weights, gradients and AdamW moments, sharded, against 2 bytes/param for a bf16 teacher).
A teacher too large for one device in bf16 is out of scope.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from store.checkpoint import CheckpointError
from store.source import FLOAT, Source, SourceError, open_source

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² · KL(softmax(teacher/τ) ‖ softmax(student/τ)), summed over the vocabulary and
    averaged over tokens; logits (..., V), computed in fp32."""
    s = F.log_softmax(student.float().flatten(0, -2) / tau, dim=-1)  # (N, V)
    t = F.log_softmax(teacher.float().flatten(0, -2) / tau, dim=-1)
    return tau ** 2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


def mix(ce: torch.Tensor, kl: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 - λ) CE + λ τ²KL (kl_loss already carries τ²)."""
    return (1 - lam) * ce + lam * kl


def teacher_source(init_from: str | Path) -> Source:
    """The unconverted model behind init_from: the source convert recorded (unchanged
    since, by its weights' sha256), or init_from itself."""
    student = open_source(init_from, "init_from", FLOAT)
    recorded = student.meta.get("converted_from")
    if not recorded:
        return student
    source = Path(recorded["path"])
    if not source.exists() and "hub" in recorded:  # a Hub snapshot gone from this cache
        source = recorded["hub"]
    try:
        teacher = open_source(source, "init_from", FLOAT)
        whole = all(f.is_file() for f in teacher.weight_files())
    except (SourceError, CheckpointError):  # a HubError says itself how to get it back
        whole = False
    if not whole:
        raise CheckpointError(f"distillation needs {init_from}'s source {source} (its teacher), "
                              f"which is gone: restore it or set uptrain.distill=0")
    if teacher.weights_sha256() != recorded["weights_sha256"]:
        raise CheckpointError(f"{source} changed since {init_from} was converted from it: it is "
                              f"no longer the teacher; set uptrain.distill=0 or reconvert")
    return teacher


class Teacher:
    """The frozen source and the distillation loss; counts its time and the KL for the
    train records."""

    def __init__(self, model: torch.nn.Module, source: Path, lam: float, tau: float,
                 accelerator: Any) -> None:
        self.model, self.source, self.lam, self.tau = model, source, lam, tau
        self.accelerator = accelerator
        self.micro_batches = 0
        self.bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.kl_sum = torch.zeros((), device=accelerator.device)
        self.seconds = 0.0
        self.logits_bytes = 0  # its (B, T, V) output per micro-batch: the rest is transient

    def loss(self, ce: torch.Tensor, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate for one micro-batch: ce, the student's logits (B, T, V)
        on inputs x (B, T)."""
        started = self.sync_time()
        with torch.no_grad(), self.accelerator.autocast():
            teacher = self.model(x.to(self.accelerator.device))  # (B, T, V)
        self.seconds += self.sync_time() - started
        self.logits_bytes = teacher.numel() * teacher.element_size()
        kl = kl_loss(logits, teacher, self.tau)
        self.kl_sum += kl.detach()
        self.micro_batches += 1
        return mix(ce, kl, self.lam)

    def sync_time(self) -> float:
        if self.accelerator.device.type == "cuda":  # the forward's time, not its launch's
            torch.cuda.synchronize(self.accelerator.device)
        return time.perf_counter()

    def record(self, grad_accum: int) -> dict:
        """The train record's distillation fields since the last one (then reset): the mean
        τ²·KL per micro-batch over processes, the teacher's seconds per optimizer step
        (this process), the bytes of its weights and of its logits per micro-batch."""
        n = max(self.micro_batches, 1)
        kl = self.accelerator.reduce(self.kl_sum / n, "mean").item()
        out = {"distill_kl": kl, "teacher_s_per_step": self.seconds * grad_accum / n,
               "teacher_bytes": self.bytes, "teacher_logits_bytes": self.logits_bytes}
        self.kl_sum.zero_()
        self.seconds, self.micro_batches = 0.0, 0
        return out

    def describe(self, batch_size: int, seq_len: int, grad_accum: int) -> str:
        """The startup line: what the teacher costs per process, from one timed forward on
        a micro-batch of the run's shape (its peak memory too, on CUDA)."""
        x = torch.zeros(batch_size, seq_len, dtype=torch.long)
        cuda = self.accelerator.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.accelerator.device)
            before = torch.cuda.memory_allocated(self.accelerator.device)
        started = self.sync_time()
        with torch.no_grad(), self.accelerator.autocast():
            logits = self.model(x.to(self.accelerator.device))
        seconds = self.sync_time() - started
        peak = (f", {(torch.cuda.max_memory_allocated(self.accelerator.device) - before) / 2**20:,.0f} "
                f"MiB peak in its forward" if cuda else "")
        mib = lambda n: f"{n / 2 ** 20:,.1f} MiB"
        return (f"distill: λ={self.lam} τ={self.tau}, teacher {self.source} (replicated, "
                f"frozen): {mib(self.bytes)} of {next(self.model.parameters()).dtype} weights "
                f"per process, {mib(logits.numel() * logits.element_size())} of logits per "
                f"micro-batch{peak}; {seconds * grad_accum:.3f} s per step (one timed forward; "
                f"measured ones in metrics.jsonl: teacher_s_per_step)")


def build_teacher(cfg: Any, accelerator: Any) -> Teacher | None:
    """The teacher for cfg.uptrain.distill > 0, on the accelerator's device; None at λ = 0
    (nothing is loaded: the run is exactly a plain uptraining)."""
    if not cfg.uptrain.distill:
        return None
    source = teacher_source(cfg.init_from)
    dtype = HALF.get(accelerator.mixed_precision, torch.float32)
    model = source.load(accelerator.device, dtype).requires_grad_(False)
    return Teacher(model, source.path, cfg.uptrain.distill, cfg.uptrain.distill_temperature,
                   accelerator)
