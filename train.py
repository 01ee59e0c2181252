"""Train a GPT-style model: Hydra config -> Accelerate loop -> checkpoints that resume exactly.

    python train.py model=small attention=gqa max_steps=500
    python train.py -m attention=mha,gqa,mqa                  # a sweep, one dir per job
    python train.py run_dir=runs/x resume=true                # continue runs/x
    python train.py init_from=ckpt attention=gqa uptrain.alpha=0.05   # GQA uptraining
    python train.py init_from=<HF Llama|GPT-2|NeoX dir> attention=gqa attention.n_kv_head=8 \
        data=text_files data.files='[corpus/*.txt]' max_steps=1000   # its tokenizer, your corpus
    ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 \
        train.py hydra.run.dir=runs/ddp                       # two CPU processes

In-process: `train(cfg, overrides)` with a config composed from configs/train.yaml.
Beside it: training/start.py decides how a run starts (fresh, init_from, resume) and owns its
run dir; training/runtime.py sets up Accelerate, compile, MFU and the stop signals;
training/checkpointer.py saves and restores the checkpoints, in the layout (step dirs,
`latest`) store/runs.py defines and every command reads.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import DictConfig
from tqdm.auto import tqdm

import cli
from data.loader import TokenStream
from data.prepare import as_data_config, prepare_data
from data.tokenizer import Tokenizer
from store.checkpoint import staged_file, unwrap
from store.runs import LOSS_PLOT, METRICS
from training.checkpointer import Checkpointer
from training.distill import build_teacher
from training.optim import build_optimizer, lr_at
from model import decode_attention
from model.sampling import SamplingConfig, generate
from model.summary import flops_per_token, format_summary
from training.runtime import (REQUEUE_STATUS, GracefulStop, fsdp_precision, is_fsdp,
                              make_accelerator, peak_tflops, start_trackers, use_compile)
from training.start import Start, check_run_dir, decide_start, hold_run_dir, prepare_run_dir
from training.start import TrainError  # noqa: F401  (callers catch train.TrainError)

USER_ERRORS = (cli.UserError,)  # TrainError, ConfigError, CheckpointError, DataError, ...

@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    val_loss: float | None  # at the final evaluation
    checkpoint: Path | None  # the last checkpoint written
    run_dir: Path
    sample: str = ""  # generated from cfg.sample_prompt at the end
    stopped_by: str | None = None  # the signal that stopped the run before max_steps


# ---------------------------------------------------------------- the run

@dataclass
class Progress:
    """What the loop carries from step to step; a checkpoint saves what a resume needs."""
    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0
    step_last: int = 0  # the last train_loss record's step
    loss_sum: Any = 0.0  # micro-batch losses since then, on the device (a resume carries them)
    lr: float = 0.0
    grad_norm: Any = math.nan
    train_loss: float = math.nan
    tok_s: float = 0.0
    val_loss: float | None = None
    sample: str = ""
    checkpoint: Path | None = None  # the last one written
    save_s: float = 0.0  # the last checkpoint's save time
    t_last: float = 0.0  # throughput: steps since t_last,
    timed_from: int = 0  # counted from this step


@dataclass
class Run:
    """What the loop's steps share: set up once by setup()."""
    cfg: DictConfig
    run_dir: Path
    accelerator: Accelerator
    model: Any  # prepared (DDP/FSDP-wrapped, maybe compiled)
    optimizer: torch.optim.Optimizer
    stream: TokenStream
    prepared: Any  # data.prepare.PreparedData
    tokenizer: Tokenizer
    meta: dict  # what every checkpoint's meta.json records besides the step's figures
    progress: Progress
    checkpointer: Checkpointer
    bar: Any  # tqdm
    eval_every: int = 0
    ckpt_every: int = 0
    tokens_per_step: int = 0
    flops_per_step: float = 0.0
    peak: float | None = None
    teacher: Any = None  # training.distill's Teacher when uptrain.distill > 0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> TrainResult:
    """Train per cfg (composed from configs/train.yaml). overrides: the user's Hydra
    overrides, which uptraining keeps over the source's recipe."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # no per-save INFO lines
    start = decide_start(cfg, overrides)  # fresh | init_from | resume; refusals needing no data
    accelerator = make_accelerator(start.cfg, start.run_dir)
    start.join(accelerator)  # rank 0's run dir; the resume's process count
    with hold_run_dir(accelerator, start.run_dir), GracefulStop(start.cfg.on_signal) as stop:
        return loop(setup(start, accelerator), stop)


def setup(start: Start, accelerator: Accelerator) -> Run:
    """Data, model, optimizer and data position on every rank; the run dir on the main one."""
    cfg, run_dir, main = start.cfg, start.run_dir, accelerator.is_main_process
    check_run_dir(run_dir, cfg, resuming=start.resume_from is not None)
    with accelerator.main_process_first():  # one process tokenizes, the others hit the cache
        prepared = prepare_data(as_data_config(cfg.data), progress=main)
    tokenizer = prepared.tokenizer()
    start.check_tokenizer(tokenizer)
    set_seed(cfg.seed)  # identical init on every rank
    model, provenance = start.model(tokenizer.vocab_size)
    if main:
        print(format_summary(model.config))
    model.activation_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(model, cfg.optim, fused=accelerator.device.type == "cuda")
    model_cfg = model.config
    model, optimizer = accelerator.prepare(model, optimizer)
    if main and (precision_line := fsdp_precision(model)):
        print(precision_line)
    if use_compile(cfg, accelerator.device):  # after wrapping: DDP/FSDP hooks stay outside
        model = torch.compile(model)
    teacher = build_teacher(cfg, accelerator)  # None unless uptrain.distill > 0
    if teacher is not None and main:
        print(teacher.describe(cfg.batch_size, cfg.seq_len, cfg.grad_accum))
    stream = TokenStream(prepared.train_bin, prepared.dtype, cfg.seq_len, cfg.batch_size,
                         seed=cfg.seed, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, mode=cfg.batch_mode)
    checkpointer = Checkpointer(run_dir, cfg.keep_last)
    progress = Progress(**checkpointer.restore(accelerator, stream, start.resume_from,
                                               start.state))
    progress.loss_sum = torch.full((), float(progress.loss_sum), device=accelerator.device)
    if main:  # accepted: only now does anything land in the run dir
        prepare_run_dir(run_dir, cfg, progress.step if start.resume_from else None,
                        start.overrides, start.resume_from)
    accelerator.wait_for_everyone()
    start_trackers(accelerator, cfg, run_dir)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * accelerator.num_processes
    eval_every = cfg.eval_every or cfg.max_steps
    progress.t_last, progress.timed_from = time.perf_counter(), progress.step
    meta = {"max_steps": cfg.max_steps, "attention": model_cfg.attention_type,
            "n_kv_head": model_cfg.n_kv_head, "seed": cfg.seed,
            "num_processes": accelerator.num_processes, **provenance}
    return Run(cfg, run_dir, accelerator, model, optimizer, stream, prepared, tokenizer, meta,
               progress, checkpointer,
               tqdm(total=cfg.max_steps, initial=progress.step, disable=not main,
                    dynamic_ncols=True, desc=f"train {model_cfg.attention_type}"),
               eval_every, cfg.ckpt_every or eval_every, tokens_per_step,
               flops_per_token(model_cfg, cfg.seq_len) * tokens_per_step,
               peak_tflops(cfg.peak_tflops, accelerator.device, accelerator.mixed_precision),
               teacher)


def loop(run: Run, stop: GracefulStop) -> TrainResult:
    """nanoGPT's loop: a step, then whatever is due (log, evaluate + sample, checkpoint). A
    stop signal checkpoints the step just finished and ends the run."""
    cfg, p = run.cfg, run.progress
    due = lambda every: p.step % every == 0 or p.step == cfg.max_steps
    stopped_by = stop.requested(run.accelerator)  # one during data prep: no step at all
    while p.step < cfg.max_steps and not stopped_by:
        train_step(run)
        stopped_by = stop.requested(run.accelerator) if p.step < cfg.max_steps else None
        if due(cfg.log_every):
            log_step(run)
        if due(run.eval_every):
            evaluate_and_sample(run)
        if due(run.ckpt_every) or stopped_by:
            checkpoint_step(run)
    run.bar.close()
    return finish(run, stopped_by)


def train_step(run: Run) -> None:
    """One optimizer step: grad_accum micro-batches, clipped, at the schedule's lr."""
    cfg, p, accelerator, model, optimizer = run.cfg, run.progress, run.accelerator, run.model, \
        run.optimizer
    p.lr = lr_at(p.step, cfg.max_steps, cfg.optim)
    for group in optimizer.param_groups:
        group["lr"] = p.lr
    for _ in range(cfg.grad_accum):
        x, y = run.stream.next_batch()
        with accelerator.accumulate(model):
            logits = model(x.to(accelerator.device))  # (B, T, V)
            loss = F.cross_entropy(logits.float().flatten(0, 1),
                                   y.to(accelerator.device).flatten())
            # scales by 1/grad_accum itself; train_loss stays the CE
            accelerator.backward(loss if run.teacher is None
                                 else run.teacher.loss(loss, logits, x))
            if accelerator.sync_gradients:
                p.grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                          cfg.optim.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        p.loss_sum += loss.detach()
    p.step += 1
    p.tokens_seen += run.tokens_per_step
    run.bar.update(1)


