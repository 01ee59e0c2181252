"""The KV-budget frontier of a real model: which cache format keeps the most of SmolLM2-135M
per byte of KV cache, at alpha = 0 and after a small uptraining budget with distillation.

    python -m experiments.frontier preset=smoke   # perplexity of every point, alpha = 0 (~30 min)
    python -m experiments.frontier preset=quick   # + tasks, passkey, speed, uptraining (~3 h)
    python -m experiments.frontier preset=full    # a GPU: every task item, 200k tokens
    python -m experiments.frontier preset=quick windows=0 tasks=[] budgets=[]  # only the
        # long-context columns (passkey, decode speed) of every point, alpha = 0

Points, all of the same model (experiments/real_model.py's source, corpora and cache):
the original GQA-3 cache, MQA by mean pooling and by `align=linear`, MLA (convert/latent.py)
at each of `mla_budgets` fp32 bytes per token, and each head layout again with
`kv_cache=int8` (KIVI-style for K/V, per token and group of 32 channels for MLA's latent;
its bytes count the int8 values, every scale and any full-precision window, amortised over
`speed_context` tokens).
Every point is measured the same way:
- perplexity on held-out prose (every docstring of the held-out files) and code, `windows`
  windows of `seq_len` tokens each, the tokens after the first `decode_prompt` of a window
  teacher-forced through the point's cache (evaluation.scoring.decoded_rows), mean NLL with
  its standard error over windows;
- the average accuracy of `tasks` through lm-evaluation-harness (with the int8 cache, each
  continuation decoded one token at a time through it after the context's prefill);
- passkey retrieval at `passkey_length` tokens, decoded through the point's cache;
- compiled decode tokens/s at `speed_context` slots, batch `speed_batch`.
The best `uptrain_best` structural formats of each byte budget (by prose perplexity at
alpha = 0) are uptrained for each of `budgets` tokens with distillation (uptrain.distill =
`distill`), against the original trained on as long (the control). Cached by content key
under `cache`; results in <out>/results.md, results.csv, frontier.png.
"""
from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import cli
from convert.command import convert_to_latent
from convert.heads import Calibration
from convert.latent import LatentConversion
from data.sources import pystdlib_dir, pystdlib_files
from data.tokenizer import load_tokenizer
from evaluation.passkey import accuracy_grid
from evaluation.scoring import decoded_rows
from evaluation.speed import compiled_step_tok_s
from evaluation.stats import ratio_se
from evaluation.tasks import score_tasks, task_average
from experiments import real_model as rm
from experiments.cached_run import content_key
from experiments.presets import load_preset
from experiments.smollm2 import DEFAULT_CACHE, smollm2_hf_dir
from model.kv_cache import kv_bytes_per_token
from model.sampling import KV_CACHES
from store.checkpoint import write_atomic
from store.source import open_source

PRESETS = Path(__file__).resolve().parent / "configs" / "frontier"
FIVE = ["arc_easy", "arc_challenge", "piqa", "winogrande", "openbookqa"]
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "winogrande": 0.5,
          "openbookqa": 0.25}


class FrontierError(cli.UserError):
    """A setting the experiment cannot run with; the message names the fix."""


@dataclass
class Settings:
    """The schema of experiments/configs/frontier/*.yaml."""
    preset: str = "quick"
    cache: str = DEFAULT_CACHE
    out: str = "experiments/results/frontier/quick"
    seed: int = 0
    heads: list[str] = field(default_factory=lambda: ["mean", "linear"])  # GQA-3 -> MQA by
    mla_budgets: list[int] = field(default_factory=lambda: [46080, 23040, 15360, 7680, 3840])
    int8: bool = True  # each head layout again with kv_cache=int8
    calib_windows: int = 8
    calib_seq_len: int = 256
    train_max_tokens: int = 200000
    windows: int = 32  # per held-out corpus; 0: no perplexity (no uptraining either)
    seq_len: int = 512
    decode_prompt: int = 32  # tokens of each window prefilled; the rest decoded and scored
    batch_size: int = 16
    tasks: list[str] = field(default_factory=lambda: list(FIVE))
    tasks_dir: str = "../shared/evalsets"
    task_limit: int = 20  # items per task; 0: all
    passkey_length: int = 2048  # 0: no passkey
    passkey_trials: int = 4
    speed_context: int = 4096  # 0: no decode speed
    speed_batch: int = 8
    speed_steps: int = 16
    budgets: list[int] = field(default_factory=lambda: [50000, 200000])  # uptraining tokens
    uptrain_best: int = 2
    uptrain_bytes: list[int] = field(default_factory=list)  # fp32 budgets to uptrain; []: all
    distill: float = 0.5
    train: rm.TrainSettings = field(default_factory=rm.TrainSettings)
    report_only: bool = False
    command: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Point:
    structure: str  # "original", "MQA mean", "MQA linear", "MLA 15,360"
    kv: str = "float"  # the cache kind: float | int8
    tokens: int = 0  # uptraining tokens; 0: the conversion as it is

    @property
    def name(self) -> str:
        return self.structure + (" + int8 KV" if self.kv == "int8" else "") + (
            f" + {self.tokens:,} tok distill" if self.tokens else "")


