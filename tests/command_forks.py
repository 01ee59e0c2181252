"""Run gqalab commands as forks of one process that imported their libraries once.

A refused command costs a few seconds of imports (torch, transformers, datasets, hydra)
and a few milliseconds of work; test_cli_errors runs ~80 of them. This process imports
the libraries, then reads one JSON job per line on stdin, {"argv": [...], "cwd": ...,
"stderr": file}, forks, and in the child runs argv (`x.py args` or `-m module args`) as
`python` would (sys.argv, __main__, cwd, stdout/stderr file descriptors), then answers
{"rc": exit status} on stdout. Each command still runs in its own process, so no state
passes from one to the next; this process itself never runs a command or a tensor op,
so the fork copies no thread pool.
"""
from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback

COMMANDS = ["train", "generate", "evaluate", "data.prepare", "convert.command", "store.hf",
            "store.quantize"]


def run_command(argv: list[str]) -> int:
    import cli
    cli.STARTED = time.time() - 1  # cli dates "made by this process" from the command's start
    try:
        if argv[0] == "-m":
            sys.modules.pop(argv[1], None)  # imported below; `python -m` runs a fresh copy
            sys.argv = [argv[1], *argv[2:]]  # run_module puts the module's file first
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except BaseException:  # what the interpreter does with an uncaught exception
        traceback.print_exc()
        return 1


def child(job: dict) -> None:
    signal.alarm(300)  # a hung command dies (rc -14) instead of hanging the test run
    os.chdir(job["cwd"])
    err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    code = run_command(job["argv"])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    import importlib
    sys.path.remove(os.path.dirname(os.path.abspath(__file__)))  # tests/ is not the commands' path
    for name in COMMANDS:  # and through them torch, datasets, accelerate, hydra, ...
        importlib.import_module(name)
    for line in sys.stdin:
        job = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(job)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
