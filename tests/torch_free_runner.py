"""Run ``tvlang.cli.main(argv)`` and report whether torch was imported (tests/test_torch_free.py).

Prints one JSON line: the exit code and ``"torch" in sys.modules`` at the end of the process.
"""

from __future__ import annotations

import json
import sys

from tvlang.cli import main

if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
