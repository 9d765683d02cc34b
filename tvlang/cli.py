"""The ``tvlang`` command: a thin shell over :mod:`tvlang.api`.

Exit codes: 0 success, 1 a user error (printed as a positioned report, no
traceback), 2 an internal error (a bug: the traceback is printed), 130
interrupted (Ctrl-C), 143 terminated (SIGTERM).  An interrupted or failed run leaves no output behind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from tvlang import syntax
from tvlang.errors import TvError, TvOutputError, TvParamError
from tvlang.options import SETTINGS, Options, help_text, parse_text
from tvlang.passes import STAGES
from tvlang.source import SourceText, Span

# The API (and torch behind it) is imported when a command needs it, not when the command
# starts: `tvlang --help` answers at once, and Ctrl-C or SIGTERM during the imports is a
# clean exit instead of a traceback.
if TYPE_CHECKING:
    from tvlang.api import Program
    from tvlang.job import PreparedJob
    from tvlang.lowering.lower import Binding


def _pairs(items: Sequence[str] | None, flag: str) -> list[tuple[str, str]]:
    pairs = []
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise TvParamError(f"{flag} {item!r}: expected NAME=VALUE", code="E402")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _params(args: argparse.Namespace) -> dict[str, float | list[float]]:
    """``--set lam=0.4``; a sweep: ``--set lam=0.2,0.4,0.6`` or ``--set lam=0:1:0.25`` (stop included)."""
    from tvlang.lowering.lower import MAX_OUTPUTS

    params: dict[str, float | list[float]] = {}
    for name, value in _pairs(args.set, "--set"):
        src = SourceText(f"{name}={value}", "--set")
        where = Span(src, len(name) + 1, len(src.text))

        def bad(
            message: str, help: str | None = None, *, name: str = name, where: Span = where
        ) -> TvParamError:
            return TvParamError(message, where, label=f"the value of `{name}`", help=help, code="E402")

        try:
            numbers = [float(v) for v in value.replace(":", ",").split(",")]
        except ValueError:
            raise bad(f"`{value}` is not a number, a list `a,b,c` or a range `start:stop:step`") from None
        if not all(math.isfinite(v) for v in numbers):
            raise bad(f"`{value}` is not a finite number")
        if ":" not in value:
            params[name] = numbers if "," in value else numbers[0]
            continue
        if len(numbers) != 3 or "," in value:
            raise bad(f"`{value}` is not a range `start:stop:step`", "e.g. 0:1:0.25 is 0, 0.25, 0.5, 0.75, 1")
        start, stop, step = numbers
        if step <= 0:
            raise bad(f"the step of the range `{value}` is {step:g}; it must be positive")
        if stop < start:
            raise bad(f"the range `{value}` stops ({stop:g}) below its start ({start:g})")
        steps = (stop - start) / step
        count = int(steps + 1e-9 * max(1.0, steps)) + 1  # the stop is included despite rounding
        if count > MAX_OUTPUTS:
            raise bad(f"the range `{value}` has {count:,} values; a run writes at most {MAX_OUTPUTS}")
        params[name] = [round(start + i * step, 12) for i in range(count)]
    return params


def _bindings(args: argparse.Namespace) -> dict[str, Binding]:
    from tvlang.api import delta, task_vector
    from tvlang.lowering.lower import Binding

    bindings: dict[str, Binding] = {}
    base = getattr(args, "base", "base")
    for flag, role in (("bind", "model"), ("task", "task"), ("delta", "delta")):
        for name, value in _pairs(getattr(args, flag, None), f"--{flag}"):
            if name in bindings:
                raise TvParamError(f"`{name}` is bound twice on the command line", code="E402")
            if role == "task":
                bindings[name] = task_vector(value, base=base)
            elif role == "delta":
                bindings[name] = delta(value)
            else:
                bindings[name] = Binding(value, "model")
    return bindings


def _given_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~tvlang.options.Options` fields whose flags were given (sizes parsed), and
    ``progress`` unless ``-q``."""
    given = {name: getattr(args, name, None) for name in SETTINGS if name != "progress"}
    options = {k: parse_text(k, v) for k, v in given.items() if v is not None and v is not False}
    return {**options, "progress": not getattr(args, "quiet", False)}


def _options(args: argparse.Namespace) -> Options:
    return Options(**_given_options(args))


def _program(args: argparse.Namespace) -> Program:
    from tvlang.api import compile, compile_file

    if getattr(args, "expr", None) is not None:
        return compile(args.expr, bindings=_bindings(args))
    if getattr(args, "file", None) is None:
        raise TvParamError("give a program file or -e EXPRESSION", code="E402")
    return compile_file(args.file, bindings=_bindings(args))


