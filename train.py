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
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (DistributedType, FullyShardedDataParallelPlugin,
                               broadcast_object_list, gather_object, set_seed)
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from torch.distributed.fsdp import FSDPModule
from tqdm.auto import tqdm

import cli
from data.config import DataError
from data.loader import IGNORE_INDEX, TokenStream, eval_batches
from data.prepare import as_data_config, prepare_data
from data.tokenizer import Tokenizer, load_tokenizer, tokenizer_files
from model import lock, runs
from model.checkpoint import (RUN_LOCK, WEIGHTS, CheckpointError, load_checkpoint, read_config,
                              read_meta, save_checkpoint, unwrap, write_json)
from model.hf import import_hf, is_hf_model, read_hf_config
from model.config import ConfigError, ModelConfig
from model.sampling import SamplingConfig, generate
from model.summary import flops_per_token, format_summary
from model.transformer import Block, Transformer
from train_config import ModelSizeConfig, check_config, model_config, select

TRAIN_CONFIG, TRAINER_STATE, ACCEL_STATE = "train_config.yaml", "trainer_state.json", "accelerate"
METRICS, LOSS_PLOT = "metrics.jsonl", "loss.png"
# The parts of a source run's config that uptraining reuses unless overridden (§2.1: same
# recipe, alpha of the steps).
RECIPE = ("optim", "batch_size", "grad_accum", "seq_len", "batch_mode", "data")


class TrainError(ValueError):
    """A problem the user can fix (paths, run dirs, resume/uptrain inputs); one line."""


USER_ERRORS = (TrainError, ConfigError, CheckpointError, DataError)


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    val_loss: float | None  # at the final evaluation
    checkpoint: Path | None  # the last checkpoint written
    run_dir: Path
    sample: str = ""  # generated from cfg.sample_prompt at the end
    stopped_by: str | None = None  # the signal that stopped the run before max_steps


# ---------------------------------------------------------------- schedule and optimizer

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


# ---------------------------------------------------------------- run dirs and checkpoints

def find_checkpoint(path: Path) -> Path:
    """A checkpoint dir, or a run dir / checkpoints dir whose `latest` names one; one
    that is truncated or dangling is refused with the newest intact one to use instead."""
    for candidate in (path, path / "latest", path / "checkpoints" / "latest"):
        if candidate.is_symlink() and not candidate.exists():
            raise broken_checkpoint(candidate, f"{candidate} points at a missing "
                                               f"{os.readlink(candidate)} (dangling)")
        if (candidate / WEIGHTS).is_file() and (candidate / TRAINER_STATE).is_file():
            if not checkpoint_intact(candidate):
                raise broken_checkpoint(candidate, f"{candidate.resolve()} is truncated or "
                                                   f"corrupt")
            return candidate.resolve()
    raise TrainError(f"no resumable checkpoint at {path}: pass a run dir or a "
                     f"checkpoints/step_N dir written by train.py")


def checkpoint_intact(path: Path) -> bool:
    """Every byte the weights' header promises is there, and the trainer state parses
    (cheap: reads headers, not tensors)."""
    try:
        json.loads((path / TRAINER_STATE).read_text())
        with safe_open(path / WEIGHTS, "pt"):
            return True
    except (OSError, ValueError, SafetensorError):
        return False


def broken_checkpoint(path: Path, problem: str) -> TrainError:
    root = path.resolve().parent if path.name != "latest" else path.parent
    intact = [d for d in reversed(step_dirs(root)) if checkpoint_intact(d)]
    if not intact:
        return TrainError(f"{problem}, and {root} holds no intact checkpoint: start over "
                          f"with overwrite=true")
    return TrainError(f"{problem}: resume from the newest intact checkpoint with "
                      f"`python train.py resume={intact[0]}`")


def point_latest(root: Path, name: str) -> None:
    """Swap the `latest` symlink in one rename: it always names a complete checkpoint."""
    tmp = root / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, root / "latest")


def step_dirs(root: Path) -> list[Path]:
    dirs = [p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[5:]))


