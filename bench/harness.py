"""Zero-shot task throughput: the lm-eval adapter (evaluation/harness.GqalabLM) against
lm-evaluation-harness's own HF backend (HFLM), in the same run, on the same HF dir and the
same requests.

    python -m bench.harness --hf <HF dir> --tasks-dir ../shared/evalsets --items 20
    python -m bench.harness --hf <HF dir> --tasks-dir ../shared/evalsets --items 50 --repeats 3

The five local tasks (evaluation/tasks.py) build their loglikelihood requests for the first
--items items each; both models score exactly those requests through the harness's
`loglikelihood` (fp32, CPU unless --cuda, batch --batch-size). Tokens are each request's
context + continuation as the HF tokenizer encodes them, the same count for both sides, so
the ratio (adapter / HFLM tokens/s) is HFLM's wall time over the adapter's. One untimed
warm-up call each, then best of --repeats per side and task, alternating sides (the CPU
is shared: the minimum is the least noisy); per task the wall time of each side, its
tokens/s, and the largest |log-likelihood difference| between the two (they must agree).
"""
from __future__ import annotations

import argparse
import time

import torch

from evaluation.tasks import LOCAL_TASKS, task_specs

TASKS = list(LOCAL_TASKS)


def requests(names: list[str], tasks_dir: str, items: int) -> dict:
    """task -> its loglikelihood Instances for the first `items` documents."""
    from lm_eval.tasks import TaskManager
    tasks = TaskManager(include_defaults=False).load(task_specs(names, tasks_dir))["tasks"]
    out = {}
    for name in names:
        tasks[name].build_all_requests(limit=items, rank=0, world_size=1)
        out[name] = list(tasks[name].instances)
    return out


def timed_scores(lm, reqs) -> tuple[float, list[float]]:
    start = time.perf_counter()
    scores = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
    return time.perf_counter() - start, scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="an HF Llama/GPT-2/NeoX dir")
    p.add_argument("--tasks-dir", required=True, help="the five tasks' local copies")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--items", type=int, default=20, help="items per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cuda", action="store_true")
    args = p.parse_args()
    from lm_eval.models.huggingface import HFLM
    from transformers.utils import logging
    from evaluation.harness import GqalabLM
    from store.source import load_model
    logging.disable_progress_bar()
    device = torch.device("cuda" if args.cuda else "cpu")
    model, tokenizer = load_model(args.hf, device, torch.float32)
    ours = GqalabLM(model, tokenizer, args.batch_size)
    theirs = HFLM(pretrained=args.hf, device=str(device), dtype="float32",
                  batch_size=args.batch_size)
    by_task = requests(args.tasks.split(","), args.tasks_dir, args.items)
    print(f"{args.hf}: {args.items} items per task, batch {args.batch_size}, fp32, {device}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats}")
    print(f"{'task':<15}{'requests':>9}{'tokens':>8}{'adapter s':>11}{'HFLM s':>9}"
          f"{'adapter tok/s':>15}{'HFLM tok/s':>12}{'ratio':>8}{'max |dLL|':>11}")
    first = next(iter(by_task.values()))[:4]
    timed_scores(ours, first), timed_scores(theirs, first)  # warm-up, untimed
    total = {"tokens": 0, "ours": 0.0, "theirs": 0.0}
    for name, reqs in by_task.items():
        tokens = sum(len(c) + len(x) for c, x in
                     (ours._encode_pair(*r.args) for r in reqs))
        ours_t = theirs_t = float("inf")
        for _ in range(args.repeats):  # alternate, so drift in the CPU's load hits both
            t, ours_ll = timed_scores(ours, reqs)
            ours_t = min(ours_t, t)
            t, theirs_ll = timed_scores(theirs, reqs)
            theirs_t = min(theirs_t, t)
        diff = max(abs(a - b) for a, b in zip(ours_ll, theirs_ll))
        total["tokens"] += tokens
        total["ours"] += ours_t
        total["theirs"] += theirs_t
        print(f"{name:<15}{len(reqs):>9}{tokens:>8}{ours_t:>11.1f}{theirs_t:>9.1f}"
              f"{tokens / ours_t:>15,.0f}{tokens / theirs_t:>12,.0f}{theirs_t / ours_t:>7.2f}x"
              f"{diff:>11.1e}")
    n, o, t = total["tokens"], total["ours"], total["theirs"]
    print(f"{'all':<15}{'':>9}{n:>8}{o:>11.1f}{t:>9.1f}{n / o:>15,.0f}{n / t:>12,.0f}"
          f"{t / o:>7.2f}x")


if __name__ == "__main__":
    main()
