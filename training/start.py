"""How a train.py run starts, decided before any data or model is touched, and the run dir
it owns: `decide_start` returns a `Start` (fresh, init_from's weights converted to the
configured KV heads, or a resume of a checkpoint with the overrides it allows), after
every refusal that needs only the config and the source's config.json; `hold_run_dir`
locks the dir for the run's life; `prepare_run_dir` records the accepted config. The
checkpoints themselves (find, restore, save, rewind) are training/checkpointer.py's.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf

import cli
from data.tokenizer import Tokenizer, load_tokenizer, tokenizer_files
from store import lock, runs
from store.checkpoint import load_checkpoint, read_config, read_meta
from model.config import ModelConfig
from store.runs import RUN_LOCK, TRAIN_CONFIG
from store.source import FLOAT, Source, open_source
from model.transformer import Transformer
from training.checkpointer import Checkpointer, read_trainer_state, resume_point
from training.config import (ATTENTION_FIELDS, ModelSizeConfig, check_config, model_config,
                             select)

# The parts of a source run's config that uptraining reuses unless overridden (§2.1: same
# recipe, alpha of the steps).
RECIPE = ("optim", "batch_size", "grad_accum", "seq_len", "batch_mode", "data")

class TrainError(cli.UserError):
    """A problem the user can fix (paths, run dirs, resume/uptrain inputs); one line."""


@dataclass
class Start:
    """How a run begins. cfg: the run's config (a resume's is its checkpoint's, with the
    overrides it allows); resume_from and state: the checkpoint a resume continues and its
    trainer_state.json."""
    cfg: DictConfig
    run_dir: Path
    overrides: Sequence[str] = ()
    resume_from: Path | None = None
    state: dict = field(default_factory=dict)

    def join(self, accelerator: Accelerator) -> None:
        """Every rank: rank 0's run dir (each rank's Hydra picked its own timestamped one),
        and a resume only with as many processes as wrote its checkpoint."""
        self.run_dir = Path(broadcast_object_list([str(self.run_dir)])[0])
        written_by = len(self.state.get("loaders", [None] * accelerator.num_processes))
        if written_by != accelerator.num_processes:
            raise TrainError(f"{self.resume_from} was written by {written_by} processes; "
                             f"resume it with as many (this run has {accelerator.num_processes})")

    @property
    def source(self) -> Path | None:
        """Whose token ids the model knows: the resumed checkpoint, or init_from."""
        if self.resume_from or not self.cfg.init_from:
            return self.resume_from
        return open_source(self.cfg.init_from, "init_from", FLOAT).path  # a Hub id: its snapshot

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """The tokenizer the data was prepared with (one trained here, e.g. on resume)."""
        if self.source is not None:
            runs.check_tokenizer(tokenizer, self.source, TrainError)

    def model(self, vocab_size: int) -> tuple[Transformer, dict]:
        """fp32 master weights: fresh, init_from's, or the resumed checkpoint's; and the
        provenance every checkpoint's meta.json carries on."""
        if self.resume_from is None:
            model, provenance = init_model(self.cfg, vocab_size)
        else:
            model = load_checkpoint(self.resume_from, dtype=torch.float32).model.train()
            provenance = {k: v for k, v in read_meta(self.resume_from).items()
                          if k.startswith(("init_from", "source_", "uptrain_", "converted_from"))}
        if self.cfg.seq_len > model.config.max_seq_len:
            raise TrainError(f"seq_len={self.cfg.seq_len} exceeds the model's max_seq_len "
                             f"{model.config.max_seq_len}")
        return model, provenance



def decide_start(cfg: DictConfig, overrides: Sequence[str]) -> Start:
    """Every rank, before any data, model or write: the config checks, a run dir another
    train.py holds, the resume's checkpoint and config, init_from's source config."""
    check_config(cfg)
    # resume=true names the run by run_dir, which the user then gave: the same on every rank
    run_dir = Path(cfg.run_dir).resolve()
    lock.check_free(run_dir / RUN_LOCK, str(run_dir), RUN_BUSY_FIX, TrainError)  # at once
    resume_from, state = resume_point(cfg.resume, run_dir), {}
    if resume_from is not None:  # the accelerator needs its config (grad_accum, precision)
        cfg = resume_config(cfg, resume_from, overrides)
        state = read_trainer_state(resume_from)
        if cfg.max_steps < state["step"]:
            raise TrainError(f"max_steps={cfg.max_steps} is below {resume_from}'s step "
                             f"{state['step']}: pass max_steps>={state['step']}, or none")
    elif cfg.init_from:
        cfg = uptrain_config(cfg, cfg.init_from, overrides)
    return Start(cfg, Path(cfg.run_dir).resolve(), list(overrides), resume_from, state)


# ---------------------------------------------------------------- resume

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

def override_keys(overrides: Sequence[str]) -> list[str]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]


# ---------------------------------------------------------------- init_from / uptraining

def source_steps(cfg: Any, source: Source) -> int | None:
    """The steps the init_from source was trained for: uptrain.source_steps, else its meta."""
    return cfg.uptrain.source_steps or source.meta.get("source_step", source.meta.get("step"))