def prune_checkpoints(root: Path, keep_last: int, newer_than: int | None = None) -> None:
    """Keep the newest keep_last; with newer_than, first drop the abandoned future of a
    run killed after that step. Leftovers of interrupted writes go too."""
    latest = (root / "latest").resolve()
    dirs = step_dirs(root)
    if newer_than is not None:
        for future in [d for d in dirs if int(d.name[5:]) > newer_than]:
            shutil.rmtree(future)
        dirs = [d for d in dirs if int(d.name[5:]) <= newer_than]
    for old in dirs[:-keep_last]:
        if old.resolve() != latest:
            shutil.rmtree(old, ignore_errors=True)
    for junk in root.glob(".*"):
        shutil.rmtree(junk, ignore_errors=True) if junk.is_dir() else junk.unlink()


def has_checkpoints(ckpts: Path) -> bool:
    return ckpts.is_dir() and bool(step_dirs(ckpts) or os.path.lexists(ckpts / "latest"))


RUN_BUSY_FIX = ("one run dir takes one train.py at a time: wait for it, stop it (SIGTERM "
                "checkpoints it; then resume=true), or choose another run_dir")


@contextmanager
def hold_run_dir(accelerator: Accelerator, run_dir: Path) -> Iterator[None]:
    """The main process locks run_dir for the run's life (an flock: it dies with the process,
    SIGKILL included); every rank learns of a refusal and raises it too. A dir made here is
    removed again if the run leaves it empty (refused after the lock)."""
    fd, refusal, made = None, None, []
    if accelerator.is_main_process:
        made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = lock.acquire(run_dir / RUN_LOCK, str(run_dir), RUN_BUSY_FIX, TrainError)
        except (TrainError, OSError) as e:
            refusal = e
    refusal = broadcast_object_list([refusal and str(refusal)])[0]
    if refusal is not None:
        raise TrainError(refusal)
    try:
        yield
    finally:
        if fd is not None:
            lock.release(run_dir / RUN_LOCK, fd)
        for folder in made:  # innermost first; stops at the first one in use
            try:
                folder.rmdir()
            except OSError:
                break


def check_run_dir(run_dir: Path, cfg: Any, resuming: bool) -> None:
    """Every rank, before anything is written: refuse to clobber another run."""
    if not resuming and not cfg.overwrite and has_checkpoints(run_dir / "checkpoints"):
        raise TrainError(f"{run_dir} already has checkpoints: resume=true continues it, "
                         f"overwrite=true starts over, or choose another run_dir")


def prepare_run_dir(run_dir: Path, cfg: Any, resume_step: int | None,
                    overrides: Sequence[str], resumed_from: Path | None = None) -> None:
    """Main process, once the run is accepted: start over (overwrite=true) or trim a
    resumed run's logs, then record the config."""
    ckpts = run_dir / "checkpoints"
    if resume_step is None and has_checkpoints(ckpts):
        shutil.rmtree(ckpts)
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    if resume_step is None:  # also the logs of an attempt that died before its first checkpoint
        for name in (METRICS, LOSS_PLOT):
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is not None:
        prune_checkpoints(ckpts, cfg.keep_last, newer_than=resume_step)
        trim_metrics(run_dir / METRICS, resume_step)
    record_config(run_dir / ".hydra", cfg, overrides, resumed_from)


def record_config(out: Path, cfg: DictConfig, overrides: Sequence[str],
                  resumed_from: Path | None = None) -> None:
    """What Hydra's output_subdir would hold, written only now: Hydra writes it before the
    task runs, so a refused run would rewrite the config of the run it refused. A resumed
    run keeps the original config.yaml and adds resume-<time>-overrides.yaml beside it: the
    overrides as given, after a comment that says what they changed."""
    out.mkdir(exist_ok=True)
    as_yaml = lambda items: OmegaConf.to_yaml(OmegaConf.create(list(items)))
    if resumed_from is not None:
        changes = config_changes(OmegaConf.load(resumed_from / TRAIN_CONFIG), cfg)
        header = [f"resumed from {resumed_from}: its {TRAIN_CONFIG} with these overrides applied",
                  f"(fixed on resume: {', '.join(FIXED_ON_RESUME)}; except {', '.join(FREE_DATA)})",
                  "settings changed:", *(f"  {key}: {old} -> {new}"
                                         for key, (old, new) in changes.items())]
        stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
        (out / f"resume-{stamp}-overrides.yaml").write_text(
            "".join(f"# {line}\n" for line in header) + as_yaml(overrides))
        return
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (out / "overrides.yaml").write_text(as_yaml(overrides))


