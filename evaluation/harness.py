"""Any source evaluate.py opens, presented to lm-evaluation-harness as a model
(`lm_eval.api.model.LM`): log-likelihood of continuations, rolling log-likelihood, greedy
generation. Needs the optional extra `lm-eval` (pip install -e '.[eval]').

The harness's conventions are HFLM's (lm_eval/models/huggingface.py), kept here so scores
equal its HF-transformers backend on the same HF dir:
- tokens: a string encodes as the HF tokenizer encodes it by default (BOS first when the
  tokenizer adds one); TemplateLM's _encode_pair moves the context's trailing spaces into
  the continuation, encodes context + continuation whole and splits it at the context's
  own length; an empty context becomes [BOS] (else EOS).
- a request longer than the context window keeps its last max_length + 1 tokens (a
  continuation longer than the window, which HFLM refuses, scores its last max_length).
- rolling log-likelihood: lm_eval.utils' disjoint rolling windows, BOS-prefixed.
- generation: greedy, cut at the first stop string (the EOS text always among them).

Choices that share a context (ARC, PIQA, OpenBookQA) run the context once: its K/V are
computed in a batch-1 cache, copied to one cache row per choice, and the choices' tokens
run as one batch after it. Causal attention makes that the same computation as scoring
each choice alone (tests/test_evaluation_harness.py checks it); only a context cut by
the window, whose tokens then differ per choice, is scored alone.
"""
from __future__ import annotations

import copy
from collections import defaultdict

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from data.chat import ChatTemplate
from model.sampling import SamplingConfig, new_cache, prefill, stream

Pair = tuple[list[int], list[int]]  # (context tokens, continuation tokens)