ANCHORS = (
    "\nPublished anchors, other base models and task sets (not comparable point for point): "
    "MHA2MLA (Ji et al. 2025) on SmolLM-135M (an MHA model), six-task average 44.50 → 43.06 "
    "at −68.75% KV, after 2.25B tokens of fine-tuning (11,000× the 200k here); TransMLA "
    "(Meng et al. 2025) on Llama-2-7B at −68.75% KV without training, 58.20 vs 59.85. "
    "−68.75% of the original's 46,080 B/token is 14,400 B/token here: between MLA 15,360 "
    "and the original with the int8 cache.")


def load_settings(argv: list[str]) -> DictConfig:
    cfg = load_preset(Settings, PRESETS, argv, FrontierError)
    rm.check_methods(list(cfg.heads))
    if any(b <= 0 or b % 8 for b in cfg.mla_budgets):
        raise FrontierError("mla_budgets are fp32 KV bytes per token: positive multiples of 8")
    if not 0 < cfg.decode_prompt < cfg.seq_len:
        raise FrontierError(f"decode_prompt={cfg.decode_prompt} must lie in 1..seq_len - 1")
    if not 0 <= cfg.distill <= 1:
        raise FrontierError(f"distill={cfg.distill} must lie in [0, 1]")
    if cfg.budgets and not cfg.windows:
        raise FrontierError("uptraining picks its formats by perplexity: set windows > 0, "
                            "or budgets=[] to measure without perplexity")
    return cfg


# ---- corpora ----------------------------------------------------------------------------

def docstring_corpus(cache: Path, root: Path | None = None) -> Path:
    """Every docstring (module, class, function; over 200 characters) of real_model's
    held-out prose files, one file per source file: ~30k tokens where module docstrings
    alone give ~4k, enough for 32 disjoint windows of 512."""
    root = root or pystdlib_dir()
    out = cache / "corpora" / (hashlib.sha256(str(root).encode()).hexdigest()[:8] + "-docs")
    if not (out / "done").is_file():
        out.mkdir(parents=True, exist_ok=True)
        for path in pystdlib_files(root):
            if rm.bucket(path, root) == 1:
                docs = docstrings(path.read_text(encoding="utf-8", errors="replace"))
                if docs:
                    flat = str(path.relative_to(root)).replace(os.sep, "__")
                    (out / f"{flat}.txt").write_text("\n\n".join(docs))
        (out / "done").write_text("ok")
    return out


def docstrings(text: str) -> list[str]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, kinds)]
    return [d for d in docs if d and len(d) > 200]


# ---- the points' checkpoints ----------------------------------------------------------------

def mla_checkpoint(hf: Path, budget: int, cfg: DictConfig, corpora: dict, cache: Path) -> Path:
    """The original as MLA at budget fp32 KV bytes per token (the split searched)."""
    spec = ("mla", budget, cfg.calib_windows, cfg.calib_seq_len, cfg.train_max_tokens)
    out = cache / "converted" / f"gqa3-mla{budget}-{content_key(*spec)}"
    if not out.is_dir() and not cfg.report_only:
        data = OmegaConf.to_container(OmegaConf.from_dotlist(
            [a.removeprefix("data.") for a in
             rm.data_overrides(corpora, cache, cfg.train_max_tokens)]))
        convert_to_latent(hf, out, LatentConversion(budget=budget),
                          Calibration(cfg.calib_windows, cfg.calib_seq_len), data)
    return out if out.is_dir() else None


def structures(hf: Path, cfg: DictConfig, corpora: dict, cache: Path) -> dict[str, Path]:
    """structure name -> its checkpoint (None: not computed yet, report_only)."""
    out = {"original": hf}
    for method in cfg.heads:
        out[f"MQA {method}"] = rm.convert({"gqa3": hf}, "gqa3>mqa", method, cfg, corpora, cache)
    for budget in cfg.mla_budgets:
        out[f"MLA {budget:,}"] = mla_checkpoint(hf, budget, cfg, corpora, cache)
    return out


