"""Evaluation throughput: evaluate.py's window scoring against transformers' forward, in
the same run, on the same windows and the same weights.

    python -m bench.evaluate            # 6 layers, d_model 384, 6 heads, vocab 4096, fp32
    python -m bench.evaluate --quick    # fewer windows and repeats

A random LlamaForCausalLM is saved as an HF dir and loaded as evaluate.py loads it (the HF
import); both sides score the same non-overlapping windows (data/loader.eval_batches):
ours through evaluation.scoring.window_scores, transformers as model(x, labels=y, shift_labels=y)
(its own loss over the same targets). Prints tokens/s of each, the ratio (ours /
transformers) and the two mean NLLs, which must agree. Best of --repeats per side,
alternating sides (the CPU is shared, the minimum is the least noisy).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench import options
from bench.decode import timed  # best of repeats
from data.loader import eval_batches
from evaluation.scoring import mean_nll, window_scores
from store.source import open_source

SHAPE = dict(vocab_size=4096, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
             num_attention_heads=6, max_position_embeddings=1024)


def hf_llama(n_kv_head: int, out: Path):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE, num_key_value_heads=n_kv_head,
                                         tie_word_embeddings=False,
                                         attn_implementation="sdpa")).eval()
    model.save_pretrained(out)
    return model


@torch.no_grad()
def transformers_nll(model, tokens, seq_len: int, batch_size: int) -> tuple[float, int]:
    """(NLL sum, targets) with transformers' own loss on eval_batches' windows."""
    total, count = 0.0, 0
    for x, y in eval_batches(tokens, None, seq_len, batch_size):
        n = int((y != -100).sum())
        total += model(input_ids=x, labels=y, shift_labels=y).loss.item() * n
        count += n
    return total, count



def main() -> None:
    parser = options.parser(__doc__, windows=32, seq_len=512, batch_size=4, repeats=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.windows, args.repeats = 8, 2
    cpu = torch.device("cpu")
    tokens = torch.randint(0, SHAPE["vocab_size"], (args.windows * args.seq_len + 1,),
                           generator=torch.Generator().manual_seed(1)).numpy()
    n_tokens = args.windows * args.seq_len
    print(f"{args.windows} windows x {args.seq_len} tokens, batch {args.batch_size}, fp32, "
          f"{torch.get_num_threads()} threads; Llama {SHAPE['num_hidden_layers']} layers, "
          f"d_model {SHAPE['hidden_size']}, {SHAPE['num_attention_heads']} heads, vocab "
          f"{SHAPE['vocab_size']}; best of {args.repeats}")
    print(f"{'KV heads':<9}{'ours tok/s':>12}{'transformers':>14}{'ratio':>8}"
          f"{'NLL ours':>10}{'NLL theirs':>12}")
    for n_kv in (6, 2):
        with tempfile.TemporaryDirectory() as tmp:
            theirs_model = hf_llama(n_kv, Path(tmp))
            ours_model = open_source(tmp).load(cpu, torch.float32)
        ours_t, theirs_t = float("inf"), float("inf")
        for _ in range(args.repeats):  # alternate, so drift in the CPU's load hits both
            t, totals = timed(lambda: window_scores(ours_model, tokens, args.seq_len,
                                                    args.batch_size, cpu), 1)
            ours_t = min(ours_t, t)
            t, (theirs_sum, theirs_n) = timed(
                lambda: transformers_nll(theirs_model, tokens, args.seq_len, args.batch_size), 1)
            theirs_t = min(theirs_t, t)
        assert int(totals[1]) == theirs_n == n_tokens
        print(f"{n_kv:<9}{n_tokens / ours_t:>12,.0f}{n_tokens / theirs_t:>14,.0f}"
              f"{theirs_t / ours_t:>7.2f}x{mean_nll(totals):>10.4f}{theirs_sum / theirs_n:>12.4f}")


if __name__ == "__main__":
    main()
