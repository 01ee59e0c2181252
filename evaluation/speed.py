"""Decode throughput of a model as the KV cache sees it: tokens/s after a long prefill."""
from __future__ import annotations

import math
import time

import torch

from model.sampling import SamplingConfig, stream
from model.transformer import Transformer


def decode_tok_s(model: Transformer, batch_size: int, context: int, new_tokens: int,
                 repeats: int) -> float:
    """Greedy decode throughput after a context-long prefill (timed from the first token,
    which the prefill yields): the regime where the KV cache's size matters. Best of
    repeats, as the CPU is shared."""
    prompt = torch.randint(0, model.config.vocab_size, (batch_size, context),
                           generator=torch.Generator().manual_seed(0))
    best = math.inf
    for _ in range(repeats):
        steps = stream(model.eval(), prompt, new_tokens, SamplingConfig(temperature=0))
        next(steps)  # prefill
        started = time.perf_counter()
        decoded = sum(1 for _ in steps)
        best = min(best, time.perf_counter() - started)
    return batch_size * decoded / best