def cache_bytes(config, kv: str, context: int) -> float:
    """KV bytes per token: fp32 values, or the int8 cache's whole allocation (values, scales,
    full-precision window) at context tokens, per token."""
    if kv == "float":
        return kv_bytes_per_token(config)
    cache = KV_CACHES[kv].for_model(config, 1, context, device="meta")
    return cache.nbytes / context


# ---- measurements (each cached by the checkpoint and its settings) ---------------------------

def cached(cache: Path, kind: str, path: Path, point: Point, settings: dict, compute) -> dict:
    key = content_key(str(path), point.kv, settings)
    record = cache / "evals" / "frontier" / f"{kind}-{key}.json"
    if record.is_file():
        return json.loads(record.read_text())
    result = compute()
    record.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(result))
    return result


def perplexity(model, windows: torch.Tensor, point: Point, cfg: DictConfig) -> dict:
    rows = decoded_rows(model, windows, cfg.decode_prompt, point.kv, cfg.batch_size)
    nll, count = rows[:, 0].numpy(), rows[:, 1].numpy()
    return {"nll": float(nll.sum() / count.sum()), "se": ratio_se(nll, count)}


def tasks(path: Path, point: Point, cfg: DictConfig) -> dict:
    scores = score_tasks(path, list(cfg.tasks), cfg.tasks_dir, cfg.task_limit or None,
                         4, DEVICE, torch.float32, kv_cache=point.kv)
    ses = [t["acc_stderr"] for t in scores.values() if t.get("acc_stderr") is not None]
    above = [(t["acc"] - CHANCE.get(name, 0)) for name, t in scores.items()]
    return {"acc": task_average(scores)["acc"],
            "se": math.sqrt(sum(s * s for s in ses)) / len(ses) if ses else None,
            "above_chance": sum(above) / len(above), "tasks": scores}


def passkey(model, tok, point: Point, cfg: DictConfig) -> dict:
    grid = accuracy_grid(model, tok, [cfg.passkey_length], [0.0, 0.5, 1.0], cfg.passkey_trials,
                         cfg.seed, 4, point.kv)
    return {"accuracy": sum(grid[0]) / len(grid[0])}


def speed(model, point: Point, cfg: DictConfig) -> dict:
    torch._dynamo.reset()
    return {"tok_s": compiled_step_tok_s(model, cfg.speed_batch, cfg.speed_context,
                                         cfg.speed_steps, point.kv)}


def measure(point: Point, path: Path, windows: dict, tok, cfg: DictConfig, cache: Path) -> dict:
    """Every measurement of one point (the cached ones read back)."""
    model = None

    def loaded():
        nonlocal model
        model = model or open_source(path).load(DEVICE).eval()
        return model

    ev = {k: cfg[k] for k in ("windows", "seq_len", "decode_prompt")}
    row = {c: cached(cache, f"ppl-{c}", path, point, ev,
                     lambda c=c: perplexity(loaded(), windows[c], point, cfg))
           for c in windows}
    if cfg.tasks:
        spec = {"tasks": list(cfg.tasks), "limit": cfg.task_limit}
        row["tasks"] = cached(cache, "tasks", path, point, spec, lambda: tasks(path, point, cfg))
    if cfg.passkey_length:
        spec = {"length": cfg.passkey_length, "trials": cfg.passkey_trials, "seed": cfg.seed}
        row["passkey"] = cached(cache, "passkey", path, point, spec,
                                lambda: passkey(loaded(), tok, point, cfg))
    if cfg.speed_context and not point.tokens:  # uptraining does not change the speed
        spec = {k: cfg[k] for k in ("speed_context", "speed_batch", "speed_steps")}
        row["speed"] = cached(cache, "speed", path, point, {**spec, "cpu": cpu_name()},
                              lambda: speed(loaded(), point, cfg))
    config = open_source(path).config
    row["kv_bytes"] = cache_bytes(config, point.kv, cfg.speed_context or 4096)
    return row


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_name() -> str:
    """The device speed was measured on (part of its cache key)."""
    if DEVICE.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{torch.backends.cpu.get_cpu_capability()}-{torch.get_num_threads()}"


# ---- uptraining -------------------------------------------------------------------------------

