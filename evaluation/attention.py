"""What attention does, read through model/attention.py's opt-in hook: one head's matrix
over a prompt, and KL(reference || model) per layer x query head over corpus windows
(how far a conversion moved each head); both printed and drawn as heatmaps."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from data.loader import IGNORE_INDEX, eval_batches
from evaluation import EvalError
from evaluation.scoring import sum_dtype, window_count
from evaluation.heatmap import plot_panels
from store.source import load_model


@contextmanager
def attention_hook(model, on_attention):
    """Every layer calls on_attention(layer, log-probabilities (B, H, T, T)) during the
    forwards inside (model/attention.py's opt-in hook; SDPA still computes the output)."""
    layers = [block.attn for block in model.blocks]
    for attn in layers:
        attn.on_attention = on_attention
    try:
        yield
    finally:
        for attn in layers:
            attn.on_attention = None


@torch.no_grad()
def prompt_attention(model, ids: list[int], layer: int) -> torch.Tensor:
    """One layer's attention probabilities over ids, (H, T, T): row t is query t."""
    got = {}
    with attention_hook(model, lambda i, logp: got.setdefault(i, logp)):
        model(torch.tensor([ids], device=model.device))
    return got[layer][0].exp()


@torch.no_grad()
def attention_kl(reference, model, batches, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sums over every query position of the real rows of batches of KL(reference's
    attention || model's), (n_layer, n_head) in nats, and the number of positions."""
    cfg = model.config
    kl = torch.zeros(cfg.n_layer, cfg.n_head, device=device, dtype=sum_dtype(device))
    positions = 0
    for x, y in batches:
        x, real = x.to(device), (y != IGNORE_INDEX).any(1).to(device)  # padding rows: none
        ref_logp = {}
        with attention_hook(reference, lambda i, logp: ref_logp.__setitem__(i, logp)):
            reference(x)

        def compare(i: int, logp: torch.Tensor) -> None:
            r = ref_logp.pop(i)  # (B, H, T, T)
            per_row = torch.where(r.isfinite(), r.exp() * (r - logp), 0).sum((2, 3))  # (B, H)
            kl[i] += (per_row * real[:, None]).sum(0).to(kl.dtype)

        with attention_hook(model, compare):
            model(x)
        positions += int(real.sum()) * x.shape[1]
    return kl, positions


def token_label(tokenizer, token: int) -> str:
    return repr(tokenizer.decode([token]) if tokenizer is not None else str(token))[1:-1][:12]


# ---------------------------------------------------------------- one head over a prompt

def show_prompt_attention(att, sources, device, dtype) -> dict:
    """Print att.layer/head's matrix over att.prompt for every source (name, path); plot
    them side by side. -> {name: {tokens, matrix}}."""
    shown = {}
    for source in sources:
        model, tokenizer = load_model(source.path, device, dtype)
        ids = prompt_ids(att.prompt, tokenizer, model.config.max_seq_len, source.name)
        probs = prompt_attention(model, ids, att.layer)[att.head].cpu()  # (T, T)
        labels = [token_label(tokenizer, i) for i in ids]
        print_prompt_matrix(source.name, att, model.config, labels, probs)
        shown[source.name] = {"tokens": labels, "matrix": probs.tolist()}
        del model
    plot_panels(Path(att.plot), {n: torch.tensor(v["matrix"]) for n, v in shown.items()},
                f"attention, layer {att.layer} head {att.head}: \"{att.prompt[:40]}\"",
                ticks={n: v["tokens"] for n, v in shown.items()}, xlabel="key", ylabel="query")
    print(f"wrote {att.plot}")
    return shown


def prompt_ids(prompt: str, tokenizer, context: int, name: str) -> list[int]:
    if tokenizer is None:
        raise EvalError(f"{name} ships no tokenizer to read attention.prompt with")
    ids = ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(prompt)
    if len(ids) > context:
        raise EvalError(f"attention.prompt is {len(ids)} tokens, above {name}'s "
                        f"context of {context}: shorten it")
    return ids


def print_prompt_matrix(name: str, att, config, labels: list[str], probs: torch.Tensor) -> None:
    print(f"\n{name}: layer {att.layer}, query head {att.head} (KV head "
          f"{att.head // (config.n_head // config.n_kv_head)}); row = query "
          f"token, columns = the keys it attends to")
    for t, label in enumerate(labels):
        print(f"{t:>4} {label:<12} " + " ".join(f"{p:.2f}" for p in probs[t, : t + 1].tolist()))


# ---------------------------------------------------------------- KL per layer x head

def kl_tables(att, sources, reference: int, ref_tokens: np.ndarray, seq_len: int,
              accelerator, device, dtype) -> dict:
    """KL(sources[reference] || model) per layer x query head for every other source,
    over att.kl_windows windows of ref_tokens; printed and plotted (main process).
    -> {name: (n_layer, n_head) nested list}."""
    length = min(seq_len, att.kl_seq_len or seq_len)
    ref_model, _ = load_model(sources[reference].path, device, dtype)
    tables = {}
    for i, source in enumerate(sources):
        if i == reference:
            continue
        model, _ = load_model(source.path, device, dtype)
        batches = eval_batches(ref_tokens, None, length, 1, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, max_windows=att.kl_windows)
        tables[source.name] = mean_kl(ref_model, model, batches, accelerator, device)
        del model
    if accelerator.is_main_process:
        windows = window_count(len(ref_tokens), length, length, att.kl_windows)
        print_kl_tables(tables, sources[reference].name, windows, length)
        plot_panels(Path(att.kl_plot), {n: torch.tensor(t) for n, t in tables.items()},
                    f"attention KL to {sources[reference].name} (nats)", xlabel="query head",
                    ylabel="layer", colorbar=True)
        print(f"wrote {att.kl_plot}")
    return tables


def mean_kl(reference, model, batches, accelerator, device) -> list[list[float]]:
    """attention_kl over every process's batches, per query position."""
    kl, positions = attention_kl(reference, model, batches, device)
    kl = accelerator.reduce(kl, "sum") / accelerator.reduce(
        torch.tensor(float(positions), device=device, dtype=kl.dtype), "sum")
    return kl.cpu().tolist()


def print_kl_tables(tables: dict, reference: str, windows: int, length: int) -> None:
    print(f"\nattention KL(reference {reference} || model), nats, mean "
          f"over the query positions of {windows} windows of {length} tokens; rows: layers, "
          f"columns: query heads")
    for name, table in tables.items():
        print(f"{name}:")
        print("layer " + " ".join(f"{f'h{h}':>7}" for h in range(len(table[0]))))
        for layer, row in enumerate(table):
            print(f"{layer:>5} " + " ".join(f"{v:7.4f}" for v in row))
