"""llama.cpp's greedy decode speed on a GGUF, for bench/decode.py's section g.

Runs in llama-cpp-python's own venv (an optional, bench-only dependency), so it imports
llama_cpp and the standard library only. Prints one JSON object: the best seconds from the
first generated token to the last, tok/s over them, the generated ids, llama_cpp's version.

    ~/.cache/gqalab/llamacpp/venv/bin/python bench/llama_peer.py MODEL.gguf 1,504,3123 \\
        --new 128 --threads 2 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import time

import llama_cpp


def decode(llm: llama_cpp.Llama, prompt: list[int], new: int) -> tuple[float, list[int]]:
    """One greedy generation of `new` tokens from a fresh context: (seconds from the first
    yielded token to the last, the ids). The prompt's evaluation is not timed."""
    llm.reset()  # no reuse of the previous run's prompt
    ids: list[int] = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
        if not ids:
            started = time.perf_counter()
        ids.append(token)
        if len(ids) == new:
            break
    return time.perf_counter() - started, ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("prompt_ids", help="comma-separated token ids")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    llm = llama_cpp.Llama(model_path=args.gguf, n_threads=args.threads, n_ctx=512, verbose=False)
    prompt = [int(i) for i in args.prompt_ids.split(",")]
    seconds, ids = min(decode(llm, prompt, args.new) for _ in range(args.repeats))
    print(json.dumps({"seconds": seconds, "tok_s": (args.new - 1) / seconds, "ids": ids,
                      "version": llama_cpp.__version__}))


if __name__ == "__main__":
    main()
