"""The grammar's text and the limits on what the parser reads: what both the Lark parser
(:mod:`tvlang.syntax.lalr`) and the parse cache (:mod:`tvlang.syntax.cached`) depend on, kept
free of Lark so that a cached parse never imports it."""

from __future__ import annotations

from pathlib import Path

from tvlang.errors import TvSyntaxError
from tvlang.source import SourceText, Span

# Limits against hostile input: deep nesting would otherwise overflow the
# Python stack in later recursive passes.
MAX_SOURCE_CHARS = 1_000_000
MAX_NESTING = 200


def grammar_text() -> str:
    """The grammar: packaged inside the wheel, or read from the repository in a checkout.  Plain
    files are read directly (importlib.resources costs ~2 ms of imports at every start)."""
    package = Path(__file__).resolve().parents[1]
    for path in (package / "grammar" / "tvlang.lark", package.parent / "grammar" / "tvlang.lark"):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    from importlib import resources  # a package that is not plain files (a zip)

    return resources.files("tvlang").joinpath("grammar/tvlang.lark").read_text(encoding="utf-8")


def too_deep(source: SourceText) -> TvSyntaxError:
    """Chains of thousands of operators overflow the recursive passes: a clear error instead."""
    return TvSyntaxError(
        "expression is nested or chained too deeply",
        Span(source, 0, min(len(source.text), 1)),
        help="split it into named bindings (`part1 = ...`), or use a function such as linear(...)",
        code="E103",
    )


__all__ = ["MAX_NESTING", "MAX_SOURCE_CHARS", "grammar_text", "too_deep"]
