"""What the experiments share: presets (a YAML file per preset, key=value overrides on top,
typed by a dataclass) and the method names of their tables ("similar+procrustes")."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from convert.align import ALIGNMENTS, GROUPINGS
from convert.heads import METHODS, Conversion


def load_preset(schema: type, folder: Path, argv: list[str], error: type[Exception]) -> DictConfig:
    """preset=<name> (folder/<name>.yaml, default quick) plus key=value overrides of it,
    typed by schema; the invocation lands in cfg.command. A bad one raises error (one line)."""
    preset = next((a.split("=", 1)[1] for a in argv if a.startswith("preset=")), "quick")
    path = folder / f"{preset}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise error(f"unknown preset {preset!r}: use one of {names}")
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path),
                               OmegaConf.from_dotlist([a for a in argv if not a.startswith("preset=")]),
                               {"command": list(argv)})
    except OmegaConfBaseException as e:
        raise error(f"bad setting: {str(e).splitlines()[0]} (the keys and types "
                    f"are in {path})") from None


def named_conversion(name: str, n_kv_head: int, seed: int = 0) -> Conversion:
    """A methods entry -> its Conversion to n_kv_head heads: "first", "similar+procrustes",
    "similar+linear+distill", ... (method mean unless named; "similar" chooses the groups,
    "procrustes" or "linear" aligns; other parts, such as "distill", are not conversion's)."""
    parts = name.split("+")
    return Conversion(n_kv_head, method=next((p for p in parts if p in METHODS), "mean"),
                      group=next((p for p in parts if p in GROUPINGS), "contiguous"),
                      align=next((p for p in parts if p in ALIGNMENTS), "none"), seed=seed)
