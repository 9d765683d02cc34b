"""Hugging Face references: ``hf://org/name[@rev]``, or a bare ``org/name`` that is not a local path.

A reference resolves to a snapshot directory in the local Hugging Face cache, which is
then opened like any other HF directory.  tvlang never downloads: the lookup is
``huggingface_hub.snapshot_download(..., local_files_only=True)``, which reads the cache's
``refs/`` and ``snapshots/`` and opens no connection, so ``HF_HUB_OFFLINE=1`` changes
nothing.  The cache is wherever ``huggingface_hub`` puts it (``HF_HUB_CACHE``, else
``$HF_HOME/hub``).  ``huggingface_hub`` is optional (``pip install 'tvlang[hub]'``) and is
imported only when a reference needs it.

Which strings are references:

- ``hf://org/name`` and ``hf://org/name@rev`` (a branch, a tag or a full commit hash), always;
- a bare ``org/name``: exactly one slash and Hub-style names, when neither ``org/name`` nor
  ``org/name.safetensors`` exists relative to the program.  Local paths win.

A name without a slash is never a reference, and neither is anything else a path can be
(``./x/y``, ``/abs/x``, ``x/y/z``, ``x/y.safetensors``).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvlang.errors import TvInputError
from tvlang.source import Span

__all__ = ["DEFAULT_REVISION", "PREFIX", "HubRef", "download_command", "parse_reference", "resolve_reference"]

PREFIX = "hf://"
DEFAULT_REVISION = "main"
INSTALL = "pip install 'tvlang[hub]'"

# Hub repository names: letters, digits, '_', '-', '.'; no '--' or '..'; not starting or
# ending with '-' or '.'; at most 96 characters.
_NAME = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}", re.ASCII)
_BARE = re.compile(rf"{_NAME}/{_NAME}", re.ASCII)
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,254}", re.ASCII)

# What tvlang needs from a snapshot: the weights at its top level.  Given to the cache lookup,
# so a snapshot downloaded with `--include "*.safetensors"` counts as complete.
_ALLOW = ["*.safetensors", "*.safetensors.index.json"]
_IGNORE = ["*/*"]


@dataclass(frozen=True)
class HubRef:
    """A model on the Hugging Face Hub, at a revision."""

    repo_id: str
    revision: str = DEFAULT_REVISION
    explicit: bool = True  # written with hf://; a bare org/name is only a reference when not a local path

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision}"


def _well_formed(name: str) -> bool:
    return "--" not in name and ".." not in name


def parse_reference(text: str, span: Span | None = None) -> HubRef | None:
    """The reference ``text`` would be (ignoring local paths), or None for a plain path.

    >>> parse_reference("hf://org/model@v1.0")
    HubRef(repo_id='org/model', revision='v1.0', explicit=True)
    >>> parse_reference("org/model").explicit, parse_reference("model"), parse_reference("ckpt/base.safetensors")
    (False, None, None)
    """
    if text.startswith(PREFIX):
        body = text[len(PREFIX) :]
        repo_id, at, revision = body.partition("@")
        if not (_REPO_ID.fullmatch(repo_id) and _well_formed(repo_id)):
            raise TvInputError(
                f"{text!r} is not a Hugging Face model reference",
                span,
                label="expected hf://org/name or hf://org/name@revision",
                help="names are letters, digits, '_', '-' and '.', as on huggingface.co",
                code="E300",
            )
        if at and not (_REVISION.fullmatch(revision) and ".." not in revision and "//" not in revision):
            raise TvInputError(
                f"{text!r}: {revision!r} is not a revision",
                span,
                label="expected a branch, a tag or a commit hash after '@'",
                code="E300",
            )
        return HubRef(repo_id, revision if at else DEFAULT_REVISION)
    if _BARE.fullmatch(text) and _well_formed(text) and not text.endswith(".safetensors"):
        return HubRef(text, DEFAULT_REVISION, explicit=False)
    return None


def _local_candidates(base: Path, path: str) -> list[Path]:
    """Where ``load(path)`` looks on disk (the same rule as :meth:`Lowering.resolve_checkpoint`)."""
    return [base / path, base / (path + ".safetensors")]


def resolve_reference(path: str, base: Path, span: Span | None = None) -> str:
    """``path`` itself unless it is a Hugging Face reference; else its cached snapshot directory.

    ``base`` is the directory relative paths start from: a bare ``org/name`` that exists there
    (as a directory or as ``org/name.safetensors``) is a local path.  A reference that is not in
    the cache raises a :class:`TvInputError` (E300) at ``span`` saying how to download it.
    """
    ref = parse_reference(path, span)
    if ref is None:
        return path
    if not ref.explicit:
        try:
            if any(c.exists() for c in _local_candidates(base, path)):
                return path
        except OSError:  # unreadable: the ordinary path error says so
            return path
    hub = _import_hub()
    if hub is None:
        if not ref.explicit:
            looked = " or ".join(str(c) for c in _local_candidates(base, path))
            raise TvInputError(
                f"no such checkpoint: {path}",
                span,
                label=f"looked for {looked}",
                help=f"if {ref.repo_id} is a Hugging Face model, install huggingface_hub: `{INSTALL}`",
                code="E300",
            )
        raise TvInputError(
            f"{path} is a Hugging Face model, and reading those needs huggingface_hub",
            span,
            label="a Hugging Face reference",
            help=f"install it: `{INSTALL}`",
            code="E300",
        )
    snapshot_download, cache = hub
    try:
        folder: str = snapshot_download(
            ref.repo_id,
            revision=ref.revision,
            cache_dir=cache,
            local_files_only=True,
            allow_patterns=_ALLOW,
            ignore_patterns=_IGNORE,
        )
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError (and IncompleteSnapshotError) are OSErrors
        raise _not_cached(path, ref, base, cache, e, span) from None
    return folder


def _import_hub() -> tuple[Any, str] | None:
    """``snapshot_download`` and the cache directory, or None when huggingface_hub is not installed."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        return None
    # Read when called, not imported: huggingface_hub fixes it from HF_HUB_CACHE / HF_HOME at import.
    return snapshot_download, str(constants.HF_HUB_CACHE)


