"""Generate text from a gqalab checkpoint, a train.py run dir, or an HF model dir (Llama,
GPT-2, GPT-NeoX).

    python generate.py ckpt=runs/x/checkpoints/step_1000 prompt="def fib(n):"
    python generate.py ckpt=runs/x prompt_file=- num_samples=3 temperature=0.9 < prompt.py
    python generate.py ckpt=hf_llama_dir prompt_ids=[1,532,99] temperature=0
    python generate.py ckpt=instruct_dir chat=true prompt="The capital of France is"
    python generate.py --help

Text streams to stdout as it is produced; timing and memory go to stderr. The prompt is
taken verbatim (no Hydra quoting needed). Errors: one line `error: ...`, exit status 2.
"""
from __future__ import annotations

import enum
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import cli
from data.chat import ChatTemplate
from model import decode_attention, int8_dot
from model.kv_cache import kv_bytes_per_token
from model.quantized import (MODES, cpu_choice, dequantize_int4_layers, describe, int4_on_dot,
                             int8_kernel, layer_bits, quantize_model, quantized_layers,
                             weight_bytes)
from model.sampling import KV_CACHES, SamplingConfig, compile_decode, stream
from model.transformer import Transformer
from store.source import open_source, pick_device, pick_dtype
SEPARATOR = "\n" + "-" * 40 + "\n"
# the schema's choices, from the tables that define them: a bad value fails at composition
Quantize = enum.StrEnum("Quantize", ["none", *MODES])  # none: float weights
KvCache = enum.StrEnum("KvCache", list(KV_CACHES))
QuantKernels = enum.StrEnum("QuantKernels", ["auto", "force"])


@dataclass
class GenerateConfig:
    ckpt: str = ""  # checkpoint dir, run dir (its checkpoints/latest) or HF Llama/GPT-2/NeoX dir
    prompt: str = ""  # prompt text, verbatim
    prompt_file: str = ""  # read the prompt from this file; "-" reads stdin
    prompt_ids: list[int] = field(default_factory=list)  # token ids instead of text
    bos: Optional[bool] = None  # prepend BOS to a text prompt; null: as the tokenizer does
    # (Llama's add_bos_token), like transformers' tokenizer(prompt); with chat: as the template
    chat: bool = False  # the prompt: a user turn in the source's chat template; stop at its end
    system: str = ""  # chat: a system turn before the prompt ("": the template's default)
    num_samples: int = 1
    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 200  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop_at_eos: bool = True  # end a sample at the tokenizer's EOS id
    seed: int = 1337
    device: str = "auto"  # auto = cuda > mps > cpu
    dtype: str = "auto"  # auto = bfloat16 on cuda, float32 elsewhere; or float32/bfloat16/float16
    compile: bool = False  # torch.compile the decode step: ~1 min once, then 2-3x faster on CPU
    stream: bool = True  # print tokens as they come (num_samples == 1 only)
    # none | int8 | int4 (blocks' linear layers) | int8_head | int4_head | int4_int8head
    quantize: Quantize = Quantize.none
    group_size: int = 64  # int4: inputs per scale and zero (32, 64 or 128)
    # float (in dtype) | int8 (KIVI: int8 + a full-precision window)
    kv_cache: KvCache = KvCache.float
    # auto: int4 and kv_cache=int8 run their kernels only on a CPU where they measured not
    # slower than fp32 compiled, else fp32 compute (int4 dequantized at load, the float
    # cache), said on stderr; force: their kernels everywhere
    quant_kernels: QuantKernels = QuantKernels.auto


ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


class UsageError(cli.UserError):
    """Bad input from the user; printed as one line."""


