"""How every gqalab command fails: one `error: ...` line on stderr, exit status 2.

    @cli.hydra_main(config_path="configs", config_name="train")
    def main(cfg): ...

replaces `@hydra.main(version_base="1.3", ...)`. A `UserError` the task raises (every
command's error class subclasses it), the task's extra `errors`, OmegaConf's errors
met while it runs (a bad interpolation) and every error Hydra raises before it starts (a
wrong type, an unknown key, an unknown group option, an unparsable override) become one
line that names the key and what is allowed: a group's options, the closest known key.
So do an unknown --flag and a `+key=value` that adds a key no setting reads.
Any other exception in the task is a bug and keeps its traceback. HYDRA_FULL_ERROR=1
lets every error through with its full trace, for debugging.

For the `python -m` commands: run_app(app, argv) runs an app as a function that returns
its exit status (`main(argv)`), exit_status(task) does the same for a plain function, user_keys() says which keys the command line set, and
require(cfg) names the mandatory (???) options left out with the command's usage line.

A package that imports only hydra, omegaconf and the standard library, so the entry
points and every package but model/ can use it without importing each other; model/'s
error classes (torch-only) mark themselves `user_error = True` instead of subclassing.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.errors import MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

FULL_ERROR = "HYDRA_FULL_ERROR"
STARTED = time.time() - 1  # a dir made since then (mtime, whole seconds) is this process's


class UserError(ValueError):
    """Bad input the user can fix: every gqalab error class (ConfigError, CheckpointError,
    DataError, ConvertError, ...) subclasses it, and every command prints it as one line.
    Anything else raised is a bug and keeps its traceback."""


def is_user_error(e: BaseException) -> bool:
    """A UserError, OmegaConf's error in the user's config, or an error class of a package
    that cannot import this module (model/ is torch-only) marked `user_error = True`."""
    return isinstance(e, (UserError, OmegaConfBaseException)) or getattr(e, "user_error", False)


def fail(message: Any) -> NoReturn:
    fail_line(message)
    sys.exit(2)


def fail_line(message: Any) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr)


def one_line(text: Any) -> str:
    return " ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def full_error() -> bool:
    return os.environ.get(FULL_ERROR) == "1"


def hydra_main(config_path: str, config_name: str, errors: tuple[type[Exception], ...] = ()
               ) -> Callable[[Callable[[Any], Any]], Callable[..., Any]]:
    """@hydra.main(version_base="1.3", ...) with every user error (UserError, errors) as
    one line, exit 2."""
    def decorate(task: Callable[[Any], Any]) -> Callable[..., Any]:
        started = False  # errors after this are the task's, not Hydra's composition
        debug = False  # the user's HYDRA_FULL_ERROR=1: let every error through

        @functools.wraps(task)  # Hydra unwraps it to find config_path beside the task's file
        def guarded(cfg: Any) -> Any:
            nonlocal started
            started = True
            output_dir = Path(HydraConfig.get().runtime.output_dir)
            try:
                if not debug:
                    check_additions(cfg)
                return task(cfg)
            except Exception as e:
                if debug or not (is_user_error(e) or isinstance(e, errors)):
                    raise
                fail(describe(e))
            finally:
                discard_if_unused(output_dir)

        # config_path is relative to the task's file; made absolute so the app finds it when
        # imported as a module too (main(argv) in-process), not only run as a script
        configs = str((Path(inspect.getfile(task)).parent / config_path).resolve())
        app = hydra.main(version_base="1.3", config_path=configs,
                         config_name=config_name)(guarded)

        @functools.wraps(app)
        def run(*args: Any) -> Any:
            nonlocal started, debug
            started, debug = False, full_error()
            if not args:  # Hydra parses sys.argv itself: vet its flags first
                check_flags()
            if debug:
                return app(*args)
            before = os.environ.get(FULL_ERROR)
            os.environ[FULL_ERROR] = "1"  # Hydra then raises instead of printing its report
            try:
                return app(*args)
            except Exception as e:
                if started:
                    raise
                fail(describe(e))
            finally:
                os.environ.pop(FULL_ERROR)
                if before is not None:
                    os.environ[FULL_ERROR] = before
        return run
    return decorate


def run_app(app: Callable[[], Any], argv: list[str] | None = None) -> int:
    """A hydra_main app as a function of argv (default sys.argv[1:]) that returns its exit
    status: 0 when done or after --help, 2 when refused. For `main(argv)` of the
    `python -m` commands, which tests and scripts call in-process."""
    saved = sys.argv
    if argv is not None:
        sys.argv = [saved[0], *argv]
    try:
        app()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        sys.argv = saved
    return 0


def exit_status(task: Callable[[], Any], argv: list[str] = (), usage: str = "") -> int:
    """task() as a command's exit status: 0 when done, 2 when it raises a user error
    (printed as one `error:` line). For the `python -m` commands that are not Hydra apps;
    any other exception is a bug and keeps its traceback. With usage, -h/--help in argv
    prints it instead, exit 0."""
    if usage and {"-h", "--help"} & set(argv):
        print(usage.strip())
        return 0
    try:
        task()
    except Exception as e:
        if not is_user_error(e):
            raise
        fail_line(e)
        return 2
    return 0


def user_keys() -> list[str]:
    """The keys and groups the user set on the command line (`data=text_files` -> data,
    `+data.files=[a]` -> data.files), from inside a hydra_main task."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    overrides = list(HydraConfig.get().overrides.task)
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)]


