"""The parse cache: the AST of each text parsed before, as JSON, so that a repeated run never
imports Lark (with the ``regex`` module it pulls in and its tables, about 20 ms of a small
merge's 150 ms start).

Like Python's ``__pycache__`` for ``.tv`` files and expression strings:

- **What**: the AST (:mod:`tvlang.syntax.ast`) of every text that parsed without error, spans
  included, so every later message (checker, lowering) is the same from the cache as from Lark.
  Syntax errors are not cached: a text that does not parse goes through Lark each time.
- **Where**: ``$TVLANG_CACHE/parse/<key>.json`` (:func:`tvlang.cache.cache_root`, by default
  ``~/.cache/tvlang/parse``), written under a temporary name and renamed, so a concurrent run
  sees a whole entry or none.  A cache that cannot be written means no caching, nothing else.
- **Keyed by** the SHA-256 of the text, its name and base directory, the grammar, the source of
  the modules that turn text into an AST (``SOURCES``), Lark's ``__init__`` (its version) and
  ``FORMAT``: changing any of them makes new keys, and the old entries are never read again.
- **Size**: at most ``MAX_ENTRIES`` entries; past that, a miss removes the least recently used.
- **Clearing** it is deleting the directory; nothing else refers to its files.

Entries are data, never executed and never trusted blindly: an entry is rebuilt node by node
against the AST's own field types (:data:`NODES`, fields from :func:`dataclasses.fields`), and one
that is truncated, corrupt, of another text or of another shape is a miss, parsed again.  A
hand-edited entry that is well-formed could still make a program say something else, so the
cache directory is trusted like the kernels beside it (docs/safety.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from tvlang.cache import cache_root
from tvlang.source import SourceText, Span
from tvlang.syntax import ast
from tvlang.syntax.grammar import grammar_text

FORMAT = 1  # of the entries' JSON; part of the key
MAX_ENTRIES = 4096  # entries kept (about 1 KB each for a small program); see prune()

# The modules of this package whose source decides the AST of a text (the nodes, the limits,
# the Lark transform, this encoding, the front that calls them): their bytes are part of the key.
SOURCES = ("ast.py", "grammar.py", "lalr.py", "cached.py", "parser.py")

# Every node type the encoding knows, by name; tests check that it is every class of ast.py.
NODES: tuple[type, ...] = (
    ast.Number,
    ast.String,
    ast.Name,
    ast.Unary,
    ast.Binary,
    ast.Keyword,
    ast.Call,
    ast.Compare,
    ast.List,
    ast.Binding,
    ast.Param,
    ast.Output,
    ast.ExprStmt,
    ast.Define,
    ast.Vocab,
    ast.TokenRow,
    ast.Program,
)
_BY_NAME = {cls.__name__: cls for cls in NODES}


class Invalid(ValueError):
    """An entry (or an AST) that does not have the shape of the node types."""


def entry(source: SourceText) -> Path | None:
    """Where the AST of ``source`` is cached (whether or not it is there yet); None when the key
    cannot be worked out (this package's source is not readable as plain files)."""
    salt = _salt()
    if salt is None:
        return None
    digest = hashlib.sha256(salt)
    digest.update(json.dumps([source.text, source.name, source.base_dir]).encode())
    return cache_root() / "parse" / f"{digest.hexdigest()[:32]}.json"


def load(path: Path, source: SourceText) -> ast.Program | None:
    """The cached AST of ``source``, its spans in ``source``; None on a miss, whatever the reason
    (no entry, unreadable, corrupt, truncated, another text's, another shape's)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("text") != source.text:
            return None
        program = decode(data["ast"], source)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: pruned last
    return program


def store(path: Path, program: ast.Program) -> None:
    """Cache ``program`` at ``path`` (atomically); skipped when it cannot be, as a cache may be."""
    try:
        text = json.dumps(
            {"format": FORMAT, "text": program.source.text, "ast": encode(program)}, allow_nan=False
        )
    except (ValueError, TypeError, RecursionError):  # nothing that a later load could trust
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    except OSError:  # no writable cache: parse each time
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # atomic: concurrent processes see a whole file or none
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return
    prune(path.parent)


def prune(directory: Path) -> None:
    """Keep the cache bounded: texts are open-ended (a script may format a new expression for each
    of a thousand weights), so past ``MAX_ENTRIES`` files the least recently used are removed,
    down to three quarters of it.  Run on a miss only, where Lark's import dwarfs the listing."""
    try:
        with os.scandir(directory) as it:
            files = [(e.stat().st_mtime_ns, e.path) for e in it if e.is_file(follow_symlinks=False)]
    except OSError:
        return
    if len(files) <= MAX_ENTRIES:
        return
    files.sort()
    for _, old in files[: len(files) - MAX_ENTRIES * 3 // 4]:
        with contextlib.suppress(OSError):
            os.unlink(old)


def encode(program: ast.Program) -> Any:
    """``program`` as JSON data: a node is ``[type name, field, ...]`` in field order, a span
    ``[start, end]``, a tuple a list; the program's source is left out (it is the key)."""
    return _encode(program, ast.Program, program.source)


def decode(data: Any, source: SourceText) -> ast.Program:
    """The inverse of :func:`encode`, checking every value against its field's type; raises
    :class:`Invalid` (a ``ValueError``) on anything else."""
    program = _decode(data, ast.Program, source)
    if not isinstance(program, ast.Program):
        raise Invalid("not a program")
    return program


@cache
def _salt() -> bytes | None:
    """What every key of this process starts with: the format, the grammar, the sources of the
    modules in ``SOURCES`` and Lark's ``__init__`` (found without importing Lark)."""
    from importlib.util import find_spec

    digest = hashlib.sha256(f"tvlang-parse-{FORMAT}\0".encode())
    try:
        digest.update(grammar_text().encode())
        here = Path(__file__).parent
        spec = find_spec("lark")
        origin = None if spec is None else spec.origin
        if origin is None:
            return None
        for path in (*(here / name for name in SOURCES), Path(origin)):
            digest.update(b"\0" + path.read_bytes())
    except (OSError, ValueError, ImportError):
        return None
    return digest.digest()


@cache
def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    """(name, resolved type) of each field of a node type, in order."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))


def _encode(x: Any, hint: Any, source: SourceText) -> Any:
    if hint is SourceText:
        if x is not source:
            raise Invalid("a node of another source")
        return None
    if hint is Span:
        if not isinstance(x, Span) or x.source is not source:
            raise Invalid("a span of another source")
        return [x.start, x.end]
    if hint is str or hint is float:
        if type(x) is not hint:
            raise Invalid(f"{x!r} is not a {hint.__name__}")
        return x
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(x, tuple):
            raise Invalid(f"{x!r} is not a tuple")
        items = args[:1] * len(x) if args[1:] == (...,) else args
        if len(items) != len(x):
            raise Invalid(f"a tuple of {len(x)}, not {len(items)}")
        return [_encode(v, h, source) for v, h in zip(x, items, strict=True)]
    options = args if origin in (types.UnionType, typing.Union) else (hint,)
    if x is None and type(None) in options:
        return None
    cls: type = type(x)
    if cls not in options or cls not in NODES:
        raise Invalid(f"a {cls.__name__} where the AST has {hint}")
    return [cls.__name__, *(_encode(getattr(x, name), h, source) for name, h in _fields(cls))]


def _decode(v: Any, hint: Any, source: SourceText) -> Any:
    if hint is SourceText:
        if v is not None:
            raise Invalid("a source where none belongs")
        return source
    if hint is Span:
        if not (isinstance(v, list) and len(v) == 2 and all(type(i) is int for i in v)):
            raise Invalid(f"{v!r} is not a span")
        start, end = v
        if not 0 <= start <= end <= len(source.text):
            raise Invalid(f"span {v!r} is outside the text")
        return Span(source, start, end)
    if hint is str:
        if type(v) is not str:
            raise Invalid(f"{v!r} is not a string")
        return v
    if hint is float:
        if type(v) is not float or not math.isfinite(v):
            raise Invalid(f"{v!r} is not a finite float")
        return v
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(v, list):
            raise Invalid(f"{v!r} is not a list")
        items = args[:1] * len(v) if args[1:] == (...,) else args
        if len(items) != len(v):
            raise Invalid(f"a list of {len(v)}, not {len(items)}")
        return tuple(_decode(x, h, source) for x, h in zip(v, items, strict=True))
    options = args if origin in (types.UnionType, typing.Union) else (hint,)
    if v is None and type(None) in options:
        return None
    if not (isinstance(v, list) and v and isinstance(v[0], str)):
        raise Invalid(f"{v!r} is not a node")
    cls = _BY_NAME.get(v[0])
    if cls is None or cls not in options:
        raise Invalid(f"a {v[0]} where the AST has {hint}")
    fields = _fields(cls)
    if len(v) != 1 + len(fields):
        raise Invalid(f"a {v[0]} of {len(v) - 1} fields, not {len(fields)}")
    return cls(*(_decode(x, h, source) for x, (_, h) in zip(v[1:], fields, strict=True)))


__all__ = [
    "FORMAT",
    "MAX_ENTRIES",
    "NODES",
    "SOURCES",
    "Invalid",
    "decode",
    "encode",
    "entry",
    "load",
    "prune",
    "store",
]
