"""Job files: a merge written down as plain data, so it can live in a YAML/JSON file or a Hydra config.

A job says what to compute, from which checkpoints, where to write it and how.  Run one with
``tvlang run job.yaml`` or :func:`run_job`; from an OmegaConf/Hydra config, pass the node
(``run_job(cfg.merge)``) so that interpolations such as ``${lam}`` are resolved first and a Hydra
multirun can sweep ``merge.params.lam``.  The schema (see ``docs/config.md``)::

    program: merge.tv            # a .tv file, relative to the job file ...
    expression: base + lam*tau   # ... or the text itself (exactly one of the two)
    bindings:                    # names the program uses, bound by the caller
      base: ckpt/base            #   a path: a model
      tau: {path: ckpt/ft, role: task, base: base}   # role: model | task | delta
    params: {lam: 0.4}           # numbers: `param` overrides, or number bindings in an expression
    output: merged/              # a path, or {output name: path}; absent: the CLI needs -o
    dtype: bf16                  # bf16 | fp16 | fp32 | fp64 (default: as the inputs)
    device: cpu                  # cpu | cuda (generated Triton kernels, docs/gpu.md) | auto
    memory: 512M                 # bytes, or a size with a binary unit
    threads: 4
    shard_size: 5G
    overwrite: false
    nonfinite: error             # error | warn | propagate
    keys: exact                  # exact | intersection | union: inputs holding different tensor names
    rows: exact                  # exact | common: tensors differing only in rows (resized vocabularies)
    kernels: auto                # auto | compiled | eager: CPU kernels (compiled C loops or torch)
    roots: [ckpt]                # if set, inputs may only be read below these directories
    executor: local              # local | ray: where the tasks run (docs/distributed.md)
    address: auto                # with executor: ray, the cluster (absent: $RAY_ADDRESS, else local)

Relative paths resolve against the job file's directory (``base_dir`` for a mapping), so a job
runs the same from any working directory.  Every mistake is a :class:`TvParamError` (``E406``)
naming the field (``bindings.tau.role``) and, for a file, pointing at it.  YAML is read with
PyYAML's ``SafeLoader`` only: tags that construct Python objects are refused.

>>> job = job_from_mapping({"expression": "a + 0.5*(b - a)", "bindings": {"a": "/m/a", "b": "/m/b"}})
>>> sorted(job.bindings), job.output
(['a', 'b'], None)
>>> job_from_mapping({"expresion": "a"})
Traceback (most recent call last):
  ...
tvlang.errors.TvParamError: error[E406]: unknown field `expresion`
  = note: in <job>
  = help: did you mean `expression`?
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from tvlang.api import Options, OutSpec, Program, compile_file, declare_params, parse_size
from tvlang.backends.compiled import KERNEL_MODES
from tvlang.errors import TvError, TvInputError, TvParamError
from tvlang.executors import EXECUTORS
from tvlang.io.lora_out import SVD_METHODS
from tvlang.lower import Bound, ParamValue
from tvlang.plan import Plan, parse_dtype
from tvlang.plan.planner import KEY_POLICIES
from tvlang.source import Source, Span
from tvlang.syntax.parser import parse

JOB_SUFFIXES = (".yaml", ".yml", ".json")
DEVICES = ("cpu", "cuda", "auto")  # "auto": the GPU when CUDA and Triton are there, else the CPU
ROLES = ("model", "task", "delta")
NONFINITE = ("error", "warn", "propagate")
MAX_JOB_CHARS = 1 << 20  # a job is a few lines; refuse anything that could not be one

FieldPath = tuple[str | int, ...]
_Marks = dict[FieldPath, tuple[int, int, int, int]]  # key start, key end, value start, value end
_MARK_DEPTH = 3  # bindings.NAME.FIELD is the deepest field in the schema
_MAX_MARKS = 1 << 16  # a job is a few lines; stop recording positions (only errors use them) beyond this


@dataclass(frozen=True)
class Job:
    """A validated job.  Paths are absolute; ``where`` maps dotted field paths to their place in
    the job file, so errors found only when running (a missing checkpoint) still point there."""

    program: str | None
    expression: str | None
    bindings: Mapping[str, Bound]
    params: Mapping[str, ParamValue]
    output: str | Mapping[str, str] | None
    options: Options
    device: str = "cpu"
    name: str = "<job>"
    base_dir: str = "."
    where: Mapping[str, Span] = field(default_factory=dict, compare=False, repr=False)
    translated: str | None = None  # the whole .tv program, when the job is a translated mergekit config
    mergekit_config: str | None = None  # the config's text when the job is a mergekit config (its model card)

    def compile(self) -> Program:
        """The program with the job's bindings.  An expression has no ``param`` lines, so each job
        parameter it does not declare is declared ahead of it: then ``--set`` and sweeps work as for
        a ``.tv`` file, a misspelt ``--set`` name is an error, and the values are recorded in the
        output's metadata.  ``load()`` paths in an expression are relative to the job."""
        if self.program is not None:
            return compile_file(self.program, bindings=self.bindings)
        assert self.expression is not None
        syntax = parse(self.expression, f"{self.name} (expression)", self.base_dir)
        program = declare_params(Program(syntax, self.bindings), self.params, self.name)
        program.mergekit_config = self.mergekit_config
        return program


