"""What a program's ``vocab`` and ``token`` statements ask for, as lowered: plain data that the
I/O layer's row matching (:mod:`tvlang.io.vocab`) carries out."""

from __future__ import annotations

from dataclasses import dataclass

from tvlang.ir.node import InputRef
from tvlang.source import Span


@dataclass(frozen=True)
class TokenRule:
    """``token "t" = model[index], force``: where token ``t``'s rows come from."""

    token: str
    model: InputRef | None  # None: zero rows
    index: str | int | None  # another token of `model` (its string or its row id); None: `token` itself
    force: bool  # also for models that have the token
    span: Span | None = None


@dataclass(frozen=True)
class VocabSpec:
    """What a ``vocab`` statement (and its ``token`` statements) asks for."""

    source: InputRef | None  # the model whose tokenizer the output takes; None: the union
    base: InputRef | None  # the model whose row a token missing from another model takes first
    pad_to: int | None
    tokens: tuple[TokenRule, ...] = ()
    span: Span | None = None

    @property
    def describe(self) -> str:
        what = "union" if self.source is None else f"the vocabulary of `{self.source.label}`"
        return what + (f", base `{self.base.label}`" if self.base is not None else "")


__all__ = ["TokenRule", "VocabSpec"]
