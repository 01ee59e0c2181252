"""Decode throughput of a model as the KV cache sees it: tokens/s after a long prefill."""
from __future__ import annotations

import math
import time

import torch

from model.sampling import (SamplingConfig, compile_decode, compiled_decode_step, new_cache,
                            stream)
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


@torch.inference_mode()
def compiled_step_tok_s(model: Transformer, batch_size: int, context: int, steps: int,
                        kv_cache: str = "float") -> float:
    """Decode tokens/s of the compiled decode step over a cache of `context` slots, without
    the prefill: a compiled step reads every slot whatever is filled (the cache never changes
    shape), so its cost at a context does not depend on what the slots hold. Steps run at the
    cache's last positions, one token per sequence each; compiling is not timed."""
    compile_decode(model, batch_size, context, kv_cache=kv_cache)
    cache = new_cache(model, batch_size, context, kind=kv_cache)
    step = compiled_decode_step(model)
    token = torch.zeros(batch_size, dtype=torch.long, device=model.device)
    pos = torch.tensor([context - steps], device=model.device)
    started = time.perf_counter()
    for _ in range(steps):
        token = step(model, token, pos, cache).argmax(-1)
        pos += 1
    return batch_size * steps / (time.perf_counter() - started)