def _target(args: argparse.Namespace) -> PreparedJob:
    """What every command that takes a program acts on, whichever form it came in: a ``.tv``
    file, an expression, a job file or a mergekit config (YAML/JSON).  A job's fields are
    overridden by the flags given."""
    from tvlang.api import declare_params
    from tvlang.job import JOB_SUFFIXES, PreparedJob

    file = getattr(args, "file", None)
    if file is None or not file.lower().endswith(JOB_SUFFIXES):
        params = _params(args)
        program = _program(args)
        if getattr(args, "expr", None) is not None:  # an expression declares what --set gives
            program = declare_params(program, params, "--set")
        return PreparedJob(None, program, params, {}, _options(args), getattr(args, "output", None))
    from tvlang.config import load_job, prepare_job  # job files only: YAML, mergekit configs

    return prepare_job(
        load_job(file),
        output=getattr(args, "output", None),
        params=_params(args),
        bindings=_bindings(args),
        **_given_options(args),
    )


def _cmd_run(args: argparse.Namespace) -> int:
    target = _target(args)
    if target.output is None:
        if target.job is None:
            args.parser.error("the following arguments are required: -o/--output")
        raise TvParamError(f"{args.file} has no `output:`", help="add one, or give -o PATH", code="E406")
    result = target.run()
    if not args.quiet:
        written = result.values() if isinstance(result, dict) else [result]
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    plan = _target(args).plan()
    outs = ", ".join(f"{o.name} ({o.kind}, {len(o.tensors)} tensors)" for o in plan.outputs)
    print(f"ok: {len(plan.inputs)} input(s), output(s): {outs}; headers only, no tensor data read")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    target = _target(args)
    stage = "triton" if getattr(args, "triton", False) else getattr(args, "stage", None)
    if stage is not None:
        if stage == "source" and target.job is not None and target.job.translated is not None:
            print(target.job.translated.rstrip())
            return 0
        print(target.explain(all_tensors=args.all, stage=stage))
        return 0
    if target.job is not None and target.job.translated is not None:
        print(f"# program (translated from {target.job.name})\n{target.job.translated.rstrip()}\n")
    print(target.explain(all_tensors=args.all))
    return 0


