"""Passkey retrieval, a long-context probe that needs no dataset (Mohtashami & Jaggi 2023,
"Landmark Attention"; LongLoRA's evaluation): a five-digit key hidden at a chosen depth in
repeated filler text and asked for at the end. The answer is decoded greedily through the
KV cache (model/sampling.py), where KV compression acts, and scored by exact match:
accuracy per prompt length x depth, as a table and a heatmap.

A prompt is built in the model's own tokens, so it is exactly the length asked for:

    [BOS] task | filler[:n] | needle | filler[n:F] | question

F filler tokens fill what the fixed parts leave, and the needle follows n = round(depth * F)
of them: depth 0 puts it right after the task, 1 right before the question. The filler is
one sentence group repeated and cut at a token, as the original cuts it at a character.
Keys are uniform over KEYS, drawn from (seed, length, depth), so a seed fixes every prompt.
Chance, guessing the key: 1/90000, about 0.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from evaluation import EvalError
from evaluation.heatmap import Grid, plot_panels
from model.sampling import SamplingConfig, generate
from store.source import load_model

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize them. I will quiz you about the important information there.")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEYS = range(10_000, 100_000)
CHANCE = 1 / len(KEYS)
# Tokens decoded for the answer: " 12345" is at most 6 (a token per digit and a space), and
# one more shows what follows the key.
ANSWER_TOKENS = 7
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]
FIRST_LENGTH = 256  # the default ladder: 256, 512, ... and the context


@dataclass
class Prompt:
    ids: list[int]
    key: int
    needle_at: int  # the index of the needle's first token


# ---------------------------------------------------------------- prompts

def following(tokenizer, text: str) -> list[int]:
    """text's ids where it follows a sentence inside the prompt: encoded after one and cut
    off it, so it keeps the leading space it has there, with or without a dummy prefix."""
    before = tokenizer.encode(FILLER)
    ids = tokenizer.encode(f"{FILLER} {text}")
    if ids[:len(before)] != before:  # a merge across ". ": no clean cut exists
        raise EvalError(f"the tokenizer merges across a sentence boundary ({text[:20]!r}): "
                        f"passkey cannot build its prompts piece by piece")
    return ids[len(before):]


def build_prompt(tokenizer, length: int, depth: float, key: int) -> Prompt:
    """A prompt of exactly length tokens with key's needle at depth (0..1) of the filler."""
    head = ([tokenizer.bos_id] if tokenizer.add_bos else []) + tokenizer.encode(TASK)
    needle = following(tokenizer, NEEDLE.format(key=key))
    question = following(tokenizer, QUESTION)
    fill = length - len(head) - len(needle) - len(question)
    if fill < 0:
        raise EvalError(f"passkey length {length} is below the {length - fill} tokens of the "
                        f"task, needle and question: choose passkey.lengths of at least that")
    unit = following(tokenizer, FILLER)
    filler = (unit * (fill // len(unit) + 1))[:fill]
    cut = round(depth * fill)
    return Prompt(head + filler[:cut] + needle + filler[cut:] + question, key, len(head) + cut)


def cell_prompts(tokenizer, length: int, depth: float, trials: int, seed: int) -> list[Prompt]:
    """trials prompts, their keys drawn from (seed, length, depth)."""
    rng = random.Random(f"passkey {seed} {length} {depth}")
    return [build_prompt(tokenizer, length, depth, rng.choice(KEYS)) for _ in range(trials)]


def default_lengths(context: int) -> list[int]:
    """256, 512, ... below the longest prompt a context takes, then that one."""
    longest = context - ANSWER_TOKENS
    ladder = [FIRST_LENGTH << i for i in range(32) if FIRST_LENGTH << i < longest]
    return ladder + [longest]


# ---------------------------------------------------------------- scoring

def answers(model, tokenizer, prompts: list[Prompt], batch_size: int,
            kv_cache: str = "float") -> list[str]:
    """The greedy continuation of every prompt (of one length), decoded: batches of
    batch_size prefilled and decoded over a KV cache of kind kv_cache."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        batch = torch.tensor([p.ids for p in prompts[start:start + batch_size]])
        out = generate(model, batch, ANSWER_TOKENS, SamplingConfig(temperature=0),
                       eos_id=tokenizer.eos_id, kv_cache=kv_cache)
        texts += [tokenizer.decode(row) for row in out[:, batch.shape[1]:].tolist()]
    return texts


def retrieved(answer: str, key: int) -> bool:
    """Exact match: the answer's first number is the key (LongLoRA's reading)."""
    number = re.search(r"\d+", answer)
    return number is not None and number.group() == str(key)


def accuracy_grid(model, tokenizer, lengths: list[int], depths: list[float], trials: int,
                  seed: int, batch_size: int, kv_cache: str = "float") -> list[list[float]]:
    """Share of keys retrieved, rows: lengths, columns: depths."""
    grid = []
    for length in lengths:
        row = []
        for depth in depths:
            prompts = cell_prompts(tokenizer, length, depth, trials, seed)
            got = answers(model, tokenizer, prompts, batch_size, kv_cache)
            row.append(sum(retrieved(a, p.key) for a, p in zip(got, prompts)) / trials)
        grid.append(row)
    return grid


# ---------------------------------------------------------------- the command's part

def check_passkey(opts, lengths: list[int], context: int, tokenizers: dict) -> None:
    """Every passkey setting valid for every source ({name: its tokenizer or None})."""
    if opts.trials <= 0:
        raise EvalError(f"passkey.trials={opts.trials} must be a positive integer")
    if not opts.depths or not all(0 <= d <= 1 for d in opts.depths):
        raise EvalError(f"passkey.depths={list(opts.depths)} must be fractions in [0, 1]")
    if not lengths or not all(0 < n <= context - ANSWER_TOKENS for n in lengths):
        raise EvalError(f"passkey.lengths={lengths} must be in [1, {context - ANSWER_TOKENS}]: "
                        f"the smallest model context {context} less {ANSWER_TOKENS} answer "
                        f"tokens")
    for name, tokenizer in tokenizers.items():
        if tokenizer is None:
            raise EvalError(f"{name} ships no tokenizer to build passkey prompts with")
        cell_prompts(tokenizer, min(lengths), 0.0, opts.trials, opts.seed)  # long enough?


def passkey_results(opts, lengths: list[int], sources, device, dtype,
                    batch_size: int) -> dict:
    """Every source's accuracy grid, printed and plotted. -> the JSON's "passkey"."""
    grids = {}
    for source in sources:
        model, tokenizer = load_model(source.path, device, dtype)
        grids[source.name] = accuracy_grid(model, tokenizer, lengths, opts.depths, opts.trials,
                                           opts.seed, batch_size)
        del model
    print_grids(grids, lengths, opts.depths, opts.trials)
    plot_panels(Path(opts.plot), {n: torch.tensor(g) for n, g in grids.items()},
                f"passkey retrieval, {opts.trials} keys per cell (chance ~0)",
                xlabel="depth of the key", ylabel="prompt length (tokens)", colorbar=True,
                grid=Grid([str(n) for n in lengths], [f"{d:g}" for d in opts.depths]))
    print(f"wrote {opts.plot}")
    return {"lengths": lengths, "depths": list(opts.depths), "trials": opts.trials,
            "seed": opts.seed, "chance": CHANCE,
            "accuracy": grids, "mean": {n: mean(g) for n, g in grids.items()}}


def mean(grid: list[list[float]]) -> float:
    return sum(map(sum, grid)) / sum(map(len, grid))


def print_grids(grids: dict, lengths: list[int], depths: list[float], trials: int) -> None:
    print(f"\npasskey retrieval: share of {trials} five-digit keys per cell decoded exactly "
          f"(greedy, KV cache; chance 1/{len(KEYS)}); rows: prompt length in tokens, "
          f"columns: the key's depth in the filler")
    for name, grid in grids.items():
        print(f"{name}: mean {mean(grid):.3f}")
        print("length " + " ".join(f"{d:>6g}" for d in depths))
        for length, row in zip(lengths, grid):
            print(f"{length:>6} " + " ".join(f"{v:6.2f}" for v in row))
