"""Hub model ids as sources: wherever a command takes a model dir, `org/name` or
`org/name@revision` (a branch, tag or commit) names a model on the Hugging Face Hub.

A local path always wins: only text that is no existing path and has an id's shape is
looked up. The id resolves through huggingface_hub into its cache (HF_HUB_CACHE), which
receives only what a source reads: config.json, the tokenizer files, the chat template and
safetensors weights. A repo whose weights are only pickles (pytorch_model.bin) is refused
from its file list, before any weight is downloaded, so nothing of it is ever unpickled.
With HF_HUB_OFFLINE=1 the cache alone answers. The commit an id resolved to is its
HubOrigin, which conversions and runs record, so they name exactly the weights they read.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

import cli
from data.tokenizer import TOKENIZER_FILES
from store.checkpoint import CONFIG

WEIGHTS_PATTERN = "model*.safetensors*"  # model.safetensors, its shards and their index
WANTED = [CONFIG, *TOKENIZER_FILES, WEIGHTS_PATTERN]  # all a source reads; never a pickle
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# The Hub's repo-name rules (no "--" or "..", at most 96 characters are checked below).
ID = re.compile(r"(?P<repo>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?",
                re.ASCII)
COMMIT = re.compile(r"[0-9a-f]{40}")


class HubError(cli.UserError):
    """A Hub id that cannot be resolved or taken as a source; the message names the fix."""


@dataclass(frozen=True)
class HubOrigin:
    """Where a source came from on the Hub: its repo and the commit its files are at."""
    repo: str
    commit: str

    @property
    def spec(self) -> str:
        """`org/name@<commit>`: the id that names these very files again."""
        return f"{self.repo}@{self.commit}"


def hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo, revision or None) when text has a Hub id's shape and is no existing path."""
    match = ID.fullmatch(str(text))
    if match is None or Path(str(text)).expanduser().exists():
        return None
    repo = match["repo"]
    if "--" in repo or ".." in repo or len(repo) > 96:
        return None
    return repo, match["revision"]


def model_dir(text: str, option: str) -> tuple[Path, HubOrigin | None]:
    """text as a command's `option=` names a model: an existing path as is (a local path
    always wins), a Hub id as its cache snapshot dir and origin, anything else as the path
    it names (the caller says it is missing)."""
    if hub_id(text) is None:
        return Path(str(text)).expanduser(), None
    return resolve_hub(text, option)


def resolve_hub(text: str, option: str) -> tuple[Path, HubOrigin]:
    """Hub id text (`org/name[@revision]`) -> (its snapshot dir in the Hub cache, origin),
    downloading what is missing unless HF_HUB_OFFLINE=1. A commit already in the cache
    needs no network."""
    repo, revision = hub_id(text) or (None, None)
    if repo is None:
        raise HubError(f"{text} is not a Hub id: pass {option}=<org/name[@revision]> or an "
                       f"existing directory")
    snapshot = None
    if offline() or (revision and COMMIT.fullmatch(revision)):
        snapshot = cached_snapshot(repo, revision)
    if snapshot is None:
        if offline():
            raise HubError(f"{text} not found: not a local directory, and not in the Hub cache "
                           f"({hub_cache()}) while HF_HUB_OFFLINE=1: run once online to "
                           f"download it, or pass an existing directory as {option}=")
        snapshot = download(repo, revision, text)
    check_weights(files_in(snapshot), f"{text} (in the Hub cache, {snapshot})")
    return snapshot, HubOrigin(repo, snapshot.name)


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def hub_cache() -> str:
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cache's snapshot dir of repo at revision (a branch or tag through its refs/), or
    None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError):  # ValueError: a name the Hub refuses
        return None


def download(repo: str, revision: str | None, text: str) -> Path:
    """What a source reads of repo at revision, into the cache: its file list is checked
    first, so a repo of pickled weights is refused before any weight is downloaded."""
    from huggingface_hub import HfApi, snapshot_download
    info = from_hub(lambda: HfApi().model_info(repo, revision=revision, timeout=30),
                    repo, revision, text)
    check_weights([s.rfilename for s in info.siblings or []], text)
    return Path(from_hub(lambda: snapshot_download(repo, revision=info.sha,
                                                   allow_patterns=WANTED), repo, revision, text))


def from_hub(call, repo: str, revision: str | None, text: str):
    """call()'s answer; the Hub's refusals and network failures as one-line HubErrors."""
    from huggingface_hub.errors import (GatedRepoError, HTTPError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    try:
        return call()
    except GatedRepoError:
        raise HubError(f"{repo} is gated: accept its terms on huggingface.co and log in "
                       f"(hf auth login), or pass a local directory") from None
    except RepositoryNotFoundError:
        raise HubError(f"{text} not found: not a local directory, nor a model on the Hub (or "
                       f"a private one: log in with hf auth login)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo} has no revision {revision!r}: pass a branch, tag or commit "
                       f"of it as {repo}@<revision>") from None
    except (HTTPError, OSError, ValueError) as e:
        raise HubError(f"{text}: the Hub could not be reached ({type(e).__name__}: "
                       f"{cli.one_line(e)}): check the network, or set HF_HUB_OFFLINE=1 to "
                       f"use the cache") from None


def files_in(snapshot: Path) -> list[str]:
    """The snapshot's files, relative (links to blobs that are gone left out)."""
    return [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]


def check_weights(files: list[str], where: str) -> None:
    """Refuse a repo (by its file names alone) whose weights are not safetensors."""
    if any(fnmatch.fnmatch(f, WEIGHTS_PATTERN) for f in files):
        return
    pickles = [f for f in files if any(fnmatch.fnmatch(f, p) for p in PICKLES)]
    if pickles:
        raise HubError(f"{where} holds its weights only as pickles ({', '.join(pickles[:3])}), "
                       f"which run code when loaded: gqalab takes a Hub model's safetensors "
                       f"only; use a repo with model.safetensors, or convert it in a trusted "
                       f"environment and pass that dir")
    raise HubError(f"{where} has no model.safetensors: not an HF model repo (run once online "
                   f"if the cache holds only part of it)")
