"""One prepared GPU check (issue 23): every GPU-facing claim of gqalab, one JSON report.

    bash bench/gpu_check.sh                     # what a lent GPU machine runs (see docs/gpu.md)
    python -m bench.gpu_check --out report.json [--device auto|cuda|cpu] [--model-dir DIR]
                              [--sections train,fsdp,distill,gqa_flash,decode,quant,evaluate]
                              [--budget 450] [--work DIR]

Sections (each timed; each records pass / fail / skip / error with its figures; one that
fails or raises does not stop the others):
  train      bf16 compiled `train.py model=gpt2s`: tok/s, model TFLOP/s and MFU read from the
             run's metrics.jsonl (steady-state records, the compiling one left out)
  fsdp       FSDP2 on one GPU (`accelerate launch --config_file configs/accelerate/fsdp.yaml
             --num_processes 1 train.py ...`) against a plain run of the same batches
  distill    issue 22's uptraining with the unconverted model as teacher, in bf16: a base
             trained briefly, mean-pooled to MQA, uptrained with uptrain.distill=0.5 and
             without (same batches), and under FSDP2 (1 process): the teacher's bytes and
             time per step against the plain run's step
  gqa_flash  SDPA enable_gqa (CausalSelfAttention's CUDA bf16 path) vs the expanded-K/V
             path: forward and backward parity, kernel names, time
  decode     greedy decode b1/b8 vs transformers generate, same weights (bench/decode.py's
             helpers), eager and compiled
  quant      the weight-only modes int8 and int4 (model.quantized): logits error,
             compiled == eager greedy ids, tok/s against the unquantized model
  evaluate   evaluate.py in bf16 on --model-dir (e.g. SmolLM2-135M as an HF dir), else on a
             random-weight Llama of SmolLM2-135M's exact shape (the report says which)

On a CPU (--device cpu, or no GPU) every section runs at shrunk shapes and the checks that
need CUDA (flash kernel, MFU, FSDP on a GPU, compiled decode) are marked skip: CI proves the
script is not broken (tests/test_bench_gpu_check.py). The corpus is the repo's own text
(docs/, model/, data/), tokenized once with a small sentencepiece model trained on it.
Exit status 0 when no section failed or errored, 1 otherwise, 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("train", "fsdp", "distill", "gqa_flash", "decode", "quant", "evaluate")
# SmolLM2-135M's config.json, the fields that set its shape (the real model: docs/gpu.md)
SMOLLM2 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
           "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
           "num_hidden_layers": 30, "head_dim": 64, "vocab_size": 49152,
           "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
           "tie_word_embeddings": True, "hidden_act": "silu"}


class Skip(Exception):
    """The whole section does not apply here; the message says why."""


@dataclass
class Section:
    name: str
    status: str = "skip"
    seconds: float = 0.0
    checks: dict[str, dict] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    error: str = ""

    def check(self, name: str, ok: bool, **figures) -> bool:
        self.checks[name] = {"status": "pass" if ok else "fail", **figures}
        return ok

    def skip(self, name: str, reason: str) -> None:
        self.checks[name] = {"status": "skip", "reason": reason}

    def finish(self) -> None:
        states = {c["status"] for c in self.checks.values()}
        self.status = ("error" if self.error else "fail" if "fail" in states
                       else "pass" if "pass" in states else "skip")

    def as_json(self) -> dict:
        out = {"status": self.status, "seconds": round(self.seconds, 2), "checks": self.checks,
               "figures": self.figures}
        return {**out, **({"reason": self.reason} if self.reason else {}),
                **({"error": self.error} if self.error else {})}


@dataclass
class Scale:
    """Shapes and step counts: full on a GPU, shrunk for the CPU smoke run."""
    train_model: list[str]
    train_steps: int
    train_batch: int
    fsdp_model: list[str]  # the fsdp and distill sections
    distill_steps: int
    attn: dict  # ModelConfig fields of the parity check
    attn_batch: int
    attn_len: int
    decode: dict  # bench/decode.py-style shape
    decode_new: int
    eval_layers: int | None  # None: SmolLM2's 30; else shrunk (and d_model 64, vocab 4096)
    eval_windows: int
    eval_seq_len: int
    vocab: int


FULL = Scale(train_model=["model=gpt2s"], train_steps=150, train_batch=16,
             fsdp_model=["model=small"], distill_steps=20,
             attn=dict(n_head=16, n_kv_head=4, d_model=1024), attn_batch=4, attn_len=2048,
             decode=dict(vocab_size=4096, n_layer=6, n_head=8, d_model=512, max_seq_len=2560),
             decode_new=128, eval_layers=None, eval_windows=64, eval_seq_len=1024, vocab=4096)
SMOKE = Scale(train_model=["model=tiny", "seq_len=64"], train_steps=4, train_batch=4,
              fsdp_model=["model=tiny", "seq_len=64"], distill_steps=3,
              attn=dict(n_head=4, n_kv_head=2, d_model=64), attn_batch=2, attn_len=32,
              decode=dict(vocab_size=512, n_layer=2, n_head=4, d_model=64, max_seq_len=128),
              decode_new=8, eval_layers=2, eval_windows=4, eval_seq_len=64, vocab=512)


@dataclass
class Context:
    device: torch.device
    scale: Scale
    work: Path
    deadline: float
    model_dir: Path | None
    corpus: list[str] = field(default_factory=list)
    data_args: list[str] = field(default_factory=list)  # train.py / evaluate.py overrides
    tokenizer: Path | None = None
    corpus_error: str = ""

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()


# ---------------------------------------------------------------- helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def subprocess_env(ctx: Context) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    if not ctx.cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device cpu on a GPU machine means the CPU
    return env


def run_command(ctx: Context, argv: list[str], log: Path, limit: float) -> tuple[int, str]:
    """Run argv from the repo root with its output in log; (exit status, output tail).
    The limit is the smaller of `limit` and what is left of the budget."""
    timeout = max(1.0, min(limit, ctx.left()))
    with open(log, "w") as f:
        try:
            rc = subprocess.run(argv, cwd=ROOT, env=subprocess_env(ctx), stdout=f,
                                stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    text = log.read_text(errors="replace")
    return rc, text[-1500:]


def records(run_dir: Path, key: str) -> dict[int, Any]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return {r["step"]: r[key] for r in map(json.loads, lines) if key in r}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_rel_diff(losses: dict[int, float], reference: dict[int, float]) -> float:
    """The largest relative difference of two runs' per-step records; inf when their
    steps differ."""
    if losses.keys() != reference.keys():
        return math.inf
    return max((abs(losses[k] - v) / abs(v) for k, v in reference.items()), default=math.inf)


def fsdp_launch(train_overrides: list[str], run_dir: Path) -> list[str]:
    """argv of train.py under FSDP2 on one GPU (configs/accelerate/fsdp.yaml)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs/accelerate/fsdp.yaml"), "--num_processes", "1",
            "--main_process_port", str(free_port()), "train.py", *train_overrides,
            f"hydra.run.dir={run_dir}"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def train_args(ctx: Context, model: list[str], steps: int, batch: int) -> list[str]:
    return [*model, *ctx.data_args, "logger=none", f"max_steps={steps}",
            f"batch_size={batch}", f"eval_every={steps}", "eval_batches=2", "sample_tokens=16"]