def uptrained(points: dict, paths: dict, cfg: DictConfig, corpora: dict, cache: Path) -> dict:
    """The best cfg.uptrain_best structural formats of each byte budget, uptrained for each
    of cfg.budgets tokens with distillation, and the control: Point -> its checkpoint."""
    out = {}
    chosen = [p for _, p in uptrain_candidates(points, paths, cfg)]
    distill = [f"uptrain.distill={cfg.distill}"] if cfg.distill else []
    for tokens in cfg.budgets:
        run = rm.uptrain(f"control-{tokens}", paths["original"], tokens, cfg, corpora, cache)
        out[Point("original", tokens=tokens)] = run[0]
        for point in chosen:
            slug = point.structure.lower().replace(" ", "-").replace(",", "")
            run = rm.uptrain(f"frontier-{slug}-{tokens}-distill{cfg.distill:g}",
                             paths[point.structure], tokens, cfg, corpora, cache, distill)
            out[Point(point.structure, tokens=tokens)] = run[0]
    return out


def uptrain_candidates(points: dict, paths: dict, cfg: DictConfig) -> list[tuple[float, Point]]:
    """(prose NLL, point) of the best cfg.uptrain_best float formats of each byte budget
    (those in cfg.uptrain_bytes; none there: every budget), leaving out the original's
    budget: a conversion there is exact (MLA at full rank), so uptraining it is the control."""
    full = points[Point("original")]["kv_bytes"]
    by_bytes: dict[int, list] = {}
    for point, row in points.items():
        budget = round(row["kv_bytes"])
        if (point.kv == "float" and point.structure != "original" and paths[point.structure]
                and budget != full and budget in (cfg.uptrain_bytes or [budget])):
            by_bytes.setdefault(budget, []).append((row["prose"]["nll"], point))
    return [c for group in by_bytes.values() for c in sorted(group)[:cfg.uptrain_best]]


# ---- report -------------------------------------------------------------------------------------

COLUMNS = ("format", "kv", "tokens", "kv_bytes", "prose_ppl", "prose_nll_se", "code_ppl",
           "code_nll_se", "task_acc", "task_se", "passkey", "tok_s")


def flat(point: Point, row: dict) -> dict:
    def get(*keys):
        return _dig(row, keys)

    def ppl(corpus):
        nll = get(corpus, "nll")
        return None if nll is None else round(math.exp(nll), 3)
    return {"format": point.structure, "kv": point.kv, "tokens": point.tokens,
            "kv_bytes": round(row["kv_bytes"]),
            "prose_ppl": ppl("prose"), "prose_nll_se": get("prose", "se"),
            "code_ppl": ppl("code"), "code_nll_se": get("code", "se"),
            "task_acc": get("tasks", "acc"), "task_se": get("tasks", "se"),
            "passkey": get("passkey", "accuracy"), "tok_s": get("speed", "tok_s")}


def _dig(row: dict, keys: tuple):
    for k in keys:
        if not isinstance(row, dict) or k not in row:
            return None
        row = row[k]
    return row


def ppl_cell(ppl: float | None, se: float | None) -> str:
    if ppl is None:
        return "—"
    return rm.ppl_text(ppl) + (f" ×/÷ {math.exp(se):.3f}" if se is not None else "")


