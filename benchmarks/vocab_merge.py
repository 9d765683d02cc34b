"""Rows matched by token: a ``vocab union`` merge against the same merge by index, same run.

Two Llama-shaped bf16 models of the same size (vocabulary 32,000) share 30,000 tokens, and each
has 2,000 tokens the other lacks.  ``--order extended``: the second model has the shared tokens at
the same ids (a vocabulary extended with new tokens: each model's rows are a few long runs);
``--order shuffled``: in a shuffled order (the worst case for the row gather: every row its own
run, read with one ``pread`` each).  Two programs, each in a fresh process::

    python benchmarks/vocab_merge.py --hidden 1024 --layers 4 --repeat 3 --order extended

- ``by index``: ``a + 0.5*(b - a)``, rows paired by index (what a merge without ``vocab`` does);
- ``by token``: ``vocab union, base=a`` then the same expression: 34,000 output rows, each model's
  embedding and head gathered row by row from its memory map.

Printed: wall time and peak RSS (ru_maxrss) of each, and their ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
import tvlang
prog = tvlang.compile_file(sys.argv[1])
prog.run(sys.argv[2], options=tvlang.Options(overwrite=True, threads=1))
print(json.dumps({"wall": time.perf_counter() - t0, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def setup(root: str, hidden: int, layers: int, order: str) -> None:
    from tvlang.synth import llama_spec, write_family, write_tokenizer

    spec = llama_spec(hidden, layers, vocab=32000)
    paths = write_family(root, ["a", "b"], spec)
    shared = [f"t{i}" for i in range(30000)]
    write_tokenizer(paths["a"], ["<unk>", *shared[1:], *(f"a{i}" for i in range(2000))])
    mixed = shared[1:] + [f"b{i}" for i in range(2000)]
    if order == "shuffled":
        random.Random(0).shuffle(mixed)
    write_tokenizer(paths["b"], ["<unk>", *mixed])
    for name, body in (
        ("index", "output o = a + 0.5*(b - a)\n"),
        ("token", "vocab union, base=a\noutput o = a + 0.5*(b - a)\n"),
    ):
        with open(os.path.join(root, name + ".tv"), "w") as f:
            f.write(f'a = load("{paths["a"]}")\nb = load("{paths["b"]}")\n' + body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--order", choices=("extended", "shuffled"), default="extended")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tvlang-vocab-bench-") as root:
        setup(root, args.hidden, args.layers, args.order)
        results: dict[str, list[dict[str, float]]] = {"index": [], "token": []}
        for _ in range(args.repeat):
            for name in results:  # interleaved, so both see the same machine load
                out = os.path.join(root, "out_" + name)
                r = subprocess.run(
                    [sys.executable, "-c", CHILD, os.path.join(root, name + ".tv"), out],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
        size = sum(os.path.getsize(os.path.join(root, "a", f)) for f in os.listdir(os.path.join(root, "a")))
        print(f"model size {size / 1e9:.2f} GB, order {args.order}, {args.repeat} runs each, median:")
        med = {
            n: {k: statistics.median(r[k] for r in rs) for k in ("wall", "rss")} for n, rs in results.items()
        }
        for n, m in med.items():
            print(f"  by {n:<5}  wall {m['wall']:.2f} s  peak RSS {m['rss'] / 1024:.0f} MiB")
        print(
            f"  by token / by index: wall {med['token']['wall'] / med['index']['wall']:.2f}x, "
            f"peak RSS {med['token']['rss'] / med['index']['rss']:.2f}x"
        )


if __name__ == "__main__":
    main()