# ---------------------------------------------------------------- metrics

def trim_metrics(path: Path, last_step: int) -> None:
    """Drop records a killed run wrote after the checkpoint being resumed (atomically)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


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
    tmp = run_dir / f".{LOSS_PLOT}"
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, run_dir / LOSS_PLOT)


# ---------------------------------------------------------------- init_from / uptraining

def override_keys(overrides: Sequence[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]


def source_steps(cfg: Any, source: Path) -> int | None:
    """The steps the init_from source was trained for: uptrain.source_steps, else its meta."""
    meta = read_meta(source)
    return cfg.uptrain.source_steps or meta.get("source_step", meta.get("step"))


def uptrain_config(cfg: DictConfig, source: Path, overrides: Sequence[str]) -> DictConfig:
    """Uptraining reuses the source run's recipe except what the user set explicitly, runs
    round(alpha · source steps) steps, and tokenizes the corpus with the source's tokenizer."""
    # a missing or foreign checkpoint fails here, early
    source_cfg = read_hf_config(source) if is_hf_model(source) else read_config(source)
    source_step = source_steps(cfg, source)
    user = override_keys(overrides)
    overridden = lambda key: any(k == key or k.startswith(key + ".") for k in user)
    if cfg.uptrain.alpha is not None and not source_step and not overridden("max_steps"):
        raise TrainError(f"uptrain.alpha needs the steps {source} was trained for, and it records "
                         f"none (HF checkpoints never do): pass uptrain.source_steps=N, or set "
                         f"max_steps=N instead")
    if not tokenizer_files(source) and not overridden("data.tokenizer"):
        raise TrainError(f"{source} has no tokenizer.model, tokenizer.json or vocab.json + "
                         f"merges.txt: init_from needs the source's tokenizer; pass "
                         f"data.tokenizer=<its tokenizer>")
    cfg = cfg.copy()
    take_source_model(cfg, source, source_cfg, {k: o for o, k in zip(overrides, user)
                                                 if k == "model" or k.startswith("model.")})
    if not overridden("attention"):  # keep the source's KV heads unless asked to convert
        cfg.attention.n_kv_head = source_cfg.n_kv_head
    if cfg.uptrain.alpha is not None and (source / TRAIN_CONFIG).is_file():
        recipe = OmegaConf.load(source / TRAIN_CONFIG)
        for key in RECIPE:
            if key in recipe and not overridden(key):
                OmegaConf.update(cfg, key, recipe[key], merge=True)
    if cfg.uptrain.alpha is not None and not overridden("max_steps"):
        cfg.max_steps = max(1, round(cfg.uptrain.alpha * source_step))
    if cfg.seq_len > source_cfg.max_seq_len:  # before any data is prepared
        raise TrainError(f"seq_len={cfg.seq_len} exceeds the context of {source}, "
                         f"max_seq_len={source_cfg.max_seq_len}: pass seq_len="
                         f"{source_cfg.max_seq_len} or less (or drop seq_len: it follows the source)")
    check_target_heads(cfg, source_cfg)
    if overridden("data.tokenizer"):
        check_data_tokenizer(cfg.data.tokenizer, source, source_cfg.vocab_size)
    else:  # the user names the corpus, the source its tokens
        cfg.data.tokenizer = str(source.resolve())
    return cfg


def check_target_heads(cfg: DictConfig, source_cfg: ModelConfig) -> None:
    """The KV heads init_from converts to, refused before any data is prepared."""
    from model.convert import ConvertError, check_target
    n_kv, up = cfg.attention.n_kv_head or source_cfg.n_head, cfg.uptrain
    try:
        if n_kv != source_cfg.n_kv_head:
            check_target(source_cfg.n_kv_head, n_kv, up.method, up.group, up.align)
    except ConvertError as e:
        raise TrainError(str(e)) from None
    model_config(cfg, source_cfg.vocab_size)  # the converted model's own consistency