def read_prompt(cfg: GenerateConfig) -> str:
    if cfg.prompt and cfg.prompt_file:
        raise UsageError("give prompt= or prompt_file=, not both")
    if cfg.prompt_file == "-":
        return sys.stdin.read()
    if cfg.prompt_file:
        try:
            return Path(cfg.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read prompt_file {cfg.prompt_file}: {e}") from None
    return cfg.prompt


def chat_template(cfg: GenerateConfig, tokenizer) -> ChatTemplate | None:
    """The source's chat template when chat=true; refused when it has none."""
    if not cfg.chat:
        if cfg.system:
            raise UsageError("system= is a chat turn: add chat=true")
        return None
    if cfg.prompt_ids:
        raise UsageError("chat=true renders a text prompt through the template: drop prompt_ids=")
    template = ChatTemplate.of(tokenizer) if tokenizer is not None else None
    if template is None:
        raise UsageError(f"chat=true needs a chat template: {cfg.ckpt} has no chat_template.jinja"
                         f" and no chat_template in tokenizer_config.json")
    return template


def text_tokens(cfg: GenerateConfig, tokenizer, text: str, chat: ChatTemplate | None) -> list[int]:
    if chat is not None:  # the template writes BOS itself, when it wants one
        ids, bos = chat.encode(chat.render(chat.conversation(text, cfg.system))), bool(cfg.bos)
    else:
        ids = tokenizer.encode(text)
        bos = tokenizer.add_bos if cfg.bos is None else cfg.bos
    return ([tokenizer.bos_id] if bos and tokenizer.bos_id is not None else []) + ids


def prompt_tokens(cfg: GenerateConfig, tokenizer, model: Transformer,
                  chat: ChatTemplate | None = None) -> list[int]:
    text = read_prompt(cfg)
    if cfg.prompt_ids:
        if text:
            raise UsageError("give a text prompt or prompt_ids=, not both")
        ids = list(cfg.prompt_ids)
    elif tokenizer is None:
        raise UsageError("this checkpoint has no tokenizer.model, tokenizer.json or vocab.json + "
                         "merges.txt beside it: give the prompt as token ids, e.g. "
                         "prompt_ids=[1,450,3681]")
    else:
        ids = text_tokens(cfg, tokenizer, text, chat)
    if not ids:
        raise UsageError("the prompt is empty: pass prompt=..., prompt_file=... or prompt_ids=[...]"
                         " (bos=true starts from the BOS token alone)")
    vocab = model.config.vocab_size
    if not all(0 <= i < vocab for i in ids):
        raise UsageError(f"prompt_ids must lie in [0, {vocab}): the model's vocabulary size")
    context = model.config.max_seq_len
    if len(ids) + cfg.max_new_tokens > context:
        raise UsageError(f"prompt ({len(ids)} tokens) + max_new_tokens ({cfg.max_new_tokens}) "
                         f"exceeds the model's context of {context}: shorten the prompt or "
                         f"lower max_new_tokens")
    return ids


def stop_ids(cfg: GenerateConfig, tokenizer, chat: ChatTemplate | None) -> list[int]:
    """Where a sample ends: EOS, and in a chat the template's end-of-turn token."""
    if tokenizer is None or not cfg.stop_at_eos:
        return []
    ids = [chat.end_of_turn_id() if chat is not None else None, tokenizer.eos_id]
    return [i for i in dict.fromkeys(ids) if i is not None]


def sampling_config(cfg: GenerateConfig) -> SamplingConfig:
    if cfg.num_samples < 1:
        raise UsageError(f"num_samples must be >= 1, got {cfg.num_samples}")
    if cfg.max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    try:
        return SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p)
    except ValueError as e:
        raise UsageError(str(e)) from None


# ---------------------------------------------------------------- output

class TextSink:
    """Turns new token ids into printable text: exact incremental decoding seeded with the
    prompt (so the first new token keeps its leading space), or the ids themselves when
    there is no tokenizer."""

    def __init__(self, tokenizer, prompt_ids: list[int]) -> None:
        if tokenizer is None:
            self.decoder = None
        else:
            from data.streaming import IncrementalDecoder
            self.decoder = IncrementalDecoder(tokenizer, prompt_ids)

    def push(self, token: int) -> str:
        return f" {token}" if self.decoder is None else self.decoder.push(token)

    def flush(self) -> str:
        return "" if self.decoder is None else self.decoder.flush()


