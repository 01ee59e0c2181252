"""Generation: prefill, decode steps over a KVCache, and temperature/top-k/top-p sampling."""
from __future__ import annotations

import functools
import types
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from model.kv_cache import KVCache, QuantizedKVCache
from model.transformer import Transformer


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1.0 means no nucleus filter

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept)."""
    kth = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, cfg: SamplingConfig,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        logits = filter_top_k(logits, cfg.top_k)
    if cfg.top_p < 1:
        logits = filter_top_p(logits, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def prefill(model: Transformer, tokens: torch.Tensor, cache: KVCache,
            chunk_size: int = 0, start: int = 0) -> torch.Tensor:
    """Run the prompt (B, T) through the model at positions start.., filling the cache;
    logits of the last position (B, V). chunk_size > 0 bounds activation memory for
    long prompts."""
    if start + tokens.shape[1] > cache.max_len:
        raise ValueError(f"KV cache full: {start + tokens.shape[1]} positions > max_len "
                         f"{cache.max_len}")
    for chunk in tokens.split(chunk_size, dim=1) if chunk_size else (tokens,):
        end = start + chunk.shape[1]
        input_pos = torch.arange(start, end, device=tokens.device)
        logits = model(chunk, cache, input_pos, last_only=True, kv_len=end)
        start = end
    return logits[:, -1]


def _decode(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor,
            cache: KVCache, kv_len: int | None = None) -> torch.Tensor:
    """One new token per sequence (B,) at position input_pos (1,) -> next logits (B, V).
    Eager callers pass kv_len = position + 1 to read only the filled slots."""
    return model(token[:, None], cache, input_pos, kv_len=kv_len)[:, -1]


decode_step = torch.inference_mode()(_decode)


_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its step


def compiled_decode_step(model: Transformer):
    """_decode compiled for this model alone: called as step(model, token, input_pos, cache),
    one static graph per batch and cache length (positions are a tensor, the cache never
    changes shape). The weights are frozen into the graph, so inductor prepacks them for
    its GEMMs and autotunes those against ATen's: on CPU that is 2-3x faster per step than
    eager ATen, whose fp32 GEMV reads weights at well under the memory bandwidth. Costs
    tens of seconds of compiling per new shape, and being frozen, is for weights that no
    longer change.

    A step of its own per model, because dynamo's guards on the model's modules (every
    submodule's attributes, each call) cost 0.5-1 ms of a 9-14 ms step at batch 1
    (SmolLM2-135M int4_int8head: 1.10x with them skipped at two threads, 1.03x at one,
    interleaved in one process): they are skipped, which is safe only while no other model
    reaches the graph. So each model gets its own copy of _decode's code object (dynamo keeps its
    graphs per code object) and a step refuses any other model."""
    step = _compiled_steps.get(model)
    if step is None:
        step = _compiled_steps[model] = _compile_step(weakref.ref(model))
    return step


def _compile_step(owner: weakref.ref):
    own_decode = types.FunctionType(_decode.__code__.replace(), _decode.__globals__, "_decode",
                                    _decode.__defaults__)
    compiled = torch.compile(own_decode, fullgraph=True, dynamic=False, options={
        "max_autotune": True,
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})

    @functools.wraps(_decode)
    def step(model, *args):
        if model is not owner():
            raise ValueError("this compiled decode step belongs to another model: "
                             "use compiled_decode_step(model)")
        # freezing is read outside torch.compile's options, so it is patched here, around
        # every call: a recompile (new shape) must freeze too. The autotuner's tables
        # would otherwise land in the middle of a streamed sample.
        with torch._inductor.config.patch(freezing=True, autotune_num_choices_displayed=0,
                                          max_autotune_report_choices_stats=False), \
                warnings.catch_warnings():
            # the autotuner's benchmark of torch's int4 kernel calls the deprecated
            # TypedStorage API; the warning would land in a streamed sample
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            return compiled(model, *args)
    return step


def kv_dtype(model: Transformer) -> torch.dtype:
    """The dtype attention's K/V come out in: autocast's where it is on for the model's
    device (train.py samples fp32 weights under bf16 autocast), else the weights'. A cache
    in it holds exactly what the uncached forward attends to, at half fp32's bytes."""
    device = model.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return model.embed.weight.dtype


KV_CACHES = {"float": KVCache, "int8": QuantizedKVCache}


def new_cache(model: Transformer, batch_size: int, max_len: int,
              dtype: torch.dtype | None = None, kind: str = "float") -> KVCache:
    """kind: float (K/V in dtype) or int8 (QuantizedKVCache: int8 with a full-precision
    window of the newest tokens in dtype)."""
    if kind not in KV_CACHES:
        raise ValueError(f"kv_cache={kind!r} is unknown: use {' or '.join(KV_CACHES)}")
    return KV_CACHES[kind].for_model(model.config, batch_size, max_len,
                                     dtype or kv_dtype(model), model.device)