def uptrain_config(cfg: DictConfig, init_from: str | Path,
                   overrides: Sequence[str]) -> DictConfig:
    """Uptraining reuses the source run's recipe except what the user set explicitly, runs
    round(alpha · source steps) steps, and tokenizes the corpus with the source's tokenizer.
    A run dir as init_from is recorded as the step it names (`latest` moves on), a Hub id as
    the commit it resolved to (`org/name@<commit>`: the branch moves on)."""
    opened = open_source(init_from, "init_from", FLOAT)  # a missing or foreign one fails early
    source, source_cfg, source_step = opened.path, opened.config, source_steps(cfg, opened)
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
    if opened.run_dir is not None or opened.hub is not None:
        cfg.init_from = opened.spec
    take_source_model(cfg, source, source_cfg, {k: o for o, k in zip(overrides, user)
                                                 if k == "model" or k.startswith("model.")})
    if not overridden("attention"):  # keep the source's KV heads unless asked to convert
        for key in ATTENTION_FIELDS:  # an MLA source's latent shape too
            cfg.attention[key] = getattr(source_cfg, key)
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
    from convert.heads import ConvertError, Conversion, check_target
    n_kv, up = cfg.attention.n_kv_head or source_cfg.n_head, cfg.uptrain
    if cfg.attention.kv_rank or source_cfg.kv_rank:
        check_same_latent(cfg, source_cfg)
        return
    try:
        if n_kv != source_cfg.n_kv_head:
            conversion = Conversion(n_kv, up.method, up.group, up.align, up.seed)
            check_target(source_cfg.n_kv_head, conversion)
    except ConvertError as e:
        raise TrainError(str(e)) from None
    model_config(cfg, source_cfg.vocab_size)  # the converted model's own consistency

def check_same_latent(cfg: DictConfig, source_cfg: ModelConfig) -> None:
    """init_from with MLA on either side: only the source's own MLA shape, since no
    conversion to or from MLA exists yet."""
    target = model_config(cfg, source_cfg.vocab_size)
    if any(getattr(target, k) != getattr(source_cfg, k) for k in ATTENTION_FIELDS):
        raise TrainError(f"init_from converts K/V heads only: {source_cfg.attention_type} -> "
                         f"{target.attention_type} (MLA's kv_rank/rope_dim) is not supported; "
                         f"drop the attention overrides to uptrain the source as it is, or "
                         f"train the MLA model from scratch (drop init_from)")

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
    source = open_source(cfg.init_from, "init_from", FLOAT)
    model = source.load(dtype=torch.float32)  # fp32 master weights, whatever the stored dtype
    source_cfg = model.config
    if vocab_size > source_cfg.vocab_size:  # the source's own tokenizer, larger than its model
        raise TrainError(f"{source.path} has vocab_size {source_cfg.vocab_size} but the "
                         f"tokenizer has {vocab_size} ids: use the source's tokenizer (drop "
                         f"data.tokenizer)")
    n_kv = cfg.attention.n_kv_head or source_cfg.n_head
    if n_kv != source_cfg.n_kv_head:
        from convert.heads import Calibration, ConvertError, Conversion, convert_model
        from convert.command import token_windows
        up = cfg.uptrain
        try:
            conversion = Conversion(n_kv, up.method, up.group, up.align, up.seed)
            n_windows, length = Calibration(up.calib_windows, up.calib_seq_len).shape(
                source_cfg.max_seq_len)
            calib = (token_windows(cfg.data, "train", length, n_windows, vocab_size)
                     if conversion.needs_calibration else None)
            model = convert_model(model, conversion, calib)
        except ConvertError as e:
            raise TrainError(str(e)) from None
    provenance = {"init_from": str(source.path), **({"init_from_hub": source.hub.spec}
                                                    if source.hub else {}),
                  "source_n_kv_head": source_cfg.n_kv_head,
                  "source_step": source_steps(cfg, source),
                  "uptrain_alpha": cfg.uptrain.alpha, "uptrain_method": cfg.uptrain.method,
                  "uptrain_group": cfg.uptrain.group, "uptrain_align": cfg.uptrain.align,
                  "uptrain_calib_windows": cfg.uptrain.calib_windows,
                  "uptrain_calib_seq_len": cfg.uptrain.calib_seq_len}
    if cfg.uptrain.distill:  # λ = 0 keeps today's meta.json
        provenance.update(uptrain_distill=cfg.uptrain.distill,
                          uptrain_distill_temperature=cfg.uptrain.distill_temperature)
    if "converted_from" in source.meta:  # written by convert
        provenance["converted_from"] = source.meta["converted_from"]
    return model.train(), provenance


# ---------------------------------------------------------------- the run dir

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
    if not resuming and not cfg.overwrite and runs.has_checkpoints(run_dir):
        raise TrainError(f"{run_dir} already has checkpoints: resume=true continues it, "
                         f"overwrite=true starts over, or choose another run_dir")

def prepare_run_dir(run_dir: Path, cfg: Any, resume_step: int | None,
                    overrides: Sequence[str], resumed_from: Path | None = None) -> None:
    """Main process, once the run is accepted: start over (overwrite=true) or rewind a
    resumed run to its checkpoint, then record the config."""
    checkpointer = Checkpointer(run_dir, cfg.keep_last)
    if resume_step is not None:
        checkpointer.rewind(resume_step)
    else:
        if runs.has_checkpoints(run_dir):  # overwrite=true: the config it recorded goes too
            shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        checkpointer.start_over()
    run_dir.mkdir(parents=True, exist_ok=True)
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
