"""Source text and spans: where every error points.

A :class:`Span` is a half-open character range into one :class:`SourceText`;
line and column are computed on demand, so spans stay cheap to carry on
every AST and IR node.

>>> src = SourceText("a = b +\\n  c", "demo.tv")
>>> Span(src, 10, 11).line_col()
(2, 3)
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from functools import cached_property


@dataclass(frozen=True, eq=False)
class SourceText:
    """A piece of source text with a display name (a file path, ``<expr>``, ``--bind x``)."""

    text: str
    name: str = "<expr>"
    # Directory that relative ``load()`` paths are resolved against (None: the cwd).
    base_dir: str | None = field(default=None)

    @cached_property
    def _line_starts(self) -> list[int]:
        starts = [0]
        starts.extend(i + 1 for i, ch in enumerate(self.text) if ch == "\n")
        return starts

    def line_col(self, pos: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset."""
        line = bisect.bisect_right(self._line_starts, pos) - 1
        return line + 1, pos - self._line_starts[line] + 1

    def line_text(self, line: int) -> str:
        """The text of a 1-based line, without its newline."""
        start = self._line_starts[line - 1]
        end = self.text.find("\n", start)
        return self.text[start:] if end < 0 else self.text[start:end]


@dataclass(frozen=True)
class Span:
    """A half-open range ``[start, end)`` of characters in a source."""

    source: SourceText
    start: int
    end: int

    def line_col(self) -> tuple[int, int]:
        return self.source.line_col(self.start)

    @property
    def text(self) -> str:
        return self.source.text[self.start : self.end]

    def __repr__(self) -> str:
        line, col = self.line_col()
        return f"Span({self.source.name}:{line}:{col})"

    def render(self, label: str = "") -> str:
        """The source line(s) under a gutter, with carets under this span.

        Multi-line spans underline the first line to its end.
        """
        line, col = self.line_col()
        text = self.source.line_text(line)
        end_line, end_col = self.source.line_col(max(self.start, self.end - 1))
        width = (end_col - col + 1) if end_line == line else max(1, len(text) - col + 1)
        width = max(1, width)
        gutter = " " * len(str(line))
        caret = " " * (col - 1) + "^" * width
        lines = [
            f"{gutter}--> {self.source.name}:{line}:{col}",
            f"{gutter} |",
            f"{line} | {text}",
            f"{gutter} | {caret}" + (f" {label}" if label else ""),
        ]
        return "\n".join(lines)