# ---------------------------------------------------------------- setup: the corpus

def prepare_corpus(ctx: Context) -> None:
    """The repo's own text, tokenized once (a cache under the work dir every run shares),
    for the sections that train or evaluate; its failure is theirs alone."""
    if ctx.corpus_error:
        raise RuntimeError(f"preparing the corpus failed: {ctx.corpus_error}")
    if ctx.tokenizer is not None:
        return
    from data.config import DataConfig
    from data.prepare import prepare_data
    folders = ["docs"] if not ctx.cuda else ["docs", "model", "data", "tests"]
    ctx.corpus = [str(ROOT / f) for f in folders]
    cache = ctx.work / "data_cache"
    files = "[" + ",".join(ctx.corpus) + "]"
    ctx.data_args = ["data=text_files", f"data.files={files}", f"data.vocab_size={ctx.scale.vocab}",
                     f"data.cache_dir={cache}", "data.num_proc=1"]
    try:
        prepared = prepare_data(DataConfig(source="text_files", files=ctx.corpus,
                                           vocab_size=ctx.scale.vocab, cache_dir=str(cache),
                                           num_proc=1), progress=False)
    except Exception as e:
        ctx.corpus_error = f"{type(e).__name__}: {e}"[:300]
        raise
    ctx.tokenizer = prepared.tokenizer_path


# ---------------------------------------------------------------- (a) train