def markdown(rows: list[dict], notes: list[str]) -> str:
    lines = ["# SmolLM2-135M: the KV-budget frontier", "", *notes, "",
             "| format | KV cache | uptraining tokens | KV bytes/token | prose ppl | code ppl | "
             "5-task acc ± SE | passkey | decode tok/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = None if r["task_acc"] is None else f"{r['task_acc']:.3f} ± {r['task_se'] or 0:.3f}"
        lines.append(f"| {r['format']} | {r['kv']} | {r['tokens']:,} | {r['kv_bytes']:,} | "
                     f"{ppl_cell(r['prose_ppl'], r['prose_nll_se'])} | "
                     f"{ppl_cell(r['code_ppl'], r['code_nll_se'])} | {acc or '—'} | "
                     f"{rm.fmt(r['passkey'], '.2f')} | {rm.fmt(r['tok_s'], ',.1f')} |")
    return "\n".join(lines) + "\n"


PANELS = (("prose_ppl", "held-out prose perplexity", True),
          ("task_acc", "five-task average accuracy", False),
          ("passkey", "passkey accuracy", False),
          ("tok_s", "decode tokens/s (compiled step)", True))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    metrics = [(key, label, log) for key, label, log in PANELS
               if any(r[key] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.5), squeeze=False)
    families = sorted({r["format"].split(" ")[0] + (" int8" if r["kv"] == "int8" else "")
                       for r in rows})
    markers = dict(zip(families, "osD^v<>p"))
    for ax, (key, label, log) in zip(axes[0], metrics):
        for r in rows:
            if r[key] is None:
                continue
            family = r["format"].split(" ")[0] + (" int8" if r["kv"] == "int8" else "")
            filled = r["tokens"] == 0
            ax.scatter(r["kv_bytes"], r[key], marker=markers[family],
                       facecolors=f"C{families.index(family)}" if filled else "none",
                       edgecolors=f"C{families.index(family)}", s=40)
            ax.annotate(r["format"].split(" ", 1)[-1] if r["format"] != "original" else "orig",
                        (r["kv_bytes"], r[key]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        for family in families:
            ax.scatter([], [], marker=markers[family], color=f"C{families.index(family)}",
                       label=family)
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="k", label="uptrained")
        ax.set_xscale("log")
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("KV bytes per token (log)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: quality per byte of KV cache (filled: alpha = 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the experiment ---------------------------------------------------------------------------

def run(cfg: DictConfig) -> Path:
    started = time.perf_counter()
    cache, out = Path(cfg.cache).expanduser(), Path(cfg.out)
    hf = smollm2_hf_dir(cache)
    tok = load_tokenizer(hf)
    corpora = {**rm.write_corpora(cache), "docs": docstring_corpus(cache)}
    windows = {c: rm.eval_windows(corpora[f], tok, cfg.windows, cfg.seq_len, disjoint=True)
               for c, f in (("prose", "docs"), ("code", "code")) if cfg.windows}
    paths = structures(hf, cfg, corpora, cache)
    points = [Point(s) for s in paths] + [Point(s, "int8") for s in paths if cfg.int8]
    results, missing = {}, []
    for point in tqdm(points, desc="frontier", unit="point"):
        if paths[point.structure] is None:
            missing.append(point.name)
            continue
        results[point] = measure(point, paths[point.structure], windows, tok, cfg, cache)
    if cfg.budgets and not cfg.report_only:
        runs = uptrained(results, paths, cfg, corpora, cache)
        kinds = ["float", "int8"] if cfg.int8 else ["float"]
        for (point, path), kv in tqdm(list(itertools.product(runs.items(), kinds)),
                                      desc="uptrained", unit="point"):
            point = Point(point.structure, kv, point.tokens)
            results[point] = measure(point, path, windows, tok, cfg, cache)
    rows = sorted((flat(p, r) for p, r in results.items()),
                  key=lambda r: (-r["kv_bytes"], r["tokens"], r["prose_ppl"] or 0, r["format"]))
    notes = [f"Command: `python -m experiments.frontier {' '.join(cfg.command)}` "
             f"(preset {cfg.preset}); {(time.perf_counter() - started) / 60:.1f} min, cached "
             f"steps count as 0; CPU {cpu_name()}.  ",
             (f"Perplexity: {cfg.windows} disjoint windows of {cfg.seq_len} tokens per "
              f"held-out corpus (every docstring of the held-out prose files; held-out .py "
              f"files), the tokens after each window's first {cfg.decode_prompt} decoded "
              f"through the point's cache; ×/÷ is exp(SE of the mean NLL over windows).  "
              if cfg.windows else "Perplexity: not measured here (windows=0).  "),
             f"Tasks: {', '.join(cfg.tasks) or 'none'} (lm-evaluation-harness, first "
             f"{cfg.task_limit or 'all'} items each; int8 rows decode each continuation "
             f"through the int8 cache after the context's prefill). Passkey: "
             f"{cfg.passkey_length or '—'} tokens, depths 0/0.5/1 × {cfg.passkey_trials} "
             f"trials. Decode: compiled step, {cfg.speed_context} slots, "
             f"batch {cfg.speed_batch}.  ",
             f"Uptraining: the best {cfg.uptrain_best} formats per byte budget "
             f"({', '.join(format(b, ',') for b in cfg.uptrain_bytes) or 'every one'} fp32 "
             "bytes, below the original's), "
             f"{', '.join(format(b, ',') for b in cfg.budgets) or 'none'} tokens, uptrain.distill="
             f"{cfg.distill}, batch {cfg.train.batch_size} × {cfg.train.seq_len}, lr "
             f"{cfg.train.lr:g}; the control (original) trained on as long."]
    notes.append(ANCHORS)
    if missing:
        notes.append(f"\nNot computed yet (report_only): {'; '.join(missing)}.")
    out.mkdir(parents=True, exist_ok=True)
    rm.write_csv(rows, out / "results.csv", COLUMNS)
    plot(rows, out / "frontier.png")
    write_atomic(out / "results.md", markdown(rows, notes))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return cli.exit_status(lambda: print((run(load_settings(argv)) / "results.md").read_text()),
                           argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
