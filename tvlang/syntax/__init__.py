"""Text → AST: the grammar (:mod:`.grammar`), the parse cache (:mod:`.cached`), Lark (:mod:`.lalr`)
behind one front, :func:`tvlang.syntax.parser.parse`."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Whether Lark may import the optional ``regex`` module when :mod:`.lalr` first imports Lark.  Lark
# imports it whenever it is installed (about 9 ms of the first run of a new program, measured) and
# uses it only for ``Lark(regex=True)`` and ``\p{...}`` classes, neither of which tvlang's grammar
# uses.  Without it Lark marks ``regex`` absent for the rest of the process, so only the ``tvlang``
# command (:func:`tvlang.cli.run`), whose process runs no other Lark, turns this off.
lark_imports_regex = True


@contextmanager
def lark_import() -> Iterator[None]:
    """The context :mod:`.lalr` imports Lark in: with ``regex`` hidden (any import of it raises
    ImportError) where :data:`lark_imports_regex` is off and nothing has imported it yet; as it is
    otherwise.  The module stays importable afterwards."""
    if lark_imports_regex or "regex" in sys.modules:
        yield
        return
    sys.modules["regex"] = None  # type: ignore[assignment]  # (the import system's "not found")
    try:
        yield
    finally:
        if "regex" in sys.modules and sys.modules["regex"] is None:
            del sys.modules["regex"]