def section_train(ctx: Context, sec: Section) -> None:
    prepare_corpus(ctx)
    s = ctx.scale
    run_dir = ctx.work / "train"
    precision = ["mixed_precision=bf16", "compile=true"] if ctx.cuda else [
        "mixed_precision=no", "compile=false"]
    argv = [sys.executable, "train.py", *train_args(ctx, s.train_model, s.train_steps,
                                                     s.train_batch),
            *precision, f"log_every={max(1, s.train_steps // 15)}", f"run_dir={run_dir}"]
    sec.figures["command"] = " ".join(argv[1:])
    t = time.perf_counter()
    rc, tail = run_command(ctx, argv, ctx.work / "train.log", limit=300)
    sec.figures["wall_s"] = round(time.perf_counter() - t, 1)
    if not sec.check("exit_status", rc == 0, rc=rc, **({"tail": tail} if rc else {})):
        return
    losses = records(run_dir, "train_loss")
    steady = sorted(losses)[1:] or sorted(losses)  # the first record holds the compile
    tok_s = [records(run_dir, "tokens_per_s")[k] for k in steady]
    tflops = [records(run_dir, "tflops_per_device")[k] for k in steady]
    mfu = [m for m in (records(run_dir, "mfu")[k] for k in steady) if m is not None]
    first, last = losses[min(losses)], losses[max(losses)]
    sec.figures.update(tokens_per_s=round(statistics.median(tok_s), 1),
                       tflops_per_device=round(statistics.median(tflops), 3),
                       mfu=round(statistics.median(mfu), 4) if mfu else None,
                       first_loss=round(first, 4), last_loss=round(last, 4),
                       val_loss=next(iter(records(run_dir, "val_loss").values()), None),
                       records=len(losses))
    sec.check("finite_losses", all(map(math.isfinite, losses.values())))
    sec.check("loss_decreased", last < first, first=first, last=last)
    sec.check("checkpoint_written", (run_dir / "checkpoints/latest/model.safetensors").is_file())
    if ctx.cuda:  # a None MFU means train.py's peak table missed this GPU's name
        sec.check("mfu_reported", bool(mfu), gpu=torch.cuda.get_device_name(ctx.device))
    else:
        sec.skip("mfu_reported", "CPU: no peak to measure against")


# ---------------------------------------------------------------- (b) fsdp

def section_fsdp(ctx: Context, sec: Section) -> None:
    if ctx.cuda:
        prepare_corpus(ctx)
    s = ctx.scale
    common = [*train_args(ctx, s.fsdp_model, 8, 8), "batch_mode=sequential", "log_every=1",
              "compile=false", "mixed_precision=bf16"]
    fsdp_dir, plain_dir = ctx.work / "fsdp", ctx.work / "plain"
    launch = fsdp_launch(common, fsdp_dir)
    sec.figures["command"] = " ".join(launch[3:])
    if not ctx.cuda:
        raise Skip("needs CUDA (Accelerate applies FSDP only on accelerators); FSDP2 on CPU "
                   "is tests/test_train_fsdp.py, 2 processes over gloo")
    rc, tail = run_command(ctx, launch, ctx.work / "fsdp.log", limit=150)
    if not sec.check("fsdp_exit_status", rc == 0, rc=rc, **({"tail": tail} if rc else {})):
        return
    sec.check("fsdp2_engaged", "FSDP2 mixed precision:" in tail,
              line=next((l for l in tail.splitlines() if "FSDP2" in l), None))
    rc, tail = run_command(ctx, [sys.executable, "train.py", *common, f"run_dir={plain_dir}"],
                           ctx.work / "plain.log", limit=120)
    if not sec.check("plain_exit_status", rc == 0, rc=rc, **({"tail": tail} if rc else {})):
        return
    fsdp_loss, plain_loss = records(fsdp_dir, "train_loss"), records(plain_dir, "train_loss")
    worst = max_rel_diff(fsdp_loss, plain_loss)
    # bf16 compute both ways (FSDP's param_dtype vs autocast), so not bit-equal
    sec.check("losses_match_plain_run", worst <= 3e-2, max_rel_diff=worst, steps=len(plain_loss))
    from safetensors import safe_open
    weights = fsdp_dir / "checkpoints/latest/model.safetensors"
    ok = weights.is_file()
    if ok:
        with safe_open(weights, "pt") as a, safe_open(
                plain_dir / "checkpoints/latest/model.safetensors", "pt") as b:
            ok = set(a.keys()) == set(b.keys())
    sec.check("consolidated_checkpoint", ok)