def _cmd_import_mergekit(args: argparse.Namespace) -> int:
    """``tvlang import-mergekit merge.yml [-o merge.tv]``: the equivalent tvlang program."""
    from tvlang.mergekit import load_config

    out = args.output
    translation = load_config(args.file, out_dir=os.path.dirname(os.path.abspath(out)) if out else None)
    for line in translation.warnings:
        print(line, file=sys.stderr)
    if out is None:
        sys.stdout.write(translation.program)
    else:
        if os.path.abspath(out) == os.path.abspath(args.file):
            raise TvOutputError(f"refusing to write {out}: it is the config being imported", code="E502")
        if os.path.exists(out) and not args.force:
            raise TvOutputError(f"{out} exists", help="use --force to replace it", code="E500")
        with open(out, "w", encoding="utf-8") as fh:
            fh.write(translation.program)
        print(f"wrote {out}", file=sys.stderr)
    if translation.dtype is not None:
        sys.stdout.flush()
        print(f"note: mergekit's output dtype: run it with --dtype {translation.dtype}", file=sys.stderr)
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    """``tvlang tune prog.tv --param lam=0:1 --score mod:fn -o best/``: search, then write the best
    merge, its trials (``<out>.trials.json``, ``.csv``) and their plot (``<out>.png``) beside it."""
    from tvlang.tuning import Range, load_score, load_template, parse_dimension, tune

    if args.output is None:
        args.parser.error("the following arguments are required: -o/--output")

    space = {name: parse_dimension(name, value) for name, value in _pairs(args.param, "--param")}
    if not space:
        raise TvParamError("give at least one --param NAME=LOW:HIGH to search", code="E420")
    options = _options(args)
    stem = args.output.rstrip("/\\").removesuffix(".safetensors")
    beside = [stem + ".trials.json", stem + ".trials.csv", stem + ".png"]
    if not args.overwrite:
        for path in [args.output, *([] if args.resume else beside)]:
            if os.path.exists(path):
                raise TvOutputError(f"{path} exists", help="use --force to replace it", code="E500")
    elif not args.resume and os.path.exists(beside[0]):
        os.remove(beside[0])
    program = _program(args)
    fixed = _params(args)  # --set: the same value in every trial
    first = fixed | {k: d.low if isinstance(d, Range) else d[0] for k, d in space.items()}
    plan = program.plan(first, options=options)
    if len(plan.outputs) != 1:
        raise TvParamError("tvlang tune searches a program with one output", code="E405")
    template = plan.inputs[plan.outputs[0].template].location
    score = load_score(args.score, limit=args.limit, tokenizer=template)
    if not args.quiet:
        print(f"loading the template model from {template}", file=sys.stderr)
    model = load_template(template, args.dtype)
    trial_options = dataclasses.replace(options, dtype=None, progress=False)  # the model's dtypes decide
    result = tune(
        program,
        space,
        score,
        params=fixed,  # a --set sweep is refused by into= (E405)
        into=model,
        trials=args.trials,
        sampler=args.sampler,
        seed=args.seed,
        options=trial_options,
        study=args.study or beside[0],
        progress=not args.quiet,
        keep_best=False,
    )
    result.save(beside[0])
    result.to_csv(beside[1])
    if result.interrupted:
        print(f"interrupted after {len(result.trials)} trials: they are in {beside[0]} (--resume continues)",
              file=sys.stderr)  # fmt: skip
        return 130
    best = result.best
    program.run(args.output, {**fixed, **best.params}, options=options)  # the template's dtypes, or --dtype
    try:
        result.plot(beside[2], title=f"{args.score}: {len(result.trials)} trials ({args.sampler})")
    except ImportError:
        beside[2] = "(no plot: matplotlib is not installed)"
    params = ", ".join(f"{k}={v:.6g}" for k, v in best.params.items())
    print(f"best score {best.score:.6g} at {params}")
    if not args.quiet:
        print(f"wrote {args.output}, {beside[0]}, {beside[1]}, {beside[2]}", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tvlang.demo import run_demo

    return run_demo(args.dir, quiet=args.quiet)


def _common(p: argparse.ArgumentParser, *, program: bool = True, running: bool = False) -> None:
    if program:
        p.add_argument("--set", action="append", metavar="NAME=VALUE", help="override a `param` (repeatable)")
        p.add_argument("--bind", action="append", metavar="NAME=PATH", help="bind a name to a checkpoint")
        p.add_argument(
            "--task",
            action="append",
            metavar="NAME=PATH",
            help="bind a name to a task vector: the checkpoint at PATH minus the base model",
        )
        p.add_argument("--delta", action="append", metavar="NAME=PATH", help="bind a stored task vector")
        p.add_argument(
            "--base", default="base", help="the binding --task vectors are relative to (default: base)"
        )
    for name in _OPTION_FLAGS:
        _add_option(p, name)
    if running:
        p.add_argument(
            "-o", "--output", help="output .safetensors file or directory (a job file may give it as output:)"
        )
        p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
        for name in _RUN_OPTION_FLAGS:
            _add_option(p, name)


# The Options fields every command that takes a program sets by flag, and those only a run sets.
_OPTION_FLAGS = ("dtype", "memory", "threads", "chunk", "kernels", "rows", "keys", "shard_size", "device")
_RUN_OPTION_FLAGS = (
    "executor", "address", "overwrite", "nonfinite", "as_lora", "lora_base", "lora_svd", "chat_template",
)  # fmt: skip
_METAVARS = {
    "as_lora": "RANK", "lora_base": "NAME", "threads": "N", "memory": "SIZE", "shard_size": "SIZE",
    "chat_template": "TEMPLATE",
}  # fmt: skip


def _add_option(p: argparse.ArgumentParser, name: str) -> None:
    """The flag of an Options field, its help, choices and type taken from the field's setting."""
    setting = SETTINGS[name]
    assert setting.flag is not None, name
    kwargs: dict[str, Any] = {"dest": name, "help": argparse.SUPPRESS if name == "chunk" else help_text(name)}
    if setting.kind == "flag":
        kwargs["action"] = "store_true"
    elif setting.kind == "count":
        kwargs["type"] = int
    elif setting.kind == "choice":
        kwargs["choices"] = setting.choices
    if name in _METAVARS:
        kwargs["metavar"] = _METAVARS[name]
    p.add_argument(setting.flag, **kwargs)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line.  ``command``: only that subcommand gets its option flags (the others keep
    their arguments and help line); :func:`main` builds this, as the flags of all of them take
    ~4 ms, a tenth of a merge's own start-up."""

    def common(p: argparse.ArgumentParser, name: str, *, running: bool = False) -> None:
        if command is None or command == name:
            _common(p, running=running)

    parser = argparse.ArgumentParser(
        prog="tvlang", description="Model-weight arithmetic: check, plan and run merges."
    )
    parser.add_argument("--version", action="version", version=f"tvlang {__import__('tvlang').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run a .tv program, a job file (.yaml, .yml, .json) or a mergekit config"
    )
    run.add_argument("file", help="the .tv program, or a job file whose fields the flags override")
    common(run, "run", running=True)
    run.set_defaults(func=_cmd_run, parser=run)

    ev = sub.add_parser("eval", help="evaluate an expression over bound checkpoints")
    ev.add_argument("expr", help='the expression, e.g. "base + 0.4*(ft - base)"')
    common(ev, "eval", running=True)
    ev.set_defaults(func=_cmd_run, parser=ev)

    for name, helptext, func in (
        ("check", "check a program against checkpoint headers (reads no tensor data)", _cmd_check),
        ("plan", "show the IR before and after the passes, and the per-tensor plan", _cmd_plan),
        ("explain", "the same as plan", _cmd_plan),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("file", nargs="?", help="the .tv program")
        p.add_argument("-e", "--expr", help="an expression instead of a file")
        if func is _cmd_plan:
            p.add_argument("--all", action="store_true", help="list every tensor, not the first dozen")
            p.add_argument(
                "--stage",
                choices=STAGES,
                help="print one stage alone: the program's source, the IR as written, the IR after each "
                "pass, the plan, or the generated kernels (c: the compiled CPU backend's, triton: the GPU's)",
            )
            p.add_argument("--triton", action="store_true", help="the same as --stage triton")
        common(p, name)
        p.set_defaults(func=func)

    imp = sub.add_parser("import-mergekit", help="translate a mergekit config (YAML) into a .tv program")
    imp.add_argument("file", help="the mergekit config (also runnable as it is: tvlang run merge.yml -o OUT)")
    imp.add_argument("-o", "--output", help="write the program here (default: print it; paths are absolute)")
    imp.add_argument("--force", action="store_true", help="replace an existing output file")
    imp.set_defaults(func=_cmd_import_mergekit)

    tn = sub.add_parser(
        "tune", help="choose parameters by merging into a model in memory and scoring it (see docs/tune.md)"
    )
    tn.add_argument("file", help="the .tv program (one output)")
    tn.add_argument("--param", action="append", metavar="NAME=RANGE",
                    help="a parameter to search: LOW:HIGH, log:LOW:HIGH or A,B,C (repeatable)")  # fmt: skip
    tn.add_argument("--score", required=True,
                    help="MODULE:FUNCTION (score(model) -> float, higher is better) or lm-eval:TASK[,TASK...]")  # fmt: skip
    tn.add_argument("--limit", type=int, help="lm-eval: examples per task")
    tn.add_argument("--trials", type=int, help="how many (default: the whole grid; 20 for a sampler)")
    tn.add_argument("--sampler", choices=("grid", "random", "tpe", "cmaes"), default="grid")
    tn.add_argument("--seed", type=int, default=0)
    tn.add_argument("--study", help="the trials file to write and resume (default: OUTPUT.trials.json; "
                    "or an Optuna storage such as sqlite:///study.db)")  # fmt: skip
    tn.add_argument("--resume", action="store_true", help="continue the trials already in the study")
    common(tn, "tune", running=True)
    tn.set_defaults(func=_cmd_tune, parser=tn)

    demo = sub.add_parser(
        "demo",
        help="run the mission's example on small checkpoints it makes itself (--dir keeps them, to play with)",
    )
    demo.add_argument(
        "--dir", help="keep the generated checkpoints and output here (default: a temporary directory)"
    )
    demo.add_argument("-q", "--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, systemd, Slurm, Kubernetes): handled as Ctrl-C is, so the run aborts and
    removes what it had written; the exit status is then 143 (128 + SIGTERM), not 130."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


@contextlib.contextmanager
def _sigterm_aborts() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named: the first argument that is not a flag (``tvlang`` itself takes no
    flag with a value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        with _sigterm_aborts():
            args = build_parser(_command(sys.argv[1:] if argv is None else argv)).parse_args(argv)
            code: int = args.func(args)
            return code
    except TvError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:
        print("\ninterrupted: no output was written", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130
    except Exception:
        import traceback

        print("internal error (this is a bug in tvlang; please report it):", file=sys.stderr)
        traceback.print_exc()
        return 2


def run() -> NoReturn:
    """The command's entry point: :func:`main`, then exit without the interpreter's teardown.

    By then every output is committed and closed; what teardown would do is unload torch's
    operator libraries one by one (measured: 0.3 s of a 1 GB merge's 2.5 s).

    numpy's OpenBLAS is given one thread unless the environment says otherwise: at load it starts
    a thread per CPU that spins for ~0.1 s of CPU time, which on a busy machine delays the
    start by a third (measured 214 → 161 ms to the first read, the other core busy); and the
    runtime parallelises over chunks itself, as it runs torch on one intra-op thread.

    Lark, when a new program needs it, is imported without the optional ``regex`` module, which
    nothing in this process uses (:data:`tvlang.syntax.lark_imports_regex`)."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    syntax.lark_imports_regex = False
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