def prompt_text(tokenizer, ids: list[int]) -> str:
    return " ".join(map(str, ids)) if tokenizer is None else tokenizer.decode(ids)


def memory_report(device: torch.device) -> str:
    if device.type == "cuda":
        return f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:,.1f} MiB"
    # ru_maxrss is KiB on Linux
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.1f} MiB"


def mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def kernel_name(kernel: str, isa: str | None = None) -> str:
    """A quantized layer kernel as the report names it (dot: with the body that runs, isa
    or this process's)."""
    if kernel == "dot":
        return (f"int8 dot products ({isa or int8_dot.isa()}), activations as two int8 parts "
                f"per block of 32")
    return {"int4pack": "_weight_int4pack_mm_for_cpu, bf16 activations"}.get(kernel, kernel)


def choose_kernels(cfg: GenerateConfig, model: Transformer,
                   device: torch.device) -> tuple[str, list[str]]:
    """Apply the per-ISA choice (model.quantized.cpu_choice) on CPU: int4 layers whose
    kernel is slower than fp32 here are dequantized to float at load (their values stay
    int4's), an int8 cache slower than the float cache gives way to it; quant_kernels=force
    keeps both. -> (the kv_cache to run, one stderr line per quantized path and why)"""
    if device.type != "cpu":
        return cfg.kv_cache, []
    force, kv, lines = cfg.quant_kernels == "force", cfg.kv_cache, []
    kinds = {layer_bits(m) for m in quantized_layers(model).values()}
    if 8 in kinds:  # its kernel is picked inside the graph (int8_kernel), by the same table
        kernel = int8_kernel()
        path = "int8_dot" if kernel == "dot" else "int8"
        lines.append(f"int8: kernel {kernel_name(kernel)} ({cpu_choice(path)[1]})"
                     + (": fp32's speed compiled, int8 saves memory, not time"
                        if kernel == "dequant" else ""))
    if 4 in kinds:
        dot = int4_on_dot(model)
        wins, why = cpu_choice("int4_dot" if dot else "int4")
        if wins or force:
            kernel = kernel_name("dot" if dot else "int4pack")
            lines.append(f"int4: kernel {kernel} ({why}{'' if wins else '; forced'})")
        else:
            dtype = str(model.embed.weight.dtype).removeprefix("torch.")
            dequantize_int4_layers(model)
            lines.append(f"int4: no int4 kernel faster than fp32 here ({why}): "
                         f"weights dequantized to {dtype} at load (int4's values at "
                         f"fp32's speed); quant_kernels=force runs the kernel")
    if kv == "int8":
        wins, why = cpu_choice("latent_int8" if model.config.kv_rank else "kv_int8")
        if wins or force:
            lines.append(f"kv_cache=int8: int8 cache ({why}{'' if wins else '; forced'})")
        else:
            kv = "float"
            lines.append(f"kv_cache=int8: the float cache runs instead, the int8 cache is slower "
                         f"here ({why}); quant_kernels=force keeps it")
    return kv, lines


# ---------------------------------------------------------------- main