# ---------------------------------------------------------------- (c) distill

def section_distill(ctx: Context, sec: Section) -> None:
    """bf16 everywhere, on the CPU too (autocast): the teacher is loaded in bf16."""
    prepare_corpus(ctx)
    from convert.command import convert_checkpoint
    from convert.heads import Conversion
    s, work = ctx.scale, ctx.work
    common = [*train_args(ctx, s.fsdp_model, s.distill_steps, 8), "log_every=1",
              "compile=false", "mixed_precision=bf16"]
    rc, tail = run_command(ctx, [sys.executable, "train.py", *common,
                                 f"run_dir={work / 'distill_base'}"], work / "distill_base.log", 150)
    if not sec.check("base_exit_status", rc == 0, rc=rc, **({"tail": tail} if rc else {})):
        return
    mqa = convert_checkpoint(work / "distill_base/checkpoints/latest", work / "distill_mqa",
                             Conversion(1), overwrite=True)
    up = [*common, f"init_from={mqa}", "attention=mqa", "batch_mode=sequential"]
    kd = [*up, "uptrain.distill=0.5"]
    sec.figures["command"] = " ".join(["train.py", *kd])
    runs = {"plain": [sys.executable, "train.py", *up, f"run_dir={work / 'distill_plain'}"],
            "distill": [sys.executable, "train.py", *kd, f"run_dir={work / 'distill_kd'}"]}
    if ctx.cuda:
        runs["fsdp"] = fsdp_launch(kd, work / "distill_fsdp")
    else:
        sec.skip("fsdp_distill", "needs CUDA; FSDP2 distillation on CPU is tests/test_distill.py")
    for name, argv in runs.items():
        rc, tail = run_command(ctx, argv, work / f"distill_{name}.log", 150)
        if not sec.check(f"{name}_exit_status", rc == 0, rc=rc, **({"tail": tail} if rc else {})):
            return
    teacher = next((l for l in (work / "distill_distill.log").read_text().splitlines()
                    if l.startswith("distill:")), "")
    sec.check("teacher_in_bf16", "of torch.bfloat16 weights" in teacher, line=teacher[:400])
    plain = records(work / "distill_plain", "train_loss")
    ce, kl = records(work / "distill_kd", "train_loss"), records(work / "distill_kd", "distill_kl")
    sec.check("same_first_step_ce", abs(ce[1] - plain[1]) <= 1e-3 * abs(plain[1]),
              distill=ce[1], plain=plain[1])  # the same model and batch before any update
    sec.check("kl_finite_positive", bool(kl) and all(math.isfinite(v) and v > 0 for v in kl.values()),
              first=kl.get(1), last=kl.get(max(kl, default=0)))
    steady = lambda run, key: statistics.median(
        v for k, v in records(work / run, key).items() if k > 1)  # step 1 warms up
    plain_tok_s, kd_tok_s = steady("distill_plain", "tokens_per_s"), steady("distill_kd", "tokens_per_s")
    sec.figures.update(plain_tok_s=round(plain_tok_s, 1), distill_tok_s=round(kd_tok_s, 1),
                       distill_slowdown=round(plain_tok_s / kd_tok_s, 3),
                       teacher_s_per_step=round(steady("distill_kd", "teacher_s_per_step"), 4),
                       teacher_mib=round(steady("distill_kd", "teacher_bytes") / 2**20, 1))
    if ctx.cuda:
        worst = max_rel_diff(records(work / "distill_fsdp", "train_loss"), ce)
        sec.check("fsdp_distill", worst <= 3e-2, max_rel_diff=worst)  # bf16 both ways


# ---------------------------------------------------------------- (d) gqa_flash