def log_step(run: Run) -> None:
    """A train_loss record: the mean over every micro-batch since the last, not the last
    step's; throughput and MFU over the same steps."""
    cfg, p, accelerator = run.cfg, run.progress, run.accelerator
    micro_batches = cfg.grad_accum * (p.step - p.step_last)
    p.train_loss = accelerator.reduce(p.loss_sum / micro_batches, "mean").item()
    p.loss_sum.zero_()
    now = time.perf_counter()
    steps_per_s = (p.step - p.timed_from) / (now - p.t_last)
    p.tok_s = run.tokens_per_step * steps_per_s
    # model FLOPs per second per device; MFU: its fraction of the device's peak
    tflops = run.flops_per_step * steps_per_s / accelerator.num_processes / 1e12
    mfu = tflops / run.peak if run.peak else None
    p.t_last, p.timed_from, p.step_last = now, p.step, p.step
    record = {"step": p.step, "train_loss": p.train_loss, "lr": p.lr, "tokens_per_s": p.tok_s,
              "grad_norm": float(p.grad_norm), "tokens_seen": p.tokens_seen,
              "tflops_per_device": tflops, "mfu": mfu,
              **(run.teacher.record(cfg.grad_accum) if run.teacher is not None else {})}
    if run.main:
        append_metrics(run.run_dir / METRICS, record)
        run.bar.set_postfix(loss=f"{p.train_loss:.4f}", lr=f"{p.lr:.2e}", tok_s=f"{p.tok_s:,.0f}",
                            **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
    accelerator.log({f"train/{k}": v for k, v in record.items()
                     if k != "step" and v is not None}, step=p.step)


def evaluate_and_sample(run: Run) -> None:
    cfg, p, accelerator = run.cfg, run.progress, run.accelerator
    p.val_loss = evaluate(run.model, accelerator, run.prepared, cfg)
    if run.main or is_fsdp(accelerator):
        p.sample = sample_text(run.model, accelerator, run.tokenizer, cfg)
    if run.main:
        append_metrics(run.run_dir / METRICS, {"step": p.step, "val_loss": p.val_loss})
        run.bar.write(f"step {p.step}/{cfg.max_steps}: train {p.train_loss:.4f}  val "
                      f"{p.val_loss:.4f}  lr {p.lr:.2e}  {p.tok_s:,.0f} tok/s")
        accelerator.log({"val/loss": p.val_loss}, step=p.step)
        if cfg.logger.backend == "wandb":
            accelerator.get_tracker("wandb").log_table(
                "samples", columns=["step", "prompt", "sample"],
                data=[[p.step, cfg.sample_prompt, p.sample]], step=p.step)
    p.t_last, p.timed_from = time.perf_counter(), p.step  # eval time is not throughput


def checkpoint_step(run: Run) -> None:
    p, accelerator = run.progress, run.accelerator
    t_save = time.perf_counter()
    meta = {"step": p.step, "tokens_seen": p.tokens_seen, "val_loss": p.val_loss,
            "train_loss": p.train_loss, **run.meta}
    # the running train_loss too, so a resume's first record is the same mean
    trainer_state = {"step": p.step, "tokens_seen": p.tokens_seen,
                     "loader": run.stream.state_dict(), "step_last": p.step_last,
                     "loss_sum": accelerator.reduce(p.loss_sum, "mean").item()}
    p.checkpoint = run.checkpointer.save(accelerator, run.model, p.step, meta, trainer_state,
                                         run.cfg, run.prepared.tokenizer_files)
    p.t_last, p.timed_from = time.perf_counter(), p.step
    p.save_s = p.t_last - t_save


def finish(run: Run, stopped_by: str | None) -> TrainResult:
    cfg, p = run.cfg, run.progress
    if run.main and stopped_by:
        saved = (f"checkpoint {p.checkpoint} (saved in {p.save_s:.2f} s)" if p.checkpoint
                 else "nothing new to checkpoint")
        print(f"{stopped_by}: stopped at step {p.step}/{cfg.max_steps}, {saved}; exit "
              f"{REQUEUE_STATUS}, resume=true continues", flush=True)
    elif run.main:
        plot_losses(run.run_dir)
        print(f"done: {p.step} steps, val loss {p.val_loss}, checkpoint {p.checkpoint}")
        print(f"sample ({cfg.sample_prompt!r}):\n{p.sample}")
    run.accelerator.end_training()
    return TrainResult(p.step, p.val_loss, p.checkpoint, run.run_dir, p.sample, stopped_by)


# ---------------------------------------------------------------- evaluate, sample, log

@torch.no_grad()
def evaluate(model, accelerator: Accelerator, prepared, cfg: Any) -> float:
    """Mean val loss per token over at most eval_batches batches per process (each val
    window once, padding ignored), all processes pooled: evaluate.py's window scoring."""
    from evaluation.scoring import mean_nll, window_scores
    world = accelerator.num_processes
    totals = window_scores(model, prepared.val_bin, cfg.seq_len, cfg.batch_size,
                           accelerator.device, dtype=prepared.dtype,
                           max_windows=cfg.eval_batches and cfg.eval_batches * cfg.batch_size * world,
                           rank=accelerator.process_index, world_size=world)
    return mean_nll(accelerator.gather_for_metrics(totals[None]).sum(0))


@torch.no_grad()
def sample_text(model, accelerator: Accelerator, tokenizer: Tokenizer, cfg: Any) -> str:
    """A continuation of the fixed prompt, from its own generator (training RNG untouched)."""
    model = unwrap(model)
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else [tokenizer.eos_id]
    prompt = (bos if tokenizer.add_bos else []) + tokenizer.encode(cfg.sample_prompt) or bos
    new = min(cfg.sample_tokens, model.config.max_seq_len - len(prompt))
    if new <= 0:
        return ""
    was_training = model.training
    model.eval()
    # a few tokens: training's (possibly distributed) processes keep torch's own attention
    # and never load the C++ decode kernels
    kernel_on = decode_attention.enabled
    decode_attention.set_enabled(False)
    try:
        with accelerator.autocast():
            out = generate(model, prompt, new, SamplingConfig(temperature=0.8, top_k=50),
                           generator=torch.Generator(model.device).manual_seed(cfg.seed))
    finally:
        decode_attention.set_enabled(kernel_on)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())

def append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")

def plot_losses(run_dir: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("train_loss", "val_loss"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key == "val_loss" else None,
                    label=key.replace("_", " "))
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=run_dir.name)
    ax.legend()
    ax.grid(alpha=0.3)
    with staged_file(run_dir / LOSS_PLOT) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

@cli.hydra_main(config_path="configs", config_name="train", errors=(*USER_ERRORS, OSError))
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    if train(cfg, HydraConfig.get().overrides.task).stopped_by:
        sys.exit(REQUEUE_STATUS)


if __name__ == "__main__":
    main()
