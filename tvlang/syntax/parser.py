"""Text → AST: from the parse cache when this text was parsed before, else through the Lark
grammar in ``grammar/tvlang.lark`` (:mod:`tvlang.syntax.lalr`), whose result is then cached.

A repeated run (the same program, the same expression) rebuilds its AST from the cache's JSON
and never imports Lark, about 20 ms of a small merge's start-up (docs/performance.md).

>>> prog = parse("out = base + 0.4*(ft - base)")
>>> type(prog.statements[0]).__name__, prog.statements[0].value.op
('Binding', '+')
"""

from __future__ import annotations

import os

from tvlang.errors import TvSyntaxError
from tvlang.source import SourceText, Span
from tvlang.syntax import ast, cached
from tvlang.syntax.grammar import MAX_NESTING, MAX_SOURCE_CHARS, grammar_text, too_deep


def parse(text: str, name: str = "<expr>", base_dir: str | os.PathLike[str] | None = None) -> ast.Program:
    """Parse tvlang text (a ``.tv`` program or a bare expression) into an AST."""
    source = SourceText(text, name, None if base_dir is None else os.fspath(base_dir))
    if len(text) > MAX_SOURCE_CHARS:
        raise TvSyntaxError(
            f"source is {len(text)} characters; the limit is {MAX_SOURCE_CHARS}",
            Span(source, 0, 0),
            code="E103",
        )
    entry = cached.entry(source)
    program = None if entry is None else cached.load(entry, source)
    if program is not None:
        return program
    from tvlang.syntax import lalr  # imports Lark: only when the cache cannot answer

    program = lalr.parse(source)  # a syntax error is raised here, and never cached
    if entry is not None:
        cached.store(entry, program)
    return program


__all__ = ["MAX_NESTING", "MAX_SOURCE_CHARS", "grammar_text", "parse", "too_deep"]