def section_gqa_flash(ctx: Context, sec: Section) -> None:
    import model.attention as attention
    from model.config import ModelConfig
    s = ctx.scale
    cfg = ModelConfig(**s.attn, n_layer=1, max_seq_len=s.attn_len, positions="learned")
    torch.manual_seed(0)
    module = attention.CausalSelfAttention(cfg, 0).to(ctx.device)
    x = torch.randn(s.attn_batch, s.attn_len, cfg.d_model, device=ctx.device)
    half = torch.bfloat16 if ctx.cuda else torch.float32  # CPU: the math kernel, fp32
    sec.figures.update(shape=f"B {s.attn_batch}, T {s.attn_len}, {cfg.n_head} query heads, "
                             f"{cfg.n_kv_head} KV heads, head_dim {cfg.head_dim}",
                       dtype=str(half).removeprefix("torch."))

    def run(fused: bool, dtype: torch.dtype) -> list[torch.Tensor]:
        """Output and gradients (x, q/k/v weights) with the enable_gqa path on or off."""
        module.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        with mock.patch.object(attention, "fused_gqa", lambda q: fused), torch.autocast(
                ctx.device.type, dtype=dtype, enabled=dtype != torch.float32):
            y = module(xi, None, None)
        y.float().square().mean().backward()
        return [y.detach(), xi.grad, *(getattr(module, p).weight.grad
                                       for p in ("q_proj", "k_proj", "v_proj"))]

    if ctx.cuda:  # the module's own choice on CUDA bf16 is the enable_gqa path
        q = torch.zeros(1, cfg.n_head, 8, cfg.head_dim, device=ctx.device, dtype=half)
        sec.check("module_picks_enable_gqa", attention.fused_gqa(q))
    reference = run(False, torch.float32)
    gqa, expanded = run(True, half), run(False, half)
    names = ("out", "grad_x", "grad_wq", "grad_wk", "grad_wv")
    err_gqa = {n: rel_err(a, r) for n, a, r in zip(names, gqa, reference)}
    err_exp = {n: rel_err(a, r) for n, a, r in zip(names, expanded, reference)}
    # the enable_gqa kernel may round differently, never worse than the expanded path's
    # own rounding by more than 2x (plus fp32's noise floor)
    ok = all(err_gqa[n] <= 2 * err_exp[n] + 1e-5 for n in names)
    sec.check("parity_vs_expanded", ok, rel_err_enable_gqa=err_gqa, rel_err_expanded=err_exp,
              against="fp32 expanded path")
    if not ctx.cuda:
        sec.skip("flash_kernel", "CPU: SDPA's enable_gqa runs the math kernel")
        return
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(True, half)
        sync(ctx.device)
    kernels = sorted({e.key for e in prof.key_averages() if "flash" in e.key.lower()})
    sec.check("flash_kernel", bool(kernels), kernels=kernels[:6])
    timings = {}
    for name, fused in (("enable_gqa", True), ("expanded", False)):
        for _ in range(3):
            run(fused, half)
        sync(ctx.device)
        t = time.perf_counter()
        for _ in range(10):
            run(fused, half)
        sync(ctx.device)
        timings[name] = (time.perf_counter() - t) / 10 * 1e3
    sec.figures.update(fwd_bwd_ms={k: round(v, 3) for k, v in timings.items()},
                       speedup=round(timings["expanded"] / timings["enable_gqa"], 3))


# ---------------------------------------------------------------- (e) decode

def section_decode(ctx: Context, sec: Section) -> None:
    from model.sampling import SamplingConfig, compile_decode, generate
    from bench import decode as d  # its helpers, imported, not copied
    s = ctx.scale
    greedy, plen, n_kv = SamplingConfig(temperature=0.0), 16, 2
    model = d.build(s.decode, n_kv).to(ctx.device)  # GQA-2, fp32 (the HF comparison is exact)
    sec.figures.update(shape={**s.decode, "n_kv_head": n_kv}, dtype="float32",
                       new_tokens=s.decode_new, prompt=plen)
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # no "Loading weights" bar in the log
    with tempfile.TemporaryDirectory(dir=ctx.work) as tmp:
        hf = d.to_hf(model.cpu(), tmp).to(ctx.device)
    model.to(ctx.device)
    for b in (1, 8):
        prompt = d.prompt_batch(b, plen, s.decode["vocab_size"]).to(ctx.device)

        def timed(fn):
            return lambda: (fn(), sync(ctx.device))[0]
        runs = {"HF": timed(lambda: d.hf_generate(hf, prompt, s.decode_new)),
                "ours": timed(lambda: generate(model, prompt, s.decode_new, greedy))}
        if ctx.cuda:
            compile_decode(model, b, plen + s.decode_new)
            runs["compiled"] = timed(lambda: generate(model, prompt, s.decode_new, greedy,
                                                      compile=True))
        else:
            sec.skip(f"b{b}_compiled", "CPU smoke: compiling takes minutes on a shared CPU "
                                       "(bench/decode.py measures it)")
        times, tokens = d.interleaved(runs, repeats=3 if ctx.cuda else 1)
        rates = {k: round(b * s.decode_new / t, 1) for k, t in times.items()}
        for name in runs:
            if name != "HF":
                sec.check(f"b{b}_{name}_equals_hf", torch.equal(tokens[name].cpu(),
                                                                tokens["HF"].cpu()),
                          tok_s=rates[name], hf_tok_s=rates["HF"],
                          ratio=round(rates[name] / rates["HF"], 3))