def run(cfg: GenerateConfig) -> None:
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    sampling = sampling_config(cfg)
    source = open_source(cfg.ckpt)
    model, tokenizer = source.load(device, dtype), source.tokenizer()
    if cfg.quantize != "none":
        quantize_model(model, cfg.quantize, cfg.group_size)
    stored = describe(model)  # before choose_kernels may dequantize int4 layers
    kv_kind, kernel_lines = choose_kernels(cfg, model, device)
    if device.type == "cpu":
        kernel_lines.append("attention: " + decode_attention.describe(model.config, dtype, kv_kind))
    chat = chat_template(cfg, tokenizer)
    ids = prompt_tokens(cfg, tokenizer, model, chat)
    stops = stop_ids(cfg, tokenizer, chat)
    generator = torch.Generator(device).manual_seed(cfg.seed)
    live = cfg.stream and cfg.num_samples == 1
    sinks = [TextSink(tokenizer, ids) for _ in range(cfg.num_samples)]
    # a chat prints only the answer; otherwise the prompt leads its continuation
    texts = ["" if chat else prompt_text(tokenizer, ids) for _ in range(cfg.num_samples)]
    done = [False] * cfg.num_samples
    started = time.perf_counter()
    if cfg.compile:  # before the clock starts, so decode tok/s is the steady rate
        compile_decode(model, cfg.num_samples, len(ids) + cfg.max_new_tokens,
                       kv_cache=kv_kind)
    compile_s = time.perf_counter() - started
    if live:
        print(texts[0], end="", flush=True)

    t0 = time.perf_counter()
    t_first = None
    steps = 0
    for token in stream(model, ids, cfg.max_new_tokens, sampling, cfg.num_samples, stops,
                        generator, compile=cfg.compile, kv_cache=kv_kind):
        token = token.tolist()  # the one host sync per step
        if t_first is None:
            t_first = time.perf_counter()
        steps += 1
        for b, t in enumerate(token):
            if done[b] or t in stops:
                done[b] = True
                continue
            new = sinks[b].push(t)
            texts[b] += new
            if live and new:
                print(new, end="", flush=True)
    t_end = time.perf_counter()
    for b, sink in enumerate(sinks):
        tail = sink.flush()
        texts[b] += tail
        if live:
            print(tail, flush=True)
    if not live:
        print(SEPARATOR.join(texts), flush=True)

    cfg_m = model.config
    kv_float = kv_bytes_per_token(cfg_m, dtype) * cfg.num_samples * (len(ids) + steps)
    kv_mha = kv_bytes_per_token(cfg_m.with_kv_heads(cfg_m.n_head), dtype) * cfg.num_samples * (
        len(ids) + steps)
    kv = KV_CACHES[kv_kind].for_model(cfg_m, cfg.num_samples, len(ids) + steps, dtype,
                                      device="meta").nbytes  # sized, not allocated
    kv_note = "" if kv_kind == "float" else f", int8 (float: {mib(kv_float)})"
    prefill_s = t_first - t0
    decode_s = t_end - t_first
    decode_tps = cfg.num_samples * (steps - 1) / decode_s if steps > 1 and decode_s > 0 else 0.0
    kernels = "".join(f"{line}\n" for line in kernel_lines)
    print(f"[{source.path}] {cfg_m.attention_type}, {device.type} "
          f"{str(dtype).removeprefix('torch.')}"
          f"{f', decode step compiled in {compile_s:.1f} s' if cfg.compile else ''}\n"
          f"prefill: {len(ids)} tokens x {cfg.num_samples} in {prefill_s:.3f} s "
          f"({cfg.num_samples * len(ids) / prefill_s:,.1f} tok/s)\n"
          f"decode: {steps} steps x {cfg.num_samples} in {decode_s:.3f} s "
          f"({decode_tps:,.1f} tok/s)\n"
          f"weights: {mib(weight_bytes(model))}, quantization {stored}\n"
          f"{kernels}"
          f"KV cache: {mib(kv)} ({cfg_m.attention_type}{kv_note}; MHA equivalent "
          f"{mib(kv_mha)}, {kv_mha / kv:.0f}x more) | {memory_report(device)}", file=sys.stderr)


@cli.hydra_main(config_path="configs", config_name="generate",
                errors=(ValueError, OSError))
def main(dcfg) -> None:
    cfg: GenerateConfig = OmegaConf.to_object(dcfg)
    try:
        run(cfg)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    for key in ("prompt", "system"):  # free text, verbatim
        sys.argv[1:] = cli.quote_prompt_args(sys.argv[1:], key)
    main()
