"""Typed schema of train.py's Hydra config.

configs/train.yaml composes the groups model/, attention/, data/, optim/, logger/ onto
`TrainConfig`, so a misspelt key (`model.n_layr=3`) or a wrong type (`model.n_layer=abc`)
fails when the config is composed, before anything runs. Combinations the types cannot
express (n_head not divisible by n_kv_head, seq_len above max_seq_len) are checked by
`check_config`, which raises one-line errors.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore

from data.config import DataConfig
from convert.align import Alignment, Grouping
from convert.heads import Method
from model.config import ConfigError, ModelConfig


# The model group's schema is ModelConfig itself (one declaration of the model's shape, one
# set of defaults; configs/model/*.yaml only set fields), less vocab_size (the tokenizer's)
# and the attention group's fields (n_kv_head; MLA's kv_rank, rope_dim, nope_dim, v_dim).
ATTENTION_FIELDS = ("n_kv_head", "kv_rank", "rope_dim", "nope_dim", "v_dim")
NOT_IN_MODEL_GROUP = ("vocab_size", "rope_freqs", *ATTENTION_FIELDS)  # rope_freqs: convert's
ModelSizeConfig = make_dataclass(
    "ModelSizeConfig", [(f.name, get_type_hints(ModelConfig)[f.name], field(default=f.default))
                        for f in fields(ModelConfig) if f.name not in NOT_IN_MODEL_GROUP])


class BatchMode(enum.StrEnum):
    random = "random"  # random windows, per-process seeds
    sequential = "sequential"


class Precision(enum.StrEnum):
    auto = "auto"  # bf16 on CUDA, no on CPU (bf16 autocast is several times slower there)
    no = "no"
    bf16 = "bf16"
    fp16 = "fp16"


class ReduceDtype(enum.StrEnum):
    fp32 = "fp32"  # FSDP's gradient reduce-scatter in fp32 under bf16/fp16
    compute = "compute"  # in the compute dtype


class Backend(enum.StrEnum):
    wandb = "wandb"
    none = "none"


class OnSignal(enum.StrEnum):
    checkpoint = "checkpoint"  # finish the step, checkpoint it, exit 143
    exit = "exit"  # the signal's default action


@dataclass
class AttentionConfig:
    n_kv_head: int = 0  # 0 = n_head (MHA), 1 = MQA, between = GQA
    # MLA (attention=mla, docs/mla.md): kv_rank > 0 caches one latent per token instead
    kv_rank: int = 0  # the latent's width; 0: not MLA
    rope_dim: int = 0  # the RoPE key shared by all heads (even; 0 with learned positions)
    nope_dim: int = 0  # each head's unrotated query/key width; 0: head_dim - rope_dim
    v_dim: int = 0  # each head's value width; 0: head_dim


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak, reached after warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio at max_steps
    warmup_frac: float = 0.05  # of max_steps; a fraction so uptraining keeps the shape
    weight_decay: float = 0.1  # on matrices only; norms are never decayed
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class WandbConfig:
    project: str = "gqalab"
    entity: Optional[str] = None
    name: Optional[str] = None
    mode: Optional[str] = None  # offline | online | disabled; None: $WANDB_MODE or offline
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    backend: Backend = Backend.wandb
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class UptrainConfig:
    alpha: Optional[float] = None  # max_steps = round(alpha · source steps); recipe from source
    source_steps: Optional[int] = None  # the source's training steps (HF dirs record none)
    method: Method = Method.mean  # K/V head pooling when init_from has other n_kv_head: mean|first|random
    seed: int = 0  # for method=random
    group: Grouping = Grouping.contiguous  # which heads share a pooled head: contiguous | similar (calibrated)
    align: Alignment = Alignment.none  # before pooling: none | procrustes | linear | linear_readers (convert/align.py)
    calib_windows: int = 64  # train windows that fit group=similar / align=procrustes|linear
    distill: float = 0.0  # λ: loss (1-λ)·CE + λ·τ²·KL(source ‖ student); 0: no teacher (training/distill.py)
    distill_temperature: float = 1.0  # τ
    calib_seq_len: int = 0  # tokens per calibration window; 0: the context up to 1024


@dataclass
class TrainConfig:
    model: ModelSizeConfig = field(default_factory=ModelSizeConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    uptrain: UptrainConfig = field(default_factory=UptrainConfig)

    run_dir: str = "${hydra:runtime.output_dir}"
    seed: int = 1337
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 16  # sequences per process per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    seq_len: int = 256
    batch_mode: BatchMode = BatchMode.random
    mixed_precision: Precision = Precision.auto
    compile: str = "auto"  # auto (on CUDA, not on CPU) | true | false: torch.compile the model
    fsdp_reduce_dtype: ReduceDtype = ReduceDtype.fp32
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    peak_tflops: Optional[float] = None  # per device, for MFU; None: known GPUs' bf16 peak

    log_every: int = 10  # steps between train-loss records (each the mean since the last)
    eval_every: int = 100  # steps between validations (and checkpoints); 0: only at the end
    eval_batches: int = 20  # per process: at most eval_batches*batch_size*processes val windows
    ckpt_every: int = 0  # 0: checkpoint at every eval
    keep_last: int = 2  # checkpoints kept on disk
    sample_prompt: str = "def "  # generated from at each eval (tracker table, end of run)
    sample_tokens: int = 64

    resume: Any = False  # true: <run_dir>/checkpoints/latest; or a run/checkpoint dir
    init_from: Optional[str] = None  # a checkpoint, HF dir or Hub id (org/name[@rev]) to start from
    overwrite: bool = False  # allow a new run in a run dir that already has checkpoints
    on_signal: OnSignal = OnSignal.checkpoint  # on SIGTERM, SIGINT or SIGUSR1


COMPILE = ("auto", "true", "false")  # a str, not an Enum: compile=true arrives as a bool
POSITIVE = ("max_steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_batches",
            "keep_last", "uptrain.calib_windows")


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)


def select(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def model_config(cfg: Any, vocab_size: int) -> ModelConfig:
    """The model's dataclass from the composed sizes + attention group + tokenizer."""
    sizes = {k: select(cfg.model, k) for k in ModelSizeConfig.__dataclass_fields__}
    attention = {k: select(cfg.attention, k) for k in ATTENTION_FIELDS}
    return ModelConfig(vocab_size=vocab_size, **attention, **sizes)


