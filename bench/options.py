"""The bench scripts' command lines: described by the script's docstring, sizes as ints."""
from __future__ import annotations

import argparse


def parser(doc: str, **ints: int) -> argparse.ArgumentParser:
    """A parser described by doc's first paragraph, with an int option --a-b per
    a_b=default."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    for name, default in ints.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    return p
