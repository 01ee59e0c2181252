"""The optimizer and its learning-rate schedule (one recipe for training and uptraining)."""
from __future__ import annotations

import math
from typing import Any

import torch


def lr_at(step: int, max_steps: int, optim: Any) -> float:
    """Linear warmup to optim.lr, then cosine to lr · min_lr_ratio at max_steps. A plain
    function of the step: nothing to save, nothing that steps once per process."""
    warmup = int(optim.warmup_frac * max_steps)
    if step < warmup:
        return optim.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    min_lr = optim.lr * optim.min_lr_ratio
    return min_lr + 0.5 * (optim.lr - min_lr) * (1 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, optim: Any, fused: bool = False) -> torch.optim.AdamW:
    """Decay matrices (projections, embedding); never norms' gains. fused: one kernel for
    all parameters (CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             fused=fused or None)
