"""How much of mean pooling's perplexity gap each K/V merge closes on a real model, at α = 0.

    python -m experiments.merge_gap hf=/work/cache/smollm2/hf n_kv_head=1 \\
        aligns=[none,procrustes,linear,linear_readers] calib_windows=16 calib_len=512 \\
        eval_windows=16 eval_len=512 out=experiments/results/merge_gap/smollm2_mqa.json

Prose from the running Python's standard library: each module's docstring, in path order;
even-numbered documents are evaluated, odd-numbered ones calibrate (disjoint text). One
calibration pass serves every alignment (plan_from_grams). Reports, per alignment, the
log-perplexity on eval_windows fixed windows, the share of mean pooling's gap to the source
it closes, and the per-layer K/V error on the calibration and the eval tokens.
"""
from __future__ import annotations

import ast
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data.sources import pystdlib_files
from data.tokenizer import load_tokenizer
from convert.align import attention_input_grams
from convert.heads import Conversion, kv_errors_from_grams, plan_from_grams, pooled_model
from store.hf import import_hf


@dataclass
class Settings:
    hf: str = "/work/cache/smollm2/hf"
    n_kv_head: int = 1
    group: str = "contiguous"
    aligns: list[str] = field(default_factory=lambda: ["none", "procrustes", "linear", "linear_readers"])
    calib_windows: int = 8
    calib_len: int = 512
    eval_windows: int = 16
    eval_len: int = 512
    batch_size: int = 4
    out: str = ""


def docstring_text(parity: int) -> str:
    docs = []
    for path in pystdlib_files():
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        if doc:
            docs.append(doc)
    return "\n\n".join(docs[parity::2])


def windows(ids: list[int], n: int, length: int) -> torch.Tensor:
    """n evenly spaced windows of length tokens, (n, length)."""
    if len(ids) < length:
        raise SystemExit(f"error: {len(ids)} tokens, fewer than one window of {length}")
    starts = torch.linspace(0, len(ids) - length, n).long().tolist()
    return torch.tensor([ids[s:s + length] for s in starts])


@torch.no_grad()
def log_ppl(model, tokens: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for batch in tokens.split(batch_size):
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(),
                                 reduction="sum").item()
    return total / (tokens.shape[0] * (tokens.shape[1] - 1))


def main(argv: list[str]) -> int:
    cfg = OmegaConf.merge(OmegaConf.structured(Settings), OmegaConf.from_cli(argv))
    tok = load_tokenizer(cfg.hf)
    calib = windows(tok.encode(docstring_text(1)), cfg.calib_windows, cfg.calib_len)
    evals = windows(tok.encode(docstring_text(0)), cfg.eval_windows, cfg.eval_len)
    source = import_hf(cfg.hf, dtype=torch.float32).eval()
    t = time.perf_counter()
    loss = {"source": log_ppl(source, evals, cfg.batch_size)}
    print(f"source: log-ppl {loss['source']:.4f} ppl {math.exp(loss['source']):.2f} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    calib_grams = attention_input_grams(source, calib, cfg.batch_size)
    eval_grams = attention_input_grams(source, evals[:, :-1], cfg.batch_size)
    print(f"grams: {time.perf_counter() - t:.0f} s", flush=True)
    errors = {}
    for align in cfg.aligns:
        t = time.perf_counter()
        conversion = Conversion(cfg.n_kv_head, group=cfg.group, align=align)
        plans = (plan_from_grams(source, calib_grams, conversion)
                 if conversion.needs_calibration else None)
        fit_s = time.perf_counter() - t
        model = pooled_model(source, conversion, plans)
        loss[align] = log_ppl(model, evals, cfg.batch_size)
        state = model.state_dict()
        errors[align] = {"calib": kv_errors_from_grams(source, state, plans, calib_grams),
                         "eval": kv_errors_from_grams(source, state, plans, eval_grams)}
        print(f"{align}: log-ppl {loss[align]:.4f} ppl {math.exp(loss[align]):.1f} "
              f"(fit {fit_s:.0f} s)", flush=True)
    base = loss.get("none")
    report = {"settings": OmegaConf.to_container(cfg), "command": " ".join(argv),
              "log_ppl": loss, "ppl": {k: math.exp(v) for k, v in loss.items()},
              "gap_closed": ({k: (base - v) / (base - loss["source"]) for k, v in loss.items()
                              if k not in ("source", "none")} if base is not None else None),
              "kv_error_mean": {a: {split: {kv: sum(e[kv] for e in rows) / len(rows) for kv in "kv"}
                                    for split, rows in e.items()} for a, e in errors.items()},
              "kv_error": errors}
    print(json.dumps({k: report[k] for k in ("ppl", "gap_closed", "kv_error_mean")}, indent=1))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