def check_data_tokenizer(tokenizer: str, source: Path, vocab_size: int) -> None:
    """A data.tokenizer given with init_from or resume: the source's own, and one its
    embeddings hold, checked before it tokenizes anything."""
    given = load_tokenizer(tokenizer)
    runs.check_tokenizer(given, source, TrainError)
    if given.vocab_size > vocab_size:  # fewer is fine: HF pads embeddings
        raise TrainError(f"{source} has vocab_size {vocab_size} but the tokenizer has "
                         f"{given.vocab_size} ids: use the source's tokenizer (drop data.tokenizer)")


def take_source_model(cfg: DictConfig, source: Path, source_cfg: ModelConfig,
                      asked: dict[str, str]) -> None:
    """init_from trains the source's model: its shape becomes cfg.model (so the recorded config
    describes the run, and seq_len follows its context). asked: the user's model.* or
    model=<group> overrides by key, refused if they disagree with it rather than ignored."""
    shape = {k: getattr(source_cfg, k) for k in ModelSizeConfig.__dataclass_fields__}
    if asked:  # compare resolved configs: head_dim=0 etc. mean the derived value
        sizes = {k: select(cfg.model, k) for k in shape}
        wanted = vars(ModelConfig(vocab_size=source_cfg.vocab_size, n_kv_head=0, **sizes))
        keys = shape if "model" in asked else [k.removeprefix("model.") for k in asked]
        differ = [f"{k}={shape[k]}" for k in keys if wanted[k] != shape[k]]
        if differ:
            raise TrainError(f"{' '.join(asked.values())} disagrees with {source}'s model ("
                             f"{', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}): "
                             f"init_from trains the source's own model; drop the model "
                             f"overrides (attention.n_kv_head picks the KV heads)")
    for key, value in shape.items():
        cfg.model[key] = value


def init_model(cfg: Any, vocab_size: int) -> tuple[Transformer, dict]:
    """A fresh model, or init_from's weights (ours or an HF Llama/GPT-2/NeoX dir's) converted to the
    configured KV heads."""
    if not cfg.init_from:
        return Transformer(model_config(cfg, vocab_size)), {}
    source = Path(cfg.init_from)
    # fp32 master weights, whatever the source's dtype
    model = (import_hf(source, dtype=torch.float32) if is_hf_model(source)
             else load_checkpoint(source, dtype=torch.float32).model)
    source_cfg = model.config
    if vocab_size > source_cfg.vocab_size:  # the source's own tokenizer, larger than its model
        raise TrainError(f"{source} has vocab_size {source_cfg.vocab_size} but the tokenizer has "
                         f"{vocab_size} ids: use the source's tokenizer (drop data.tokenizer)")
    n_kv = cfg.attention.n_kv_head or source_cfg.n_head
    if n_kv != source_cfg.n_kv_head:
        from model.convert import ConvertError, convert_model, needs_calibration, token_windows
        up = cfg.uptrain
        try:
            calib = (token_windows(cfg.data, "train", source_cfg.max_seq_len, up.calib_windows,
                                   vocab_size) if needs_calibration(up.group, up.align) else None)
            model = convert_model(model, n_kv, up.method, up.seed, up.group, up.align, calib)
        except ConvertError as e:
            raise TrainError(str(e)) from None
    meta = read_meta(source)
    provenance = {"init_from": str(source.resolve()), "source_n_kv_head": source_cfg.n_kv_head,
                  "source_step": source_steps(cfg, source),
                  "uptrain_alpha": cfg.uptrain.alpha, "uptrain_method": cfg.uptrain.method,
                  "uptrain_group": cfg.uptrain.group, "uptrain_align": cfg.uptrain.align,
                  "uptrain_calib_windows": cfg.uptrain.calib_windows}
    if "converted_from" in meta:  # written by model.convert
        provenance["converted_from"] = meta["converted_from"]
    return model.train(), provenance


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


