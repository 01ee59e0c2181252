"""key=value arguments for the small `python -m model.*` commands (convert, hf)."""
from __future__ import annotations


class ArgError(ValueError):
    """A bad command-line argument; the message is one line that names the fix."""


def parse_key_values(argv: list[str], required: tuple[str, ...], defaults: dict[str, str],
                     usage: str) -> dict[str, str]:
    """["k=v", ...] -> {k: v} over required + defaults' keys; anything else, or a
    required key left out, is an ArgError that ends with usage. -h/--help prints usage."""
    if "-h" in argv or "--help" in argv:
        print(usage)  # asked for: stdout, exit 0
        raise SystemExit(0)
    allowed = (*required, *defaults)
    args = dict(defaults)
    for arg in argv:
        key, eq, value = arg.partition("=")
        if not eq or key not in allowed:
            raise ArgError(f"unexpected argument {arg!r}: expected key=value with key in "
                           f"{', '.join(allowed)}; {usage}")
        args[key] = value
    if missing := [k for k in required if not args.get(k)]:
        raise ArgError(f"missing {', '.join(f'{k}=...' for k in missing)}; {usage}")
    return args


def as_int(args: dict[str, str], key: str) -> int:
    try:
        return int(args[key])
    except ValueError:
        raise ArgError(f"{key} must be an integer, got {args[key]!r}") from None


def as_bool(args: dict[str, str], key: str) -> bool:
    value = args[key].lower()
    if value not in ("true", "false"):
        raise ArgError(f"{key} must be true or false, got {args[key]!r}")
    return value == "true"