def _dotted(path: FieldPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def _what(value: Any) -> str:
    """How a wrong value is named in an error: its YAML type and, for a scalar, the value."""
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(value), "a value"
    )
    text = repr(value)
    return f"{kind} ({text[:60] + '…' if len(text) > 60 else text})"


def _did_you_mean(word: str, choices: tuple[str, ...], what: str) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean `{close[0]}`?" if close else f"{what}: " + ", ".join(choices)


class _Fields:
    """Validates fields and raises errors that name them and, where the text is known, point at them."""

    def __init__(
        self, name: str, base_dir: str, source: Source | None = None, marks: _Marks | None = None
    ) -> None:
        self.name = name
        self.base_dir = base_dir
        self.source = source
        self.marks = marks or {}

    def span(self, path: FieldPath, *, key: bool = False) -> Span | None:
        mark = self.marks.get(tuple(p if isinstance(p, int) else str(p) for p in path))
        if self.source is None or mark is None:
            return None
        start, end = (mark[0], mark[1]) if key else (mark[2], mark[3])
        return Span(self.source, start, max(end, start + 1))

    def fail(
        self, path: FieldPath, message: str, *, key: bool = False, help: str | None = None, label: str = ""
    ) -> NoReturn:
        span = self.span(path, key=key)
        notes = () if span is not None else (f"in {self.name}",)
        raise TvParamError(message, span, label=label, help=help, notes=notes, code="E406")

    def wrong(self, path: FieldPath, value: Any, expected: str, help: str | None = None) -> NoReturn:
        self.fail(path, f"`{_dotted(path)}` must be {expected}, not {_what(value)}", help=help)

    def expect(self, path: FieldPath, value: Any, ok: bool, expected: str, help: str | None = None) -> None:
        if not ok:
            self.wrong(path, value, expected, help)

    def keys(self, path: FieldPath, data: Mapping[Any, Any], allowed: tuple[str, ...]) -> None:
        for k in data:
            if not isinstance(k, str):
                self.fail((*path, str(k)), f"field names must be strings, not {_what(k)}", key=True)
            if k not in allowed:
                where = f"`{_dotted((*path, k))}`" if path else f"`{k}`"
                self.fail(
                    (*path, k), f"unknown field {where}", key=True, help=_did_you_mean(k, allowed, "fields")
                )

    def mapping(self, path: FieldPath, value: Any) -> Mapping[Any, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.wrong(path, value, "a mapping")
        return value

    def name_key(self, path: FieldPath, name: Any) -> str:
        if not (isinstance(name, str) and name.isidentifier()):
            self.fail(path, f"`{name}` is not a valid name", key=True, help="names are letters, digits and _")
        return name

    def string(self, path: FieldPath, value: Any) -> str:
        self.expect(path, value, isinstance(value, str) and value.strip() != "", "a non-empty string")
        return str(value)

    def path(self, path: FieldPath, value: Any) -> str:
        text = os.path.expanduser(self.string(path, value))
        if text.startswith("hf://"):  # a Hugging Face cache reference, resolved like load("hf://…")
            return text
        return os.path.normpath(os.path.join(self.base_dir, text))

    def choice(self, path: FieldPath, value: Any, choices: tuple[str, ...]) -> str:
        self.expect(path, value, isinstance(value, str), "one of " + ", ".join(choices))
        if value not in choices:
            self.fail(
                path,
                f"`{_dotted(path)}` must be one of {', '.join(choices)}, not {value!r}",
                help=_did_you_mean(value, choices, "choices"),
            )
        return str(value)

    def param(self, path: FieldPath, value: Any) -> ParamValue:
        """A number, or a non-empty list of numbers: a sweep."""
        if isinstance(value, (list, tuple)):
            if not value:
                self.wrong(path, value, "a number or a non-empty list of numbers")
            return [self.number((*path, i), v) for i, v in enumerate(value)]
        return self.number(path, value)

    def number(self, path: FieldPath, value: Any) -> float:
        # YAML 1.1 reads `1e-3` as a string, so a string that is a number is a number
        if isinstance(value, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", value):
            value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        self.expect(path, value, ok, "a finite number")
        return float(value)

    def integer(self, path: FieldPath, value: Any, minimum: int = 1) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        self.expect(path, value, ok, f"an integer of at least {minimum}")
        return int(value)

    def boolean(self, path: FieldPath, value: Any) -> bool:
        self.expect(path, value, isinstance(value, bool), "true or false")
        return bool(value)

    def size(self, path: FieldPath, value: Any) -> int:
        if isinstance(value, str):
            try:
                return max(1, parse_size(value, f"`{_dotted(path)}`"))
            except TvParamError as e:
                self.fail(path, e.message, help=e.help)
        return self.integer(path, value)


# -- the fields ---------------------------------------------------------------------------------


def _bindings(f: _Fields, value: Any) -> dict[str, Bound]:
    bindings: dict[str, Bound] = {}
    for name, spec in f.mapping(("bindings",), value).items():
        at: FieldPath = ("bindings", f.name_key(("bindings", name), name))
        if isinstance(spec, str):
            bindings[name] = Bound(f.path(at, spec), "model")
            continue
        if not isinstance(spec, Mapping):
            hint = "a number goes under `params:`" if isinstance(spec, (int, float)) else None
            f.wrong(at, spec, "a path or a mapping with `path:`", help=hint)
        f.keys(at, spec, ("path", "role", "base"))
        if "path" not in spec:
            f.fail(at, f"`{_dotted(at)}` needs a `path:`", key=True)
        role = f.choice((*at, "role"), spec.get("role", "model"), ROLES)
        if "base" in spec and role != "task":
            f.fail((*at, "base"), f"only a task has a base, and `{name}` is a {role}", key=True)
        base = spec.get("base", "base")
        f.expect((*at, "base"), base, isinstance(base, str) and base.isidentifier(), "the name of a binding")
        bindings[name] = Bound(f.path((*at, "path"), spec["path"]), role, base)
    return bindings


def _params(f: _Fields, value: Any) -> dict[str, ParamValue]:
    params = f.mapping(("params",), value)
    return {f.name_key(("params", k), k): f.param(("params", k), v) for k, v in params.items()}


def _output(f: _Fields, value: Any) -> str | dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {f.name_key(("output", k), k): f.path(("output", k), v) for k, v in value.items()}
    f.expect(("output",), value, isinstance(value, str), "a path or a mapping of output name to path")
    return f.path(("output",), value)


def _dtype(f: _Fields, value: Any) -> str | None:
    if value is None:
        return None
    f.expect(("dtype",), value, isinstance(value, str), "one of bf16, fp16, fp32, fp64")
    try:
        parse_dtype(value)
    except TvParamError as e:
        f.fail(("dtype",), f"`dtype` {value!r} is not a dtype", help=e.help)
    return str(value)


def _device(f: _Fields, value: Any) -> str:
    if value is None:
        return "cpu"
    f.expect(("device",), value, isinstance(value, str), "one of " + ", ".join(DEVICES))
    if value.lower() not in DEVICES:
        f.fail(
            ("device",),
            f"`device` {value!r} is not one of " + ", ".join(DEVICES),
            help='use `device: cpu`, `cuda` (pip install "tvlang[gpu]"; see docs/gpu.md) or `auto`',
        )
    return str(value.lower())


def _roots(f: _Fields, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    f.expect(("roots",), value, isinstance(value, (list, tuple)), "a list of directories")
    return tuple(f.path(("roots", i), r) for i, r in enumerate(value))


# Each option field: how it is checked and which Options field it sets.  Overrides given to
# run_job() or on the command line go through the same checks.
_OPTIONS: dict[str, Callable[[_Fields, Any], Any]] = {
    "dtype": _dtype,
    "memory": lambda f, v: f.size(("memory",), v),
    "threads": lambda f, v: None if v is None else f.integer(("threads",), v),
    "shard_size": lambda f, v: f.size(("shard_size",), v),
    "overwrite": lambda f, v: f.boolean(("overwrite",), v),
    "nonfinite": lambda f, v: f.choice(("nonfinite",), v, NONFINITE),
    "roots": _roots,
    "keys": lambda f, v: f.choice(("keys",), v, KEY_POLICIES),
    "rows": lambda f, v: f.choice(("rows",), v, ("exact", "common")),
    "kernels": lambda f, v: f.choice(("kernels",), v, KERNEL_MODES),
    "executor": lambda f, v: f.choice(("executor",), v, EXECUTORS),
    "address": lambda f, v: f.string(("address",), v),
    "as_lora": lambda f, v: f.integer(("as_lora",), v),
    "lora_base": lambda f, v: f.string(("lora_base",), v),
    "lora_svd": lambda f, v: f.choice(("lora_svd",), v, SVD_METHODS),
}
_OVERRIDES_ONLY: dict[str, Callable[[_Fields, Any], Any]] = {
    "progress": lambda f, v: f.boolean(("progress",), v),
    "chunk": lambda f, v: None if v is None else f.integer(("chunk",), v),
}
FIELDS = ("program", "expression", "bindings", "params", "output", "device", *_OPTIONS)


def _job(f: _Fields, data: Any) -> Job:
    if isinstance(data, Mapping) and "merge_method" in data:  # a mergekit config (docs/mergekit.md)
        from tvlang.mergekit import mergekit_job

        return mergekit_job(f, data)
    if not isinstance(data, Mapping):
        f.fail((), f"a job is a mapping of fields, not {_what(data)}", help="fields: " + ", ".join(FIELDS))
    f.keys((), data, FIELDS)
    if "program" in data and "expression" in data:
        f.fail(("expression",), "give `program:` or `expression:`, not both", key=True)
    if "program" not in data and "expression" not in data:
        f.fail((), "a job needs `program:` (a .tv file) or `expression:`")
    program = f.path(("program",), data["program"]) if "program" in data else None
    if program is not None and not os.path.isfile(program):
        raise TvInputError(f"no such program file: {program}", f.span(("program",)), code="E300")
    options = {k: check(f, data[k]) for k, check in _OPTIONS.items() if k in data and data[k] is not None}
    device = _device(f, data.get("device"))
    return Job(
        program=program,
        expression=f.string(("expression",), data["expression"]) if program is None else None,
        bindings=_bindings(f, data.get("bindings")),
        params=_params(f, data.get("params")),
        output=_output(f, data.get("output")),
        options=replace(Options(), **options, device=device),
        device=device,
        name=f.name,
        base_dir=f.base_dir,
        where={
            _dotted(p): span
            for p in f.marks
            if p and p[0] in ("bindings", "params") and (span := f.span(p)) is not None
        },
    )


def job_from_mapping(
    data: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    source_name: str = "<job>",
) -> Job:
    """Validate a job given as data (a parsed file, a dict, an OmegaConf node).  Relative paths
    resolve against ``base_dir`` (default: the current directory)."""
    plain = _from_omegaconf(data)
    base = os.path.abspath(base_dir if base_dir is not None else os.getcwd())
    return _job(_Fields(source_name, base), plain if plain is not None else data)


def load_job(path: str | os.PathLike[str]) -> Job:
    """Read and validate a job file: JSON for ``.json``, else YAML (safe loading only)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(MAX_JOB_CHARS + 1)
    except FileNotFoundError:
        raise TvInputError(f"no such job file: {path}", code="E300") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TvInputError(f"cannot read {path}: {e}", code="E300") from None
    source = Source(text, path)
    if len(text) > MAX_JOB_CHARS:
        raise TvParamError(f"{path} is over {MAX_JOB_CHARS} characters: not a job file", code="E406")
    reader = _read_json if path.lower().endswith(".json") else _read_yaml
    data, marks = reader(source)
    if isinstance(data, Mapping) and "merge_method" in data:  # a mergekit config (docs/mergekit.md)
        from tvlang.mergekit import MARK_DEPTH

        data, marks = reader(source, depth=MARK_DEPTH)  # its fields nest deeper than a job's
    if data is None:
        raise TvParamError(f"{path} is empty", help="a job needs `program:` or `expression:`", code="E406")
    f = _Fields(path, os.path.dirname(os.path.abspath(path)), source, marks)
    return _job(f, data)


# -- reading files, with the position of every field ----------------------------------------------


def _syntax_error(source: Source, pos: int, message: str, end: int | None = None) -> TvParamError:
    pos = min(max(pos, 0), len(source.text))
    span = Span(source, pos, max(pos + 1, end or 0))
    return TvParamError(f"{source.name} is not valid: {message}", span, code="E406")


def _read_yaml(source: Source, depth: int = _MARK_DEPTH) -> tuple[Any, _Marks]:
    try:
        import yaml
    except ImportError:
        raise TvParamError(
            f"reading {source.name} needs PyYAML", help="pip install 'tvlang[config]'", code="E406"
        ) from None
    loader = yaml.SafeLoader(source.text)  # what yaml.safe_load does, keeping the node tree for positions
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        raise _syntax_error(source, mark.index if mark else 0, str(e.problem or e.context)) from None
    except yaml.YAMLError as e:
        raise _syntax_error(source, 0, str(e)) from None
    except RecursionError:
        raise _syntax_error(source, 0, "nested too deeply") from None
    finally:
        loader.dispose()
    marks: _Marks = {}

    def walk(n: Any, path: FieldPath) -> None:
        if len(path) >= depth or len(marks) > _MAX_MARKS:  # aliases could make a deep walk exponential
            return
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if not isinstance(k, yaml.ScalarNode):
                    continue
                p = (*path, k.value)
                if p in marks:
                    raise _syntax_error(
                        source, k.start_mark.index, f"`{_dotted(p)}` is given twice", k.end_mark.index
                    )
                marks[p] = (k.start_mark.index, k.end_mark.index, v.start_mark.index, v.end_mark.index)
                walk(v, p)
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                marks[(*path, i)] = (v.start_mark.index, v.end_mark.index) * 2
                walk(v, (*path, i))

    if node is not None:
        walk(node, ())
    return data, marks


def _read_json(source: Source, depth: int = _MARK_DEPTH) -> tuple[Any, _Marks]:
    text = source.text
    try:
        data = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as e:
        raise _syntax_error(source, e.pos, e.msg) from None
    except RecursionError:
        raise _syntax_error(source, 0, "nested too deeply") from None
    marks: _Marks = {}
    decoder = json.JSONDecoder()
    space = re.compile(r"[ \t\n\r]*")

    def skip(i: int) -> int:
        m = space.match(text, i)
        return m.end() if m else i

    def value(i: int, path: FieldPath) -> int:  # the end of the value starting at i (valid JSON)
        i = skip(i)
        if len(path) >= depth or text[i] not in "{[":
            return decoder.raw_decode(text, i)[1]
        close, n = ("}" if text[i] == "{" else "]"), 0
        i = skip(i + 1)
        while text[i] != close:
            if close == "}":
                key, key_end = decoder.raw_decode(text, i)
                p, key_start, i = (*path, key), i, skip(key_end) + 1  # past the colon
            else:
                p, key_start, key_end = (*path, n), skip(i), -1
            start = skip(i)
            end = value(start, p)
            if p in marks:
                raise _syntax_error(source, key_start, f"`{_dotted(p)}` is given twice", key_end)
            marks[p] = (key_start, key_end if key_end >= 0 else end, start, end)
            i, n = skip(end), n + 1
            if text[i] == ",":
                i = skip(i + 1)
        return i + 1

    if data is not None:
        value(0, ())
    return data, marks


def _from_omegaconf(data: Any) -> Any:
    """An OmegaConf node as plain data with every interpolation resolved, or None for other data."""
    if not type(data).__module__.startswith("omegaconf"):
        return None
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(data, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise TvParamError(f"cannot resolve the config: {e}", code="E406") from None


# -- running --------------------------------------------------------------------------------------


def as_job(spec: Any, *, base_dir: str | os.PathLike[str] | None = None) -> Job:
    """A :class:`Job` from a job, a job file's path, a mapping or an OmegaConf node."""
    if isinstance(spec, Job):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return load_job(spec)
    plain = _from_omegaconf(spec)
    if plain is not None or isinstance(spec, Mapping):
        return job_from_mapping(plain if plain is not None else spec, base_dir=base_dir)
    raise TvParamError(f"cannot run a {type(spec).__name__} as a job", code="E406")


@dataclass(frozen=True)
class PreparedJob:
    """A job with its overrides applied: what ``run``, ``check`` and ``plan`` all act on.  Errors
    about the job's own bindings and parameters point at the job file."""

    job: Job | None  # None: a program given directly (a .tv file, an expression)
    program: Program
    params: Mapping[str, ParamValue]
    bindings: Mapping[str, Any]
    options: Options
    output: OutSpec
    overridden: frozenset[str] = frozenset()

    def run(self, output: OutSpec = None) -> Any:
        """See :meth:`Program.run`; ``output`` (else the job's) says where."""
        with self._located():
            out = output if output is not None else self.output
            return self.program.run(out, self.params, self.bindings, self.options)

    def plan(self) -> Plan:
        with self._located():
            return self.program.plan(self.params, self.bindings, self.options)

    def explain(self, *, all_tensors: bool = False) -> str:
        with self._located():
            return self.program.explain(self.params, self.bindings, self.options, all_tensors=all_tensors)

    @contextlib.contextmanager
    def _located(self) -> Iterator[None]:
        try:
            yield
        except TvError as e:
            if self.job is not None:
                _relocate(e, self.job, set(self.overridden))
            raise


def prepare_job(
    spec: Job | str | os.PathLike[str] | Mapping[str, Any],
    *,
    output: OutSpec = None,
    params: Mapping[str, ParamValue] | None = None,
    bindings: Mapping[str, Any] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> PreparedJob:
    """A job (a :class:`Job`, a job file, a mapping or an OmegaConf node) with overrides: ``output``
    replaces its output, ``params`` and ``bindings`` add to or replace its own, and ``options`` (job
    option fields, ``device``, ``progress``, ``chunk``) are checked like the job's fields.  Paths
    given here are relative to the current directory, as on a command line."""
    job = as_job(spec, base_dir=base_dir)
    checks = {**_OPTIONS, **_OVERRIDES_ONLY, "device": _device}
    f = _Fields("the options given to run the job", os.getcwd())
    for k in options:
        if k not in checks:
            raise TvParamError(
                f"unknown option `{k}`", help=_did_you_mean(k, tuple(checks), "options"), code="E402"
            )
    checked = {k: checks[k](f, v) for k, v in options.items()}
    opts = replace(job.options, **{k: v for k, v in checked.items() if v is not None})
    extra = {k: _absolute(v) for k, v in (bindings or {}).items()}
    for name, bound in job.bindings.items():
        if bound.role == "task" and bound.base not in job.bindings and bound.base not in extra:
            span = job.where.get(f"bindings.{name}.base") or job.where.get(f"bindings.{name}")
            raise TvParamError(
                f"task vector `{name}` is relative to `{bound.base}`, which the job does not bind",
                span,
                help=_did_you_mean(bound.base, tuple(job.bindings), "bindings")
                if difflib.get_close_matches(bound.base, list(job.bindings), n=1)
                else f"add `{bound.base}: PATH` under `bindings:`, or set this binding's `base:`",
                notes=() if span else (f"in {job.name}",),
                code="E406",
            )
    given = _params(f, params)
    return PreparedJob(
        job,
        job.compile(),
        {**job.params, **given},
        extra,
        opts,
        output if output is not None else job.output,
        frozenset(params or ()) | frozenset(bindings or ()),
    )


def run_job(
    spec: Job | str | os.PathLike[str] | Mapping[str, Any],
    *,
    output: OutSpec = None,
    params: Mapping[str, ParamValue] | None = None,
    bindings: Mapping[str, Any] | None = None,
    base_dir: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Any:
    """Run a job; returns what :meth:`Program.run` returns.  The keywords override the job, as
    for :func:`prepare_job`."""
    return prepare_job(
        spec, output=output, params=params, bindings=bindings, base_dir=base_dir, **options
    ).run()


def _absolute(value: Any) -> Any:
    if isinstance(value, Bound) and isinstance(value.value, (str, os.PathLike)):
        return replace(value, value=os.path.abspath(value.value))
    return os.path.abspath(value) if isinstance(value, (str, os.PathLike)) else value


def _relocate(err: TvError, job: Job, overridden: set[str]) -> None:
    """An error about a binding or parameter the job gave points at the job file, not at the
    command-line stand-in (``--bind NAME``, ``--set``) the lowering names."""
    if err.span is None:
        return
    origin = err.span.source.name
    translated = job.where.get(f"expression:{err.span.text}")  # a call a mergekit config wrote
    if translated is not None and err.span.source.text == job.expression:
        err.notes = (*err.notes, f"in the translated program: `{err.span.text}`")
        err.span = translated
        return
    if origin.startswith("--bind "):
        name, field_ = origin.removeprefix("--bind "), "bindings"
    elif origin == "--set":
        name, field_ = err.span.text, "params"
    else:
        return
    span = job.where.get(f"{field_}.{name}.path") or job.where.get(f"{field_}.{name}")
    if name not in overridden and span is not None:
        err.span = span


def register_resolver(name: str = "tvlang.sum") -> None:
    """Register an OmegaConf resolver that writes a sum of names: ``${tvlang.sum:[a, b]}`` →
    ``(a + b)``.  OmegaConf interpolates numbers into strings by itself, but it cannot join a
    list; with this, a Hydra multirun can sweep *which* task vectors an expression adds
    (``-m merge.tasks=[a],[a,b]``).  Registering twice is harmless."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, sum_of_names)


def sum_of_names(names: Any) -> str:
    """``["a", "b"]`` → ``"(a + b)"``, refusing anything that is not a name."""
    items = [names] if isinstance(names, str) else list(names)
    if not items:
        raise TvParamError("a sum of names needs at least one name", code="E406")
    for item in items:
        if not (isinstance(item, str) and item.isidentifier()):
            raise TvParamError(f"`{item}` is not a valid name", code="E406")
    return "(" + " + ".join(items) + ")"


__all__ = [
    "DEVICES",
    "FIELDS",
    "JOB_SUFFIXES",
    "Job",
    "PreparedJob",
    "as_job",
    "job_from_mapping",
    "load_job",
    "prepare_job",
    "register_resolver",
    "run_job",
    "sum_of_names",
]