# ---------------------------------------------------------------- the loop

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


def sum_dtype(device: torch.device) -> torch.dtype:
    """What loss and token sums accumulate in: float64 (exact counts, no drift over many
    batches), but float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


@torch.no_grad()
def evaluate(model, accelerator: Accelerator, prepared, cfg: Any) -> float:
    """Mean val loss per token over eval_batches per process (each val window once, padding
    ignored), all processes pooled."""
    model.eval()
    device = accelerator.device
    total = torch.zeros(2, device=device, dtype=sum_dtype(device))  # (loss sum, tokens)
    for x, y in eval_batches(prepared.val_bin, prepared.dtype, cfg.seq_len, cfg.batch_size,
                             cfg.eval_batches, accelerator.process_index, accelerator.num_processes):
        logits = model(x.to(accelerator.device))
        y = y.to(accelerator.device)
        total[0] += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                    ignore_index=IGNORE_INDEX, reduction="sum")
        total[1] += (y != IGNORE_INDEX).sum()
    model.train()
    total = accelerator.gather_for_metrics(total[None]).sum(0)  # (2,)
    return (total[0] / total[1]).item()  # eval_batches raised DataError if val has no window


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
    with accelerator.autocast():
        out = generate(model, prompt, new, SamplingConfig(temperature=0.8, top_k=50),
                       generator=torch.Generator(model.device).manual_seed(cfg.seed))
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def save_training_checkpoint(accelerator: Accelerator, model, run_dir: Path, step: int,
                             meta: dict, trainer_state: dict, cfg_yaml: str,
                             tokenizer_files: dict, keep_last: int) -> Path:
    """Every rank writes its part of Accelerate's state (optimizer, RNG) into a staging dir;
    the main process moves it into the checkpoint's temp dir, renames the whole checkpoint
    into place, then swaps `latest`. A kill at any moment leaves `latest` readable."""
    root = run_dir / "checkpoints"
    path, staging = root / f"step_{step}", root / f".staging-step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))
    loaders = gather_object([trainer_state.pop("loader")])  # every rank's data position
    # the full weights: gathered from every rank's shard under FSDP, on the main process only
    state = accelerator.get_state_dict(getattr(model, "_orig_mod", model))
    if accelerator.is_main_process:
        def extra(tmp: Path) -> None:
            os.replace(staging, tmp / ACCEL_STATE)
            (tmp / TRAIN_CONFIG).write_text(cfg_yaml)
            write_json(tmp / TRAINER_STATE, {**trainer_state, "loaders": loaders})

        save_checkpoint(path, model, meta, files=tokenizer_files, overwrite=True,
                        extra=extra, state=state)
        point_latest(root, path.name)
        prune_checkpoints(root, keep_last)
    accelerator.wait_for_everyone()
    return path


def resume_point(cfg: Any, run_dir: Path) -> Path | None:
    if cfg.resume in (False, None) or str(cfg.resume).lower() == "false":
        return None
    if cfg.resume is True or str(cfg.resume).lower() == "true":
        if not os.path.lexists(run_dir / "checkpoints" / "latest"):
            raise TrainError(f"resume=true but {run_dir} has no checkpoint: pass "
                             f"resume=<run or checkpoint dir>, or run_dir=<the run to continue>")
        return find_checkpoint(run_dir)
    return find_checkpoint(Path(str(cfg.resume)))


# What a resume cannot change: the model, the token stream and its batches, and the
# optimizer's recipe and numerics. A change there is a new run, not a continuation. data's
# settings that leave the tokens as they are stay free (the tokenizer is checked by its bytes).
FIXED_ON_RESUME = ("model", "attention", "data", "optim", "seed", "batch_size", "grad_accum",
                   "seq_len", "batch_mode", "mixed_precision", "fsdp_reduce_dtype", "init_from",
                   "uptrain")
FREE_DATA = ("data.num_proc", "data.cache_dir", "data.streaming", "data.tokenizer")


def fixed_on_resume(key: str) -> bool:
    return key not in FREE_DATA and any(key == k or key.startswith(k + ".")
                                        for k in FIXED_ON_RESUME)


def config_changes(old: DictConfig, new: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Each setting whose value differs: dotted key -> (old, new)."""
    changes = {key: (OmegaConf.select(old, key), OmegaConf.select(new, key))
               for key in cli.leaf_keys(new)}
    return {key: pair for key, pair in changes.items() if pair[0] != pair[1]}