# ---------------------------------------------------------------- (f) quant

QUANT_BOUND = {"int8": 0.05, "int4": 0.35}  # logits' relative error on random weights (int4 at
# group 32 measured 0.23 on the CPU smoke shape; a wrong kernel or layout gives ~1)
INT4_GROUP = 32  # the smallest group: random weights have no structure to spare


def section_quant(ctx: Context, sec: Section) -> None:
    from model import quantized as quantize
    from model.sampling import SamplingConfig, compile_decode, generate
    from bench import decode as d  # its helpers, imported, not copied
    s = ctx.scale
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    greedy, plen, b = SamplingConfig(temperature=0.0), 16, 1
    base = d.build(s.decode, 2).to(ctx.device, dtype)
    tokens = d.prompt_batch(2, 32, s.decode["vocab_size"]).to(ctx.device)
    prompt = tokens[:b, :plen]
    sec.figures.update(dtype=str(dtype).removeprefix("torch."), shape=s.decode)
    with torch.no_grad():
        reference = base(tokens)

    def rate(m, compile: bool) -> tuple[float, torch.Tensor]:
        if compile:
            compile_decode(m, b, plen + s.decode_new)
        out = generate(m, prompt, s.decode_new, greedy, compile=compile)  # warm
        sync(ctx.device)
        t = time.perf_counter()
        out = generate(m, prompt, s.decode_new, greedy, compile=compile)
        sync(ctx.device)
        return b * s.decode_new / (time.perf_counter() - t), out

    base_rate = rate(base, ctx.cuda)[0]
    sec.figures["unquantized_tok_s"] = round(base_rate, 1)
    for mode in QUANT_BOUND:  # int8, int4
        q = quantize.quantize_model(copy.deepcopy(base), mode, group_size=INT4_GROUP)
        with torch.no_grad():
            err = rel_err(q(tokens), reference)
        sec.check(f"{mode}_logits_error", err <= QUANT_BOUND[mode], rel_err=err,
                  bound=QUANT_BOUND[mode])
        eager_rate, eager = rate(q, False)
        if not ctx.cuda:
            sec.skip(f"{mode}_compiled_equals_eager", "CPU smoke: compile takes minutes here")
            sec.figures[f"{mode}_eager_tok_s"] = round(eager_rate, 1)
            continue
        compiled_rate, compiled = rate(q, True)
        sec.check(f"{mode}_compiled_equals_eager", torch.equal(compiled, eager),
                  tok_s=round(compiled_rate, 1), eager_tok_s=round(eager_rate, 1),
                  vs_unquantized_compiled=round(compiled_rate / base_rate, 3))
        torch._dynamo.reset()


# ---------------------------------------------------------------- (g) evaluate

def random_smollm2(ctx: Context, out: Path) -> str:
    """A random-weight HF Llama dir at SmolLM2-135M's shape (shrunk on CPU) holding the
    corpus's tokenizer; -> a description for the report."""
    from store.hf import export_hf
    from store.hf_families import llama_config
    from model.transformer import Transformer
    shape = dict(SMOLLM2)
    if ctx.scale.eval_layers is not None:
        shape.update(num_hidden_layers=ctx.scale.eval_layers, hidden_size=64, head_dim=16,
                     intermediate_size=128, vocab_size=4096)
    torch.manual_seed(0)
    export_hf(Transformer(llama_config(shape)), out, tokenizer=ctx.tokenizer)
    return (f"random-weight Llama at SmolLM2-135M's shape ({shape['num_hidden_layers']} layers, "
            f"d {shape['hidden_size']}, {shape['num_attention_heads']}/"
            f"{shape['num_key_value_heads']} heads, vocab {shape['vocab_size']}), "
            f"the corpus's tokenizer")