@torch.inference_mode()
def compile_decode(model: Transformer, batch_size: int, max_len: int,
                   cache_dtype: torch.dtype | None = None, kv_cache: str = "float") -> None:
    """Compile the decode step for the shapes stream(compile=True) will use with this
    batch, max_len (prompt + new tokens) and kind of cache, so timing afterwards excludes
    compiling."""
    cache = new_cache(model, batch_size, max_len, cache_dtype, kv_cache)
    token = torch.zeros(batch_size, dtype=torch.long, device=model.device)
    compiled_decode_step(model)(model, token, torch.tensor([0], device=model.device), cache)


def check_length(model: Transformer, prompt_len: int, max_new_tokens: int) -> None:
    limit = model.config.max_seq_len
    if prompt_len + max_new_tokens > limit:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the model's context of {limit}: shorten the prompt or "
                         f"lower max_new_tokens")


def as_batch(prompt: torch.Tensor | list[int], num_samples: int, device) -> torch.Tensor:
    prompt = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if prompt.dim() == 1:
        prompt = prompt[None].expand(num_samples, -1)
    if prompt.shape[1] == 0:
        raise ValueError("empty prompt: give at least one token (e.g. the BOS id)")
    return prompt.contiguous()  # (B, T)


def stop_tensor(eos_id: int | Sequence[int] | None, device) -> torch.Tensor | None:
    """The ids that end a sequence (an EOS id, or several: EOS and a chat's end of turn)."""
    if eos_id is None or (not isinstance(eos_id, int) and len(eos_id) == 0):
        return None
    return torch.as_tensor(eos_id, dtype=torch.long, device=device).reshape(-1)


def mark_finished(token: torch.Tensor, done: torch.Tensor,
                  stop: torch.Tensor | None) -> torch.Tensor:
    """Sequences that already ended keep emitting the first stop id; updates done in place."""
    if stop is None:
        return token
    token = token.masked_fill(done, stop[0])
    done |= torch.isin(token, stop)
    return token


@torch.inference_mode()
def stream(model: Transformer, prompt: torch.Tensor | list[int], max_new_tokens: int,
           sampling: SamplingConfig = SamplingConfig(), num_samples: int = 1,
           eos_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
           cache_dtype: torch.dtype | None = None, compile: bool = False,
           kv_cache: str = "float") -> Iterator[torch.Tensor]:
    """Yield the next token of every sequence (B,) as it is produced.

    A 1-D prompt is repeated num_samples times; a 2-D prompt (B, T) is used as is.
    eos_id: one id or several (any of them ends a sequence). Sequences that emitted one keep
    yielding the first; the stream ends when all have.
    compile=True decodes with compiled_decode_step (the prefill stays eager).
    kv_cache: "float" or "int8" (new_cache).
    """
    tokens = as_batch(prompt, num_samples, model.device)
    check_length(model, tokens.shape[1], max_new_tokens)
    cache = new_cache(model, tokens.shape[0], tokens.shape[1] + max_new_tokens, cache_dtype,
                      kv_cache)
    logits = prefill(model, tokens, cache)
    compiled = compiled_decode_step(model) if compile else None
    pos = tokens.shape[1]
    input_pos = torch.tensor([pos], device=model.device)  # advanced in place
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=model.device)
    stop = stop_tensor(eos_id, model.device)
    for i in range(max_new_tokens):
        token = mark_finished(sample(logits, sampling, generator), done, stop)
        yield token
        if i + 1 == max_new_tokens or (stop is not None and bool(done.all())):
            return
        if compiled is not None:
            logits = compiled(model, token, input_pos, cache)
        else:
            logits = _decode(model, token, input_pos, cache, kv_len=pos + 1)
        input_pos += 1
        pos += 1


def generate(model: Transformer, prompt: torch.Tensor | list[int], max_new_tokens: int,
             sampling: SamplingConfig = SamplingConfig(), num_samples: int = 1,
             eos_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True, compile: bool = False,
             kv_cache: str = "float") -> torch.Tensor:
    """Prompt plus continuations, (B, T + new). use_cache=False recomputes the whole
    prefix every step (the baseline the KV cache is measured against)."""
    tokens = as_batch(prompt, num_samples, model.device)
    args = (model, tokens, max_new_tokens, sampling, num_samples, eos_id, generator)
    new = list(stream(*args, compile=compile, kv_cache=kv_cache) if use_cache
               else stream_uncached(*args))
    return torch.cat([tokens, torch.stack(new, dim=1)], dim=1) if new else tokens


@torch.inference_mode()
def stream_uncached(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
                    sampling: SamplingConfig = SamplingConfig(), num_samples: int = 1,
                    eos_id: int | Sequence[int] | None = None,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    tokens = as_batch(prompt, num_samples, model.device)
    check_length(model, tokens.shape[1], max_new_tokens)
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=model.device)
    stop = stop_tensor(eos_id, model.device)
    for _ in range(max_new_tokens):
        token = sample(model(tokens, last_only=True)[:, -1], sampling, generator)
        token = mark_finished(token, done, stop)
        yield token
        if stop is not None and bool(done.all()):
            return
        tokens = torch.cat([tokens, token[:, None]], dim=1)