def resume_config(cfg: DictConfig, checkpoint: Path, overrides: Sequence[str]) -> DictConfig:
    """The resumed run's config: the checkpoint's train_config.yaml with only the settings
    overridden on this command line applied. One that would change the run is refused."""
    # typed by the schema; a setting newer than the checkpoint keeps its default
    saved = OmegaConf.merge(cfg, OmegaConf.load(checkpoint / TRAIN_CONFIG))
    resumed = saved.copy()
    user = [key for key in override_keys(overrides) if not key.startswith("hydra.")]
    for key in user:  # a group (data=text_files) brings every setting of the group
        OmegaConf.update(resumed, key, OmegaConf.select(cfg, key), merge=False)
    if saved.data.tokenizer and "data.tokenizer" not in user:
        resumed.data.tokenizer = str(checkpoint)  # an uptrain's source tokenizer: it carries it
    elif "data.tokenizer" in user and resumed.data.tokenizer:
        check_data_tokenizer(resumed.data.tokenizer, checkpoint, read_config(checkpoint).vocab_size)
    saved.run_dir = resumed.run_dir = str(checkpoint.parent.parent)  # the run that owns it
    saved.resume = resumed.resume = cfg.resume
    changes = config_changes(saved, resumed)
    if fixed := [key for key in changes if fixed_on_resume(key)]:
        shown = ", ".join(f"{key}={changes[key][1]} (the run's: {changes[key][0]})" for key in fixed)
        raise TrainError(f"a resume continues {checkpoint} exactly as its {TRAIN_CONFIG} says and "
                         f"cannot change {shown}: drop the override, or start a new run instead "
                         f"(another run_dir; init_from={checkpoint} starts from its weights)")
    return resumed


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> TrainResult:
    """Train per cfg (composed from configs/train.yaml). overrides: the user's Hydra
    overrides, which uptraining keeps over the source's recipe."""
    check_config(cfg)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # no per-save INFO lines
    # resume=true names the run by run_dir, which the user then gave: the same on every rank
    run_dir = Path(cfg.run_dir).resolve()
    lock.check_free(run_dir / RUN_LOCK, str(run_dir), RUN_BUSY_FIX, TrainError)  # at once
    resume_from = resume_point(cfg, run_dir)
    if resume_from is not None:  # the accelerator needs its config (grad_accum, precision)
        cfg = resume_config(cfg, resume_from, overrides)
    elif cfg.init_from:
        cfg = uptrain_config(cfg, Path(cfg.init_from), overrides)
    run_dir = Path(cfg.run_dir).resolve()
    accelerator = make_accelerator(cfg, run_dir)
    # Each rank's Hydra picked its own timestamped dir; rank 0's is the run's.
    run_dir = Path(broadcast_object_list([str(run_dir)])[0])
    with hold_run_dir(accelerator, run_dir), GracefulStop(cfg.on_signal) as stop:
        return run_training(cfg, overrides, accelerator, run_dir, resume_from, stop)


