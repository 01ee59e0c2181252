"""The GQA paper's ablations at small scale (Ainslie et al. 2023, §2.1, Figs. 4 and 5).

    python -m experiments.gqa_ablation preset=quick              # a few minutes
    python -m experiments.gqa_ablation preset=default            # <= 45 min on 2 cores
    python -m experiments.gqa_ablation preset=default base_steps=1000 alphas=[0.05]

1. train an MHA model (n_head = 8) for base_steps with train.py;
2. convert it to each of kv_heads with each of methods (convert): the paper's mean,
   first and random, and mean pooling after choosing (`similar`) and/or aligning
   (`procrustes`) the heads, or least-squares shared heads (`linear`), fitted on
   calib_windows train windows; the K/V reconstruction error of each layer on as many val
   windows comes with each conversion;
3. val loss at alpha = 0, then uptrain each conversion with train.py for alpha x
   base_steps (uptrain.alpha) and measure again; a `+distill` method uptrains the same
   conversion with the MHA base as teacher (uptrain.distill), at the same tokens;
4. the fair control: the MHA base itself trained on for the same alpha x base_steps with
   the same recipe (`continued`), as the base is far from converged at this scale: an
   uptrained model is compared with what MHA itself gets from those steps;
5. train scratch_kv_heads from scratch for base_steps, as the reference;
6. KV-cache bytes per token and decode tokens/s at batch 8 with a long context.

Training runs are train.py subprocesses (experiments/cached_run.py); each run lives under
<out>/runs/, is reused when rerun with the same command and resumed from its last
checkpoint after a stop, so an interrupted or extended experiment never retrains the MHA base. Outputs in <out>:
results.csv, kv_errors.csv, results.md, fig4_conversion_methods.png, fig5_alpha.png.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import cli
from evaluation.scoring import held_out_tokens, val_loss
from evaluation.speed import decode_tok_s
from experiments.cached_run import run_dir_of, train_run
from experiments.presets import load_preset, named_conversion
from experiments.report import CONVERSIONS, variant_name, write_report
from store.checkpoint import load_checkpoint, read_meta
from convert.heads import Calibration, ConvertError, Conversion, check_target
from convert.command import convert_checkpoint
from model.kv_cache import kv_bytes_per_token
from model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "experiments" / "configs"


class ExperimentError(cli.UserError):
    """A setting the experiment cannot run with; the message names the fix."""


# ---- settings ---------------------------------------------------------------------------

@dataclass
class EvalSettings:
    windows: int = 64  # fixed val windows of the model's context, the same for every model
    batch_size: int = 16


@dataclass
class DecodeSettings:
    batch_size: int = 8
    context: int = 192  # prompt tokens before timing: the KV cache is this long
    new_tokens: int = 64
    repeats: int = 3  # best of: the CPU is shared


@dataclass
class Settings:
    """The schema of experiments/configs/*.yaml: typos and wrong types fail on load."""
    preset: str = "quick"
    out: str = "experiments/results/quick"
    seed: int = 0  # for method=random
    n_head: int = 8
    base_steps: int = 100
    kv_heads: list[int] = field(default_factory=lambda: [4, 2, 1])
    methods: list[str] = field(default_factory=lambda: ["mean", "first", "random"])  # CONVERSIONS
    calib_windows: int = 64  # train windows for similar/procrustes; as many val windows for K/V error
    distill: float = 0.5  # λ of the "+distill" methods' uptraining (training/distill.py)
    distill_temperature: float = 1.0
    mha_control: bool = True  # the MHA base trained on for alpha x base_steps
    alphas: list[float] = field(default_factory=lambda: [0.05, 0.1])
    scratch_kv_heads: list[int] = field(default_factory=lambda: [2, 1])
    train_args: list[str] = field(default_factory=list)
    eval: EvalSettings = field(default_factory=EvalSettings)
    decode: DecodeSettings = field(default_factory=DecodeSettings)
    command: list[str] = field(default_factory=list)  # filled in: the invocation, for the report


def load_settings(argv: list[str]) -> DictConfig:
    """preset=<name> (experiments/configs/<name>.yaml) plus key=value overrides of it."""
    cfg = load_preset(Settings, PRESETS, argv, ExperimentError)
    check_settings(cfg)
    return cfg


def check_settings(cfg: DictConfig) -> None:
    if cfg.n_head <= 0 or cfg.base_steps <= 0:
        raise ExperimentError("n_head and base_steps must be positive integers")
    for g in [*cfg.kv_heads, *cfg.scratch_kv_heads]:
        try:
            check_target(cfg.n_head, Conversion(g))
        except ConvertError as e:
            raise ExperimentError(f"kv_heads/scratch_kv_heads: {e}") from None
    for method in cfg.methods:
        if method not in CONVERSIONS:
            raise ExperimentError(f"methods: unknown {method!r}, use some of {list(CONVERSIONS)}")
    if cfg.calib_windows <= 0:
        raise ExperimentError("calib_windows must be a positive integer")
    if not 0 < cfg.distill <= 1 or cfg.distill_temperature <= 0:
        raise ExperimentError("distill must lie in (0, 1] and distill_temperature be positive")
    for alpha in cfg.alphas:
        if not 0 < alpha <= 1:
            raise ExperimentError(f"alphas must lie in (0, 1], got {alpha} (0 is always measured)")
        if round(alpha * cfg.base_steps) < 1:
            raise ExperimentError(f"alpha={alpha} of base_steps={cfg.base_steps} is no step: "
                                  f"raise base_steps or alpha")


# ---- measurements -----------------------------------------------------------------------

# ---- the experiment ---------------------------------------------------------------------


def uptrain_options(name: str, cfg: DictConfig) -> list[str]:
    """A "+distill" entry uptrains with the MHA base as teacher, at the same tokens."""
    if "distill" not in name.split("+"):
        return []
    return [f"uptrain.distill={cfg.distill}", f"uptrain.distill_temperature={cfg.distill_temperature}"]


def run(cfg: DictConfig, out: Path) -> dict:
    started = time.perf_counter()
    runs, converted = out / "runs", out / "converted"
    common = list(cfg.train_args)
    alphas = list(cfg.alphas)
    jobs = (1 + len(cfg.kv_heads) * len(cfg.methods) * len(alphas) + len(cfg.scratch_kv_heads)
            + len(alphas) * cfg.mha_control)
    bar = tqdm(total=jobs, desc="training runs", unit="run")

    def step(label: str, name: str, args: list[str]) -> tuple[Path, float]:
        bar.set_postfix_str(label)
        result = train_run(run_dir_of(runs, name, args), args)
        bar.update()
        return result

    base_args = [*common, "attention=mha", f"max_steps={cfg.base_steps}"]
    base_ckpt, base_s = step("MHA base", "mha", base_args)
    base = load_checkpoint(base_ckpt)
    if base.config.n_head != cfg.n_head:
        raise ExperimentError(f"the base model has {base.config.n_head} heads, the settings "
                              f"say n_head={cfg.n_head}: make train_args and n_head agree")
    tokens = held_out_tokens(base_ckpt)
    dc = cfg.decode
    speed: dict[int, float] = {}

    def row(model: Transformer, method: str, alpha, steps: int, seconds: float,
            kv_layers: list[dict] | None = None) -> dict:
        g = model.config.n_kv_head
        if g not in speed:  # speed depends on the shape only: once per variant
            speed[g] = decode_tok_s(model, dc.batch_size, dc.context, dc.new_tokens, dc.repeats)
        mean_err = lambda key: round(sum(e[key] for e in kv_layers) / len(kv_layers), 4)
        return {"variant": variant_name(g, model.config.n_head), "n_kv_head": g,
                "method": method, "alpha": alpha, "steps": steps,
                "val_loss": round(val_loss(model, tokens, base.config.max_seq_len, cfg.eval.windows,
                                             cfg.eval.batch_size), 4),
                "kv_bytes_per_token": kv_bytes_per_token(model.config),
                "decode_tok_s": round(speed[g], 1), "train_s": round(seconds, 1),
                "k_error": mean_err("k") if kv_layers else None,
                "v_error": mean_err("v") if kv_layers else None, "kv_layers": kv_layers}

    rows = [row(base.model, "base", None, cfg.base_steps, base_s)]
    for g in cfg.kv_heads:
        for method in cfg.methods:
            conversion = method.removesuffix("+distill")  # the same converted checkpoint
            ckpt = converted / f"gqa{g}-{conversion}"
            if not ckpt.is_dir():  # conversion is deterministic (seed and windows fixed)
                convert_checkpoint(base_ckpt, ckpt, named_conversion(conversion, g, cfg.seed),
                                   Calibration(cfg.calib_windows))
            errors = read_meta(ckpt).get("kv_error", {}).get("layers")
            rows.append(row(load_checkpoint(ckpt).model, method, 0.0, 0, 0.0, errors))
            for alpha in alphas:
                up_ckpt, up_s = step(f"{variant_name(g, cfg.n_head)} {method} α={alpha:g}",
                                     f"gqa{g}-{method}-a{alpha:g}",
                                     [*common, f"init_from={ckpt}", f"attention.n_kv_head={g}",
                                      f"uptrain.alpha={alpha}", *uptrain_options(method, cfg)])
                up = load_checkpoint(up_ckpt)
                rows.append(row(up.model, method, alpha, up.meta.get("step", -1), up_s))
    for alpha in alphas if cfg.mha_control else []:
        ckpt, seconds = step(f"MHA trained on α={alpha:g}", f"mha-continued-a{alpha:g}",
                             [*common, f"init_from={base_ckpt}", f"uptrain.alpha={alpha}"])
        up = load_checkpoint(ckpt)
        rows.append(row(up.model, "continued", alpha, up.meta.get("step", -1), seconds))
    for g in cfg.scratch_kv_heads:
        ckpt, seconds = step(f"{variant_name(g, cfg.n_head)} scratch", f"scratch-gqa{g}",
                             [*common, f"attention.n_kv_head={g}", f"max_steps={cfg.base_steps}"])
        rows.append(row(load_checkpoint(ckpt).model, "scratch", None, cfg.base_steps, seconds))
    bar.close()
    minutes = (time.perf_counter() - started) / 60
    notes = [f"Command: `python -m experiments.gqa_ablation {' '.join(cfg.command)}`  ",
             f"Model: {base.config.n_layer} layers, d_model {base.config.d_model}, "
             f"{base.config.n_head} heads of {base.config.head_dim}, vocab "
             f"{base.config.vocab_size}, context {base.config.max_seq_len}; train args "
             f"`{' '.join(common)}`.  ",
             f"Val loss over {cfg.eval.windows} fixed windows of {base.config.max_seq_len} "
             f"tokens. Grouping (`similar`) and alignment (`procrustes`) are fitted on "
             f"{cfg.calib_windows} train windows; K/V errors are measured on "
             f"{cfg.calib_windows} val windows. Decode: batch {dc.batch_size}, "
             f"{dc.new_tokens} new tokens after a {dc.context}-token context, fp32, best of "
             f"{dc.repeats}.  ",
             f"Wall time {minutes:.1f} min on {torch.get_num_threads()} threads "
             f"(training runs reused from earlier invocations count as 0)."]
    return write_report(rows, out, f"GQA uptraining ablation ({cfg.preset})", notes)


def run_and_show(cfg: DictConfig) -> None:
    out = Path(cfg.out)
    paths = run(cfg, out)
    print((out / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return cli.exit_status(lambda: run_and_show(load_settings(argv)), argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
