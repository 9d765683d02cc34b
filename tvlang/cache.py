"""Where tvlang keeps what it derives once and reuses across runs: ``$TVLANG_CACHE``, else
``$XDG_CACHE_HOME/tvlang`` (``~/.cache/tvlang``).  Compiled kernels live in ``kernels/``, the
grammar's parse tables in ``grammar/``, the ASTs of texts parsed before in ``parse/``
(:mod:`tvlang.syntax.cached`); each entry is named by a hash of what it is made from, so deleting
the directory, or any part of it, only costs the time to make its entries again."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("TVLANG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tvlang"
    )
    return Path(root)


__all__ = ["cache_root"]
