"""``python -m examples.paper``: train (or load) the models, run the three experiments,
print the tables, write ``addition.png``, ``lambda.png`` and ``RESULTS.md``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable

import torch

from examples.paper.experiments import Config, Results, run
from examples.paper.report import plot, plot_lambda, results_md
from examples.paper.train import TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def produce(cfg: Config, out: str, cache: str, command: str,
            log: Callable[[str], None] = lambda _: None) -> Results:  # fmt: skip
    """Run everything and write ``<out>/addition.png``, ``<out>/lambda.png`` and ``<out>/RESULTS.md``."""
    torch.set_num_threads(1)  # small model, shared machine: one thread is as fast and disturbs less
    start = time.perf_counter()
    res = run(cfg, cache, log)
    os.makedirs(out, exist_ok=True)
    plot(res, os.path.join(out, "addition.png"))
    plot_lambda(res, os.path.join(out, "lambda.png"))
    with open(os.path.join(out, "RESULTS.md"), "w", encoding="utf-8") as f:
        f.write(results_md(res, command, time.perf_counter() - start, "addition.png"))
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.paper", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="reduced run: 4 tasks, far fewer training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=HERE, help="where addition.png and RESULTS.md go (default: %(default)s)"
    )
    parser.add_argument("--cache", default=os.path.join(HERE, ".cache"),
                        help="checkpoint cache (default: %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    cfg = Config.quick(args.seed) if args.quick else Config(TrainConfig(seed=args.seed))
    command = shlex.join(["python", "-m", "examples.paper", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    produce(cfg, args.out, args.cache, command, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    with open(os.path.join(args.out, "RESULTS.md"), encoding="utf-8") as f:
        print(f.read().split("\n## The tvlang programs")[0])
    print(
        f"wrote {os.path.join(args.out, 'addition.png')}, lambda.png and RESULTS.md ({time.perf_counter() - start:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