def check_config(cfg: Any) -> None:
    """Combinations the schema's types cannot catch; raises ConfigError (one line)."""
    cfg.compile = str(cfg.compile).lower()  # compile=true arrives as the bool's "True"
    if cfg.compile not in COMPILE:
        raise ConfigError(f"compile={cfg.compile!r} is not one of {list(COMPILE)}")
    for key in POSITIVE:
        if select(cfg, key) <= 0:
            raise ConfigError(f"{key}={select(cfg, key)} must be a positive integer")
    if cfg.peak_tflops is not None and cfg.peak_tflops <= 0:
        raise ConfigError(f"peak_tflops={cfg.peak_tflops} must be positive (or null: no MFU)")
    if cfg.eval_every < 0 or cfg.ckpt_every < 0:
        raise ConfigError("eval_every and ckpt_every must be >= 0 (0 means: only at the end)")
    if cfg.uptrain.alpha is not None and not cfg.init_from:
        raise ConfigError("uptrain.alpha needs init_from=<checkpoint dir> to uptrain from")
    if cfg.uptrain.alpha is not None and cfg.uptrain.alpha <= 0:
        raise ConfigError(f"uptrain.alpha={cfg.uptrain.alpha} must be positive (the paper: 0.05)")
    if not 0 <= cfg.uptrain.distill <= 1:
        raise ConfigError(f"uptrain.distill={cfg.uptrain.distill} must lie in [0, 1] (the "
                          f"teacher's share of the loss)")
    if cfg.uptrain.distill and not cfg.init_from:
        raise ConfigError("uptrain.distill needs init_from=<checkpoint dir>: the teacher is "
                          "the model uptraining starts from, before conversion")
    if cfg.uptrain.distill_temperature <= 0:
        raise ConfigError(f"uptrain.distill_temperature={cfg.uptrain.distill_temperature} "
                          f"must be positive")
    if cfg.resume not in (False, None) and cfg.init_from:
        raise ConfigError("pass either resume or init_from, not both: resume continues a run, "
                          "init_from starts a new one from a checkpoint")
    if not cfg.init_from:  # with init_from the sizes come from the source checkpoint
        model_config(cfg, vocab_size=cfg.data.vocab_size or 1)
        if cfg.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"seq_len={cfg.seq_len} exceeds model.max_seq_len="
                              f"{cfg.model.max_seq_len}: lower seq_len or raise max_seq_len")


register_configs()