def download_command(ref: HubRef) -> str:
    """The shell command that puts ``ref`` into the cache, with the CLI the installed huggingface_hub ships
    (``hf`` from 0.34, ``huggingface-cli`` before)."""
    return f"{_cli()} download {ref.repo_id} --revision {shlex.quote(ref.revision)}"


def _cli() -> str:
    try:
        from importlib.metadata import distribution

        scripts = {
            e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"
        }
    except Exception:  # not installed, or no metadata
        scripts = set()
    return "huggingface-cli" if "huggingface-cli" in scripts and "hf" not in scripts else "hf"


def _cached_revisions(cache: str, repo_id: str) -> list[str]:
    """The branch and tag names (``refs/``) and commit hashes (``snapshots/``) cached for a repo."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    names: list[str] = []
    try:
        refs = repo / "refs"
        if refs.is_dir():
            names += sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file())
        snapshots = repo / "snapshots"
        if snapshots.is_dir():
            names += sorted(p.name for p in snapshots.iterdir() if p.is_dir())
    except OSError:
        pass
    return names


def _not_cached(
    path: str, ref: HubRef, base: Path, cache: str, error: Exception, span: Span | None
) -> TvInputError:
    notes = [f"searched the Hugging Face cache at {cache} (set by HF_HUB_CACHE, or HF_HOME as $HF_HOME/hub)"]
    cached = _cached_revisions(cache, ref.repo_id)
    if type(error).__name__ == "IncompleteSnapshotError":
        reason = f"the cached snapshot of {ref.repo_id} (revision {ref.revision}) is incomplete"
        label = "its .safetensors files are not all in the cache"
        notes.append(f"huggingface_hub: {error}")
    elif cached:
        reason = f"{ref.repo_id} is cached, but not at revision {ref.revision}"
        label = f"no revision {ref.revision} in the cache"
        notes.append(f"cached revisions of {ref.repo_id}: {', '.join(cached)}")
    else:
        reason = f"{ref.repo_id} (revision {ref.revision}) is not in the local cache"
        label = "not in the Hugging Face cache"
    notes.append("tvlang never downloads: it reads only what is already in the cache")
    help = f"download it first: `{download_command(ref)}`"
    if ref.explicit:
        return TvInputError(
            f"Hugging Face model {reason}", span, label=label, notes=tuple(notes), help=help, code="E300"
        )
    looked = " or ".join(str(c) for c in _local_candidates(base, path))
    return TvInputError(
        f"no such checkpoint: {path}",
        span,
        label=f"looked for {looked}",
        notes=(f"not a local path; as a Hugging Face model, {reason}", *notes),
        help=f"if it is a Hugging Face model, {help}; write hf://{ref.repo_id} to say so",
        code="E300",
    )