def section_evaluate(ctx: Context, sec: Section) -> None:
    prepare_corpus(ctx)
    if ctx.model_dir is not None:
        source, what = ctx.model_dir, f"the model at {ctx.model_dir}"
    else:
        source = ctx.work / "smollm2_shape"
        what = random_smollm2(ctx, source)
    dtype = "bfloat16" if ctx.cuda else "float32"
    out = ctx.work / "evaluate.json"
    argv = [sys.executable, "evaluate.py", f"ckpt={source}", *ctx.data_args,
            f"seq_len={ctx.scale.eval_seq_len}", f"max_windows={ctx.scale.eval_windows}",
            f"device={ctx.device.type}", f"dtype={dtype}", f"out={out}", "overwrite=true"]
    sec.figures.update(model=what, real_model=ctx.model_dir is not None, dtype=dtype,
                       command=" ".join(argv[1:]))
    rc, tail = run_command(ctx, argv, ctx.work / "evaluate.log", limit=150)
    if not sec.check("exit_status", rc == 0, rc=rc, **({"tail": tail} if rc else {})):
        return
    rows = json.loads(out.read_text())["rows"]
    row = {k: rows[0].get(k) for k in ("nll", "ppl", "bits_per_byte", "tokens", "windows")}
    sec.figures.update(row)
    sec.check("finite_perplexity", row["ppl"] is not None and math.isfinite(row["ppl"]))


# ---------------------------------------------------------------- driver

RUNNERS: dict[str, Callable[[Context, Section], None]] = {
    "train": section_train, "fsdp": section_fsdp, "distill": section_distill,
    "gqa_flash": section_gqa_flash,
    "decode": section_decode, "quant": section_quant, "evaluate": section_evaluate}


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}
    with contextlib.suppress(ImportError):
        import transformers
        info["transformers"] = transformers.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=list(torch.cuda.get_device_capability(device)),
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def write_report(path: Path, report: dict) -> None:
    """Atomically, after every section: a run cut short still leaves a valid report."""
    from store.checkpoint import write_atomic
    write_atomic(path, json.dumps(report, indent=2, default=str) + "\n")


def run_section(name: str, ctx: Context) -> Section:
    sec = Section(name)
    t = time.perf_counter()
    try:
        if ctx.left() < 10:
            raise Skip("the time budget is spent")
        RUNNERS[name](ctx, sec)
    except Skip as e:
        sec.reason = str(e)
    except Exception as e:  # noqa: BLE001 - one section's failure must not stop the rest
        sec.error = f"{type(e).__name__}: {e}"[:500]
        sec.figures["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if ctx.cuda:
            torch.cuda.empty_cache()
        if "torch._dynamo" in sys.modules:  # one section's compiled graphs at a time
            torch._dynamo.reset()
    sec.seconds = time.perf_counter() - t
    sec.finish()
    return sec


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else Path(
        "gpu_check.json")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON report (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="an HF or gqalab model dir for the evaluate section (e.g. "
                             "SmolLM2-135M); default: a random-weight model of its shape")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--budget", type=float, default=450.0,
                        help="seconds for all sections; what is left is skipped")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep run dirs and logs here (default: a temporary dir)")
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]

    def fail(message: str):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    if bad := [s for s in args.sections if s not in SECTIONS]:
        fail(f"unknown section {bad[0]!r}: choose from {', '.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but torch sees no GPU: use --device cpu (or auto)")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        fail(f"--model-dir {args.model_dir} has no config.json: pass an HF or gqalab model dir")
    args.out = args.out or default_out()
    if not args.out.parent.is_dir():
        fail(f"cannot write {args.out}: {args.out.parent} is not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    started = time.monotonic()
    report = {"schema": 1, "command": " ".join(sys.argv), "scale": "full" if cuda else "cpu-smoke",
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device_info(device), "sections": {}}
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(
            prefix="gpu_check-")))
        work.mkdir(parents=True, exist_ok=True)
        ctx = Context(device, FULL if cuda else SMOKE, work.resolve(), started + args.budget,
                      args.model_dir and args.model_dir.resolve())
        for name in args.sections:
            sec = run_section(name, ctx)
            report["sections"][name] = sec.as_json()
            print(f"{name:<10} {sec.status:<6} {sec.seconds:7.1f}s  "
                  f"{sec.reason or sec.error or ''}", flush=True)
            write_report(args.out, report)
    counts = {k: sum(s["status"] == k for s in report["sections"].values())
              for k in ("pass", "fail", "skip", "error")}
    report.update(corpus=ctx.corpus, seconds=round(time.monotonic() - started, 1), summary=counts)
    write_report(args.out, report)
    print(f"{counts} in {report['seconds']}s; report: {args.out}")
    return 1 if counts["fail"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
