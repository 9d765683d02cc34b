"""Outputs never touch inputs: every file a run will create or replace is compared with every
file it reads, by what the paths *are* (symlinks and ``..`` resolved, hard links by inode), before
anything is opened for writing.

A writer replaces its whole target (a directory output is renamed into place, the old one
deleted) and creates hidden temporaries next to it, so an output overlaps an input when

- an input file resolves to the target or to anything below it;
- the target resolves to an input checkpoint directory or anything inside one (new files there
  would change what that checkpoint is: a second ``.safetensors`` with no index breaks it);
- a file at or below an existing target is the same inode as an input file (a hard link).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from tvlang.errors import TvOutputError
from tvlang.source import Span

__all__ = ["InputFiles", "refuse_overlap"]


@dataclass(frozen=True)
class InputFiles:
    """What one input reads: its files (shards, index, config copied along) and, for a
    checkpoint directory, the directory itself."""

    label: str
    files: Sequence[str]
    directory: str | None = None
    span: Span | None = None


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _existing_files(target: str) -> Iterator[str]:
    """The files a writer would replace at ``target``: the file itself, or everything below a
    directory (symlinks not followed: replacing a link does not touch what it points to)."""
    if os.path.isfile(target):
        yield target
    elif os.path.isdir(target):
        for root, _, files in os.walk(target):
            for name in files:
                yield os.path.join(root, name)


def refuse_overlap(target: str, inputs: Sequence[InputFiles]) -> None:
    """Raise E502 when writing ``target`` would create, replace or delete a file of an input."""
    real = os.path.realpath(target)
    resolved = "" if real == os.path.abspath(target) else f" (it resolves to {real})"
    inodes: dict[tuple[int, int], tuple[InputFiles, str]] = {}
    for inp in inputs:
        if inp.directory is not None and _inside(real, os.path.realpath(inp.directory)):
            where = "is" if real == os.path.realpath(inp.directory) else "is inside"
            _fail(target, inp, inp.directory, f"the output{resolved} {where} the input checkpoint directory")
        for file in inp.files:
            file_real = os.path.realpath(file)
            if _inside(file_real, real):
                how = "" if file_real == os.path.abspath(file) else f" (it resolves to {file_real})"
                _fail(target, inp, file, f"writing the output would replace the input file {file}{how}")
            inode = _inode(file)
            if inode is not None:
                inodes.setdefault(inode, (inp, file))
    for existing in _existing_files(target):
        hit = inodes.get(_inode(existing) or (-1, -1))
        if hit is not None:
            inp, file = hit
            _fail(target, inp, file, f"{existing} is the same file as the input {file} (a hard link)")


def _fail(target: str, inp: InputFiles, file: str, why: str) -> None:
    raise TvOutputError(
        f"refusing to write {target}: {why}",
        inp.span,
        label=f"`{inp.label}` reads {file}",
        help="choose an output path outside every input; an input is never overwritten, even with --force",
        code="E502",
    )