def require(cfg: DictConfig) -> None:
    """Every mandatory (???) key given, or one UserError naming the missing ones and the
    command's usage (the first line of its hydra.help.header)."""
    missing = [k for k in cfg if OmegaConf.is_missing(cfg, k)]
    if missing:
        usage = HydraConfig.get().help.header.splitlines()[0].removeprefix("usage: ")
        raise UserError(f"missing {' '.join(f'{k}=...' for k in missing)}: {usage} "
                        f"(--help lists the options)")


def discard_if_unused(output_dir: Path) -> None:
    """Hydra makes its run dir before the task runs: remove it again if this process made
    it and left it empty (a refused run, or a task that writes elsewhere), and its parent
    (`runs/`) too if that is left empty. Never the working dir (`hydra.run.dir=.`) or above."""
    for folder in (output_dir, output_dir.parent):
        try:
            if Path.cwd().resolve().is_relative_to(folder.resolve()) \
                    or folder.stat().st_mtime < STARTED or any(folder.iterdir()):
                return
            folder.rmdir()
        except OSError:
            return


def check_additions(cfg: DictConfig) -> None:
    """Hydra's `+key=value` adds a key the schema lacks, which no command reads: a typo
    (`+model.n_layr=3`) would pass silently. Group options (`+experiment=x`) and hydra.*
    are Hydra's own business and pass."""
    hydra_cfg = HydraConfig.get()
    for override in OmegaConf.to_container(hydra_cfg.overrides.task):  # unresolved: `x=${y}`
        key = override.removeprefix("+").split("=", 1)[0]
        if override.startswith("++") or not override.startswith("+") \
                or key in hydra_cfg.runtime.choices or key.startswith("hydra."):
            continue
        close = difflib.get_close_matches(key, [k for k in leaf_keys(cfg) if k != key], n=1)
        guess = f"did you mean {close[0]}? " if close else ""
        fail(f"{override} adds a key {key} that no setting reads: {guess}settings are "
             f"key=value, without +")


def check_flags() -> None:
    """An unknown or incomplete --flag: argparse prints a usage block and `prog: error:`;
    say it in one line instead, with what the command takes."""
    parser = get_args_parser()
    def refuse(message: str) -> NoReturn:
        fix = ("settings are key=value overrides, without dashes (e.g. seed=1)"
               if message.startswith("unrecognized") else "--help lists the flags")
        fail(f"{message}: {fix}")

    parser.error = refuse  # type: ignore[method-assign]
    parser.parse_args()


def describe(e: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line reports -> one line with the fix."""
    cause = e.__cause__ if isinstance(e.__cause__, OmegaConfBaseException) else e
    if isinstance(e, MissingConfigException) and e.options is not None:
        return unknown_option(e.missing_cfg_file, e.options)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.parent_node is not None:
        return unknown_key(cause.full_key, cause.parent_node)
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        value = "" if cause.value is None else f"={cause.value}"
        hint = (f"; write a list: {cause.full_key}=[a,b]"
                if "is not a ListConfig" in str(cause) else "")
        return f"{cause.full_key}{value}: {str(cause).splitlines()[0]}{hint}"
    if isinstance(e, OverrideParseException):
        return (f"cannot parse {one_line(e).split(' See https')[0].removeprefix('Error parsing ')}"
                f": overrides are key=value (quote values with spaces or brackets)")
    return one_line(str(e).split("Config search path")[0])


def unknown_option(missing: str, options: list[str]) -> str:
    """'attention/foo' -> attention=foo is not an option of its group."""
    group, _, option = missing.rpartition("/")
    close = difflib.get_close_matches(option, options, n=1)
    guess = f"did you mean {group}={close[0]}? " if close else ""
    return f"{group}={option} is not an option of group {group}: {guess}choose one of " \
           f"{', '.join(options)}"


def unknown_key(key: str, parent: Any) -> str:
    """The closest key anywhere in the config (`n_layer` -> model.n_layer), or the keys
    beside the unknown one."""
    known = leaf_keys(parent._get_root())
    close = (difflib.get_close_matches(key, known, n=1)
             or [k for k in known if k.rpartition(".")[2] == key.rpartition(".")[2]][:1])
    if close:
        return f"unknown key {key}: did you mean {close[0]}?"
    keys = [str(k) for k in parent if k != "hydra"]
    return f"unknown key {key}: the keys here are {', '.join(keys)}"


def leaf_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k in node.keys():
        if prefix == "" and k == "hydra":
            continue
        child = node._get_node(k)
        if isinstance(child, DictConfig):
            keys += leaf_keys(child, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def quote_prompt_args(argv: list[str], key: str = "prompt") -> list[str]:
    """prompt=<text> -> prompt='<escaped text>' (key: the option's name), so any text
    (parentheses, colons, quotes, ${...}) reaches the config verbatim instead of tripping
    Hydra's override grammar."""
    def quote(text: str) -> str:
        # Hydra unescapes backslashes only before a quote, the end, or an interpolation.
        text = re.sub(r"(\\+)(?='|$|\$\{)", lambda m: m.group(1) * 2, text)
        return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"
    return [f"{key}={quote(a[len(key) + 1:])}" if a.startswith(f"{key}=") else a for a in argv]
