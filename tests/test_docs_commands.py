"""Every command line in README.md and docs/*.md still works, so a moved module or a renamed
option cannot leave a dead example.

A command line is a line of a shell code block, or an inline code span, that starts with
`python`, `accelerate launch`, `torchrun` or `make` (after env assignments, `srun`, and the
`$ ` of a transcript; `echo ... |` pipes into it). For each distinct command:
- the script or module exists and `--help` exits 0 with `usage:` on stdout (run once,
  in-process, as `python` would run it: tests/command_forks.run_command);
- a Hydra command's overrides (and Hydra's own flags) compose against its config, read
  from its `cli.hydra_main(config_path=..., config_name=...)`: each `a|b` alternative, each
  `-m` sweep value; `<placeholders>` and `$VARS` become "1" (a valid str, int or float);
  a leading bare word (`store.hf import`) is the `action=`; a transcript line whose
  documented `error:` is a composition error must print exactly that error;
- an argparse command's `--flags` appear in its --help; an experiment's key=value settings
  load through its `load_settings`;
- `accelerate launch` / `torchrun` options parse with the launcher's own parser, and a
  `--config_file` exists; a `make` target exists in the Makefile.
The old spellings `python -m model.convert|model.hf|model.quantize` print the same --help as
the new ones, run as real processes."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from command_forks import run_command  # noqa: E402

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
DUMMY = "1"  # a placeholder's value: valid as a str, an int and a float
ALIASES = {"model.convert": "convert", "model.hf": "store.hf", "model.quantize": "store.quantize"}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
ENV.pop("HYDRA_FULL_ERROR", None)


@dataclass
class Example:
    where: str  # README.md:73
    text: str
    command: tuple[str, ...] = ()  # ("train.py",), ("-m", "convert"), ("make",)
    args: list[str] = field(default_factory=list)
    launcher: list[str] = field(default_factory=list)  # ["accelerate", "launch", ...opts]
    error: str | None = None  # the `error:` line a transcript shows after it


def candidates(path: Path) -> list[tuple[int, str, str | None]]:
    """(line number, text, documented error) of each shell line and inline code span (a span
    may wrap onto the next line of its paragraph)."""
    lines = path.read_text().splitlines()
    found, block, prose, i = [], None, [], 0

    def spans() -> None:
        text = "\n".join(line for _, line in prose)
        for m in re.finditer(r"`([^`]+)`", text):
            found.append((prose[0][0] + text.count("\n", 0, m.start()), m.group(1), None))
        prose.clear()

    while i < len(lines):
        line, n = lines[i], i + 1
        if line.lstrip().startswith("```"):
            spans()
            block = line.strip()[3:].strip() if block is None else None
        elif block is None:
            if line.strip():
                prose.append((n, line))
            else:
                spans()
        elif block in SHELL_BLOCKS:
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            error = None
            if line.startswith("$ ") and i + 1 < len(lines) and lines[i + 1].startswith("error:"):
                error = lines[i + 1].removeprefix("error:").strip()
            found.append((n, line.removeprefix("$ "), error))
        i += 1
    spans()
    return found


def parse(where: str, text: str, error: str | None = None) -> Example | None:
    """A command line -> Example, or None when the text is not a command."""
    text = text.replace("\\|", "|")
    text = re.sub(r"<[^<>]*>|\$\{?\w+\}?", DUMMY, text)
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return None
    if "|" in tokens:  # echo ... | python ...
        tokens = tokens[len(tokens) - tokens[::-1].index("|"):]
    while tokens and (re.match(r"[A-Za-z_]\w*=", tokens[0]) or tokens[0] == "srun"):
        tokens = tokens[1:]
    ex = Example(where, text, error=error)
    if len(tokens) >= 2 and tokens[0] == "make":
        ex.command, ex.args = ("make",), tokens[1:2]
        return ex
    if tokens[:1] in (["python"], ["python3"]) and len(tokens) >= 2:
        rest = tokens[1:]
    elif tokens[:2] == ["accelerate", "launch"] or tokens[:1] == ["torchrun"]:
        script = next((k for k, t in enumerate(tokens) if t.endswith(".py")), None)
        if script is None:
            return None  # prose about the launcher, not a command line
        ex.launcher, rest = tokens[:script], tokens[script:]
    else:
        return None
    if rest[0] == "-m":
        if len(rest) < 2:
            return None
        ex.command, args = ("-m", rest[1]), rest[2:]
    else:
        ex.command, args = (rest[0],), rest[1:]
    ex.args = [unbracket(a) for a in args if a not in ("...", DUMMY) and not a.endswith("=...")]
    return ex


def unbracket(arg: str) -> str:
    """An optional `[key=value]` or `[--flag N]` part, unwrapped; `key=[a,b]` kept."""
    if arg.startswith("["):
        return arg[1:].removesuffix("]")
    return arg.removesuffix("]") if arg.endswith("]") and "[" not in arg else arg


def examples() -> list[Example]:
    found = []
    for path in DOCS:
        for n, text, error in candidates(path):
            ex = parse(f"{path.relative_to(ROOT)}:{n}", text, error)
            if ex is not None:
                found.append(ex)
    return found


EXAMPLES = examples()
COMMANDS = sorted({ex.command for ex in EXAMPLES if ex.command != ("make",)})


def command_file(command: tuple[str, ...]) -> Path | None:
    """The file `python <command>` runs, or None if there is none."""
    if command[0] != "-m":
        path = ROOT / command[0]
        return path if path.is_file() else None
    try:
        spec = importlib.util.find_spec(command[1])
        if spec is not None and spec.submodule_search_locations is not None:  # a package
            spec = importlib.util.find_spec(command[1] + ".__main__")
    except ImportError:
        return None
    return Path(spec.origin) if spec is not None and spec.origin else None


def hydra_app(path: Path, follow: bool = True) -> tuple[Path, str] | None:
    """(configs dir, config name) of the `hydra_main(config_path=, config_name=)` in the
    file, or in a project module it imports from (a package's __main__.py)."""
    tree = ast.parse(path.read_text())
    follow = follow and path.name == "__main__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("hydra_main", "main") and {"config_path", "config_name"} <= \
                {k.arg for k in node.keywords}:
            kw = {k.arg: ast.literal_eval(k.value) for k in node.keywords
                  if k.arg in ("config_path", "config_name")}
            return (path.parent / kw["config_path"]).resolve(), kw["config_name"]
    if follow:
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                spec = importlib.util.find_spec(node.module) if (
                    ROOT / node.module.split(".")[0]).exists() else None
                if spec is not None and spec.origin and Path(spec.origin).is_relative_to(ROOT):
                    app = hydra_app(Path(spec.origin), follow=False)
                    if app:
                        return app
    return None


def run_help(command: tuple[str, ...], capsys) -> tuple[int, str, str]:
    """`python <command> --help`, in-process (the command's libraries are imported once)."""
    capsys.readouterr()
    argv = [*command, "--help"] if command[0] == "-m" else [str(ROOT / command[0]), "--help"]
    cwd = os.getcwd()
    module = sys.modules.get(command[1]) if command[0] == "-m" else None
    try:
        os.chdir(ROOT)
        code = run_command(argv)
    finally:
        os.chdir(cwd)
        if module is not None:  # run_command re-imports it: later tests keep their classes
            sys.modules[command[1]] = module
    out, err = capsys.readouterr()
    return code, out, err


def action_as_key(args: list[str]) -> list[str]:
    if args and "=" not in args[0] and not args[0].startswith("-"):
        return [f"action={args[0]}", *args[1:]]
    return args


def variants(overrides: list[str]) -> list[list[str]]:
    """One override list per `a|b` alternative of each override (the others at their first)."""
    base = [o.split("|")[0] if "=" in o else o for o in overrides]
    out = [base]
    for k, o in enumerate(overrides):
        if "=" in o and "|" in o.split("=", 1)[1] and not re.search(r"[\[{('\"]", o):
            key, values = o.split("=", 1)
            first = values.split("|")[0]
            for v in values.split("|")[1:]:
                out.append([*base[:k], f"{key}={v}", *base[k + 1:]])
            base[k] = f"{key}={first}"
    return out


def hydra_overrides(command: tuple[str, ...], args: list[str]) -> list[list[str]]:
    """The override lists `python <command> args` composes (Hydra's own argument parser;
    `-m` sweeps expanded into one list per value). Raises SystemExit on a bad flag."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    import cli
    if command[-1] in ("generate.py", "evaluate.py"):  # what their __main__ does first
        args = cli.quote_prompt_args(args, "prompt" if command[-1] == "generate.py"
                                     else "attention.prompt")
    parsed = get_args_parser().parse_args(action_as_key(args))
    lists = []
    for overrides in variants(parsed.overrides):
        if not parsed.multirun:
            lists.append(overrides)
            continue
        for k, o in enumerate(OverridesParser.create().parse_overrides(overrides)):
            if o.is_sweep_override():
                key = o.get_key_element()
                lists += [[*overrides[:k], f"{key}={v}", *overrides[k + 1:]]
                          for v in o.sweep_string_iterator()]
        lists.append([o.split("=", 1)[0] + "=" + o.split("=", 1)[1].split(",")[0]
                      if "=" in o else o for o in overrides])
    return lists


def compose_error(configs: Path, name: str, overrides: list[str]) -> str | None:
    from hydra import compose, initialize_config_dir
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(configs)):
            compose(name, overrides)
    except Exception as e:  # noqa: BLE001 - any refusal is the finding
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def check_launcher(ex: Example) -> list[str]:
    if not ex.launcher:
        return []
    if ex.launcher[0] == "accelerate":
        from accelerate.commands.launch import launch_command_parser
        parser, opts = launch_command_parser(), ex.launcher[2:]
    else:
        from torch.distributed.run import get_args_parser
        parser, opts = get_args_parser(), ex.launcher[1:]
    parser.exit_on_error = False
    problems = []
    try:
        known, unknown = parser.parse_known_args([*opts, "x.py"])
        if unknown:
            problems.append(f"{ex.launcher[0]} does not take {unknown}")
    except (SystemExit, Exception) as e:  # noqa: BLE001
        problems.append(f"{ex.launcher[0]} refuses {opts}: {e}")
    for k, opt in enumerate(opts[:-1]):
        if opt == "--config_file" and not (ROOT / opts[k + 1]).is_file():
            problems.append(f"--config_file {opts[k + 1]} does not exist")
    return problems


def check(command: tuple[str, ...], capsys, exs: list[Example]) -> list[str]:
    """Every problem of these examples of one command, as `file:line: problem`."""
    path = command_file(command)
    if path is None:
        return [f"{ex.where}: {' '.join(command)} does not exist ({ex.text})" for ex in exs]
    problems = []
    code, out, err = run_help(command, capsys)
    spelling = f"python -m {command[1]}" if command[0] == "-m" else Path(command[0]).name
    if code != 0 or not (re.search(r"^usage:", out, re.M) or spelling in out):
        problems.append(f"{exs[0].where}: `python {' '.join(command)} --help` exits {code} "
                        f"(stdout {out[:80]!r}, stderr {err.strip()[-200:]!r}): expected 0 "
                        f"and a usage: line, or the command's name ({spelling}), on stdout")
    app = hydra_app(path)
    module = None if app else importlib.import_module(command[-1]) if command[0] == "-m" else None
    for ex in exs:
        problems += [f"{ex.where}: {p}" for p in check_launcher(ex)]
        if app:
            problems += [f"{ex.where}: {p}" for p in check_hydra(command, app, ex, capsys)]
        elif module is not None and hasattr(module, "load_settings"):
            try:
                module.load_settings([a for a in ex.args if "=" in a])
            except Exception as e:  # noqa: BLE001
                problems.append(f"{ex.where}: {ex.args} do not load: {e}")
        else:
            problems += [f"{ex.where}: {flag} is not an option of {' '.join(command)} "
                         f"(its --help does not name it)"
                         for flag in (a.split("=")[0] for a in ex.args if a.startswith("--"))
                         if not re.search(rf"(^|[\s,\[]){re.escape(flag)}\b", out)]
    return problems


def check_hydra(command, app, ex: Example, capsys) -> list[str]:
    configs, name = app
    try:
        lists = hydra_overrides(command, ex.args)
        refusal = next(filter(None, (compose_error(configs, name, o) for o in lists)), None)
    except SystemExit:
        refusal = "Hydra's argument parser refuses it"
    capsys.readouterr()
    if ex.error is None:
        return [f"{ex.args} do not compose against configs/{name}.yaml: {refusal}"] \
            if refusal else []
    if refusal is None:
        return []  # the documented error comes from the run (files it needs), not the config
    cwd = os.getcwd()
    try:  # a composition error: the command itself must print exactly the documented one
        os.chdir(ROOT)
        argv = [*command, *ex.args] if command[0] == "-m" else [str(ROOT / command[0]), *ex.args]
        code = run_command(argv)
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err.strip().splitlines()
    got = err[-1] if err else ""
    return [] if code == 2 and got == f"error: {ex.error}" else \
        [f"documents `error: {ex.error}` but the command exits {code} with {got!r}"]


def test_the_docs_have_command_lines():
    """Not vacuous: the Quick start, training, conversion and the HF commands are found."""
    commands = {ex.command for ex in EXAMPLES}
    assert {("make",), ("train.py",), ("generate.py",), ("-m", "convert"),
            ("-m", "store.hf")} <= commands
    assert any(ex.error for ex in EXAMPLES)  # the errors transcript


def test_the_checker_catches_dead_examples(capsys):
    """A moved module, an unknown key, a bad group option, an unknown flag and a wrong
    documented error are each reported."""
    assert check(("-m", "model.nosuch"), capsys, [parse("x:1", "python -m model.nosuch a=1")])
    for line in ("python -m convert n_kv_heads=2", "python -m convert data=nosuch",
                 "python -m store.hf import hf=1 ckpt_dir=2", "python train.py --nosuch"):
        ex = parse("x:1", line)
        assert check(ex.command, capsys, [ex]), line
    ex = parse("x:1", "python -m store.quantize mdoe=int8", "unknown key mdoe: did you mean x?")
    assert check(ex.command, capsys, [ex])
    ex = parse("x:1", "python bench/train.py --nosuch-flag")
    assert check(ex.command, capsys, [ex])


def test_documented_paths_exist():
    """Every repository path a doc names in code (`store/runs.py`, `configs/train.yaml`,
    `experiments/configs/`) exists: a moved file leaves no stale pointer."""
    bad = []
    for path in DOCS:
        for n, text, _ in candidates(path):
            for ref in re.findall(r"(?<![\w./$<{-])((?:[a-z_]+/)+[\w.]*)", text):
                top = ref.split("/")[0]
                if (ROOT / top).is_dir() and not (ROOT / ref.rstrip(".")).exists():
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {ref} does not exist")
    assert not bad, "\n".join(bad)


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    bad = [f"{ex.where}: make {ex.args[0]}: no such target" for ex in EXAMPLES
           if ex.command == ("make",) and not re.search(rf"^{re.escape(ex.args[0])}:", makefile,
                                                        re.M)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_documented_command(command, capsys):
    problems = check(command, capsys, [ex for ex in EXAMPLES if ex.command == command])
    assert not problems, "\n".join(problems)


# started at import, so that their interpreters start while the other tests run
ALIAS_RUNS = {old: subprocess.Popen([sys.executable, "-m", old, "--help"], cwd=ROOT, env=ENV,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for old in ALIASES}


def test_old_spellings_print_the_new_help(capsys):
    """`python -m model.convert --help` (an alias kept for old scripts), run as a process of
    its own, prints what `python -m convert --help` prints; likewise model.hf and
    model.quantize."""
    procs, problems = ALIAS_RUNS, []
    for old, new in ALIASES.items():
        out, err = procs[old].communicate(timeout=300)
        code, want, _ = run_help(("-m", new), capsys)
        if procs[old].returncode != 0 or out != want or code != 0:
            problems.append(f"python -m {old} --help exits {procs[old].returncode} and prints "
                            f"{out[:120]!r} {err[-300:]!r}; python -m {new} --help: {want[:120]!r}")
    assert not problems, "\n".join(problems)