class GqalabLM(TemplateLM):
    """model (a gqalab Transformer) + its data.tokenizer Tokenizer as an lm-eval LM."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_gen_toks: int = 256,
                 kv_cache: str = "float"):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_gen_toks = batch_size, max_gen_toks
        # "int8": continuations are decoded one token at a time through the int8 cache after
        # the context's prefill, as generation would read it; "float": one chunk per choice
        self.kv_cache = kv_cache
        self.max_length = model.config.max_seq_len

    # ------------------------------------------------------------ chat (apply_chat_template)

    @property
    def tokenizer_name(self) -> str:
        """What the harness fingerprints its request cache with: the tokenizer's file."""
        return str(self.tokenizer.path)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        template = ChatTemplate.of(self.tokenizer)
        return template.source if chat_template and template is not None else ""

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The source's own template renders the harness's turns, as generate.py chat=true
        renders a prompt (data/chat.py: transformers' rendering)."""
        template = ChatTemplate.of(self.tokenizer)
        if template is None:
            raise ValueError(f"{self.tokenizer.path.parent} ships no chat template: drop "
                             f"tasks_chat=true")
        return template.render(chat_history, add_generation_prompt)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_id
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        """HF's tokenizer.encode(string): BOS first when the tokenizer adds one
        (add_special_tokens=None: its own default)."""
        bos = self.tokenizer.add_bos if add_special_tokens is None else add_special_tokens
        first = [self.tokenizer.bos_id] if bos and self.tokenizer.bos_id is not None else []
        return first + self.tokenizer.encode(string)

    # ------------------------------------------------------------ log-likelihood

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation) | None, context tokens, continuation tokens)
        -> (log-likelihood, is greedy) each, in order."""
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        results = [None] * len(pairs)
        # a quantized cache scores every pair through it, a context of its own included
        shared, alone = group_by_context(pairs, self.max_length,
                                         min_shared=1 if self.kv_cache != "float" else 2)
        for indices in shared:
            scores = self.score_shared(pairs[indices[0]][0], [pairs[i][1] for i in indices])
            for i, score in zip(indices, scores):
                results[i] = score
        alone.sort(key=lambda i: -sum(map(len, pairs[i])))  # similar lengths pad less
        for start in range(0, len(alone), self.batch_size):
            batch = alone[start:start + self.batch_size]
            for i, score in zip(batch, self.score_alone([pairs[i] for i in batch])):
                results[i] = score
        return results

    @torch.inference_mode()
    def score_alone(self, pairs: list[Pair]) -> list[tuple[float, bool]]:
        """Each (context, continuation) as its own row of one right-padded batch."""
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in pairs]
        # a continuation longer than the window (HFLM refuses it): its last max_length tokens
        conts = [cont[-len(inp):] for inp, (_, cont) in zip(inputs, pairs)]
        logits = self.model(pad_right(inputs, self.device)).float().log_softmax(-1)
        return [continuation_score(row[len(inp) - len(cont):len(inp)], cont)
                for row, inp, cont in zip(logits, inputs, conts)]

    @torch.inference_mode()
    def score_shared(self, context: list[int], choices: list[list[int]]):
        """Every continuation after one context: the context's K/V computed once."""
        longest = max(map(len, choices))
        one = new_cache(self.model, 1, len(context) + longest - 1, kind=self.kv_cache)
        first = prefill(self.model, torch.tensor([context], device=self.device), one)
        cache = repeat_rows(one, len(choices))
        rest = pad_right([cont[:-1] for cont in choices], self.device)
        logits = first.float().log_softmax(-1).expand(len(choices), 1, -1)
        if longest > 1:
            logits = torch.cat([logits, self.after_context(rest, cache, len(context))], dim=1)
        return [continuation_score(row[:len(cont)], cont) for row, cont in zip(logits, choices)]

    def after_context(self, rest: torch.Tensor, cache, start: int) -> torch.Tensor:
        """Log-probabilities (B, T, V) after each token of rest (B, T), which sits at
        positions start.. over the cache: one chunk, or (a quantized cache) one step each."""
        pos = torch.arange(start, start + rest.shape[1], device=self.device)
        if not cache.quantized:
            logits = self.model(rest, cache, pos, kv_len=start + rest.shape[1])
        else:
            logits = torch.cat([self.model(rest[:, t:t + 1], cache, pos[t:t + 1],
                                           kv_len=start + t + 1) for t in range(rest.shape[1])], 1)
        return logits.float().log_softmax(-1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A document's total log-likelihood over disjoint windows of max_length tokens,
        each with as much context before it as fits (HFLM's windows)."""
        windows, owner = [], []
        for index, (text,) in enumerate(r.args for r in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id,
                                                    self.max_length, context_len=1):
                windows.append((None, *make_disjoint_window(window)))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[index] += score
        return totals

    # ------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self.generate_one(context, kwargs) for context, kwargs in
                (r.args for r in requests)]

    def generate_one(self, context: str, gen_kwargs: dict) -> str:
        """Greedy continuation of context up to the first stop string (or EOS, or
        max_gen_toks), as HFLM cuts it."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None),
                                      eos=self.tokenizer.token_text(self.eot_token_id))
        max_new = min(kwargs.pop("max_gen_toks"), self.max_length - 1)
        prompt = self.tok_encode(context)[-(self.max_length - max_new):]
        new = []
        for token in stream(self.model, prompt, max_new, SamplingConfig(temperature=0),
                            eos_id=self.eot_token_id):
            new.append(int(token))
            if new[-1] == self.eot_token_id or any(s in self.tokenizer.decode(new) for s in until):
                break
        return postprocess_generated_text(self.tokenizer.decode(new), until, None)


def group_by_context(pairs: list[Pair], max_length: int,
                     min_shared: int = 2) -> tuple[list[list[int]], list[int]]:
    """-> (index lists of min_shared+ pairs with one context that fit the window whole, the
    other indices)."""
    groups = defaultdict(list)
    for i, (ctx, cont) in enumerate(pairs):
        fits = len(ctx) + len(cont) <= max_length + 1
        groups[tuple(ctx) if fits else i].append(i)
    split = defaultdict(list)  # True: shared groups, False: their members alone
    for key, g in groups.items():
        split[isinstance(key, tuple) and len(g) >= min_shared].append(g)
    return split[True], [i for g in split[False] for i in g]


def repeat_rows(cache, rows: int):
    """A copy of a one-row cache with `rows` rows, each that row: every per-layer buffer list
    the cache holds (KVCache's k and v, MLA's LatentCache's latent), batch first."""
    out = copy.copy(cache)
    for name, value in vars(cache).items():
        if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            setattr(out, name, [t.expand(rows, *t.shape[1:]).clone() for t in value])
    return out


def pad_right(rows: list[list[int]], device) -> torch.Tensor:
    """Token rows padded with 0 after their end: causal attention never reads the pads."""
    width = max(map(len, rows))
    return torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)


def continuation_score(logprobs: torch.Tensor, cont: list[int]) -> tuple[float, bool]:
    """logprobs (len(cont), V) of the positions predicting cont -> (sum, all greedy)."""
    target = torch.tensor(cont, device=logprobs.device)
    picked = logprobs.gather(-1, target[:, None]).sum()
    return float(picked), bool((logprobs.argmax(-1) == target).all())