def run_training(cfg: DictConfig, overrides: Sequence[str], accelerator: Accelerator,
                 run_dir: Path, resume_from: Path | None, stop: GracefulStop) -> TrainResult:
    main = accelerator.is_main_process
    if resume_from is not None:
        state = json.loads((resume_from / TRAINER_STATE).read_text())
        if len(state["loaders"]) != accelerator.num_processes:
            raise TrainError(f"{resume_from} was written by {len(state['loaders'])} processes; "
                             f"resume it with as many (this run has {accelerator.num_processes})")
        if cfg.max_steps < state["step"]:
            raise TrainError(f"max_steps={cfg.max_steps} is below {resume_from}'s step "
                             f"{state['step']}: pass max_steps>={state['step']}, or none")
    check_run_dir(run_dir, cfg, resuming=resume_from is not None)

    with accelerator.main_process_first():  # one process tokenizes, the others hit the cache
        prepared = prepare_data(as_data_config(cfg.data), progress=main)
    tokenizer = prepared.tokenizer()
    if cfg.init_from or resume_from is not None:  # a tokenizer trained here, e.g. on resume
        runs.check_tokenizer(tokenizer, resume_from or Path(cfg.init_from), TrainError)

    set_seed(cfg.seed)  # identical init on every rank
    if resume_from is not None:
        model = load_checkpoint(resume_from, dtype=torch.float32).model.train()
        provenance = {k: v for k, v in read_meta(resume_from).items()
                      if k.startswith(("init_from", "source_", "uptrain_", "converted_from"))}
    else:
        model, provenance = init_model(cfg, tokenizer.vocab_size)
    model_cfg = model.config
    if cfg.seq_len > model_cfg.max_seq_len:
        raise TrainError(f"seq_len={cfg.seq_len} exceeds the model's max_seq_len "
                         f"{model_cfg.max_seq_len}")
    if main:
        print(format_summary(model_cfg))
    model.activation_checkpointing = cfg.activation_checkpointing
    optimizer = build_optimizer(model, cfg.optim, fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(model, optimizer)
    if main and (precision_line := fsdp_precision(model)):
        print(precision_line)
    if use_compile(cfg, accelerator.device):  # after wrapping: DDP/FSDP hooks stay outside
        model = torch.compile(model)

    stream = TokenStream(prepared.train_bin, prepared.dtype, cfg.seq_len, cfg.batch_size,
                         seed=cfg.seed, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, mode=cfg.batch_mode)
    step, tokens_seen = 0, 0
    step_last, loss_carried = 0, 0.0  # the last train_loss record; losses summed since
    if resume_from is not None:
        accelerator.load_state(str(resume_from / ACCEL_STATE))
        stream.load_state_dict(state["loaders"][accelerator.process_index])
        step, tokens_seen = state["step"], state["tokens_seen"]
        # checkpoints before these keys: the first record averages the steps since the resume
        step_last, loss_carried = state.get("step_last", step), state.get("loss_sum", 0.0)
    if main:  # accepted: only now does anything land in the run dir
        prepare_run_dir(run_dir, cfg, step if resume_from else None, overrides, resume_from)
    accelerator.wait_for_everyone()
    start_trackers(accelerator, cfg, run_dir)
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * accelerator.num_processes
    flops_per_step = flops_per_token(model_cfg, cfg.seq_len) * tokens_per_step
    peak = peak_tflops(cfg.peak_tflops, accelerator.device, accelerator.mixed_precision)
    eval_every = cfg.eval_every or cfg.max_steps
    ckpt_every = cfg.ckpt_every or eval_every
    val_loss, checkpoint, sample = None, None, ""
    train_loss, tok_s, grad_norm = math.nan, 0.0, math.nan

    bar = tqdm(total=cfg.max_steps, initial=step, disable=not main, dynamic_ncols=True,
               desc=f"train {model_cfg.attention_type}")
    t_last, timed_from = time.perf_counter(), step  # throughput: steps since t_last
    # micro-batch losses since the last train_loss record (a resume carries them over)
    loss_sum = torch.full((), loss_carried, device=accelerator.device)
    stopped_by, save_s = stop.requested(accelerator), 0.0  # one during data prep: no step
    while step < cfg.max_steps and not stopped_by:
        lr = lr_at(step, cfg.max_steps, cfg.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for _ in range(cfg.grad_accum):
            x, y = stream.next_batch()
            with accelerator.accumulate(model):
                logits = model(x.to(accelerator.device))  # (B, T, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1),
                                       y.to(accelerator.device).flatten())
                accelerator.backward(loss)  # scales by 1/grad_accum itself
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(),
                                                            cfg.optim.grad_clip or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
        step += 1
        tokens_seen += tokens_per_step
        bar.update(1)
        stopped_by = stop.requested(accelerator) if step < cfg.max_steps else None

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # the mean over every micro-batch since the last record, not the last step's
            micro_batches = cfg.grad_accum * (step - step_last)
            train_loss = accelerator.reduce(loss_sum / micro_batches, "mean").item()
            loss_sum.zero_()
            now = time.perf_counter()
            tok_s = tokens_per_step * (step - timed_from) / (now - t_last)
            # model FLOPs per second per device; MFU: its fraction of the device's peak
            tflops = (flops_per_step * (step - timed_from) / (now - t_last)
                      / accelerator.num_processes / 1e12)
            mfu = tflops / peak if peak else None
            t_last, timed_from, step_last = now, step, step
            record = {"step": step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tok_s,
                      "grad_norm": float(grad_norm), "tokens_seen": tokens_seen,
                      "tflops_per_device": tflops, "mfu": mfu}
            if main:
                append_metrics(run_dir / METRICS, record)
                bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}",
                                **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
            accelerator.log({f"train/{k}": v for k, v in record.items()
                             if k != "step" and v is not None}, step=step)

        if step % eval_every == 0 or step == cfg.max_steps:
            val_loss = evaluate(model, accelerator, prepared, cfg)
            if main or is_fsdp(accelerator):
                sample = sample_text(model, accelerator, tokenizer, cfg)
            if main:
                append_metrics(run_dir / METRICS, {"step": step, "val_loss": val_loss})
                bar.write(f"step {step}/{cfg.max_steps}: train {train_loss:.4f}  val {val_loss:.4f}  "
                          f"lr {lr:.2e}  {tok_s:,.0f} tok/s")
                accelerator.log({"val/loss": val_loss}, step=step)
                if cfg.logger.backend == "wandb":
                    accelerator.get_tracker("wandb").log_table(
                        "samples", columns=["step", "prompt", "sample"],
                        data=[[step, cfg.sample_prompt, sample]], step=step)
            t_last, timed_from = time.perf_counter(), step  # eval time is not throughput

        if step % ckpt_every == 0 or step == cfg.max_steps or stopped_by:
            t_save = time.perf_counter()
            meta = {"step": step, "tokens_seen": tokens_seen, "max_steps": cfg.max_steps,
                    "val_loss": val_loss, "train_loss": train_loss,
                    "attention": model_cfg.attention_type, "n_kv_head": model_cfg.n_kv_head,
                    "seed": cfg.seed, "num_processes": accelerator.num_processes, **provenance}
            # the running train_loss too, so a resume's first record is the same mean
            trainer_state = {"step": step, "tokens_seen": tokens_seen, "loader": stream.state_dict(),
                             "step_last": step_last,
                             "loss_sum": accelerator.reduce(loss_sum, "mean").item()}
            checkpoint = save_training_checkpoint(accelerator, model, run_dir, step, meta,
                                                  trainer_state, cfg_yaml, prepared.tokenizer_files,
                                                  cfg.keep_last)
            t_last, timed_from = time.perf_counter(), step
            save_s = t_last - t_save
    bar.close()

    if stopped_by:
        if main:
            saved = (f"checkpoint {checkpoint} (saved in {save_s:.2f} s)" if checkpoint
                     else "nothing new to checkpoint")
            print(f"{stopped_by}: stopped at step {step}/{cfg.max_steps}, {saved}; exit "
                  f"{REQUEUE_STATUS}, resume=true continues", flush=True)
        accelerator.end_training()
        return TrainResult(step, val_loss, checkpoint, run_dir, sample, stopped_by)
    if main:
        plot_losses(run_dir)
        print(f"done: {step} steps, val loss {val_loss}, checkpoint {checkpoint}")
        print(f"sample ({cfg.sample_prompt!r}):\n{sample}")
    accelerator.end_training()
    return TrainResult(step, val_loss, checkpoint, run_dir, sample)


@cli.hydra_main(config_path="configs", config_name="train", errors=(*USER_ERRORS, OSError))
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    if train(cfg, HydraConfig.get().overrides.task).stopped_by:
        sys.exit(REQUEUE_STATUS)


if __name__ == "__main__":
    main()
