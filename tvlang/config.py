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

import difflib
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from tvlang import mergekit
from tvlang.driver import OutSpec
from tvlang.errors import TvInputError, TvParamError
from tvlang.fields import FieldPath, Fields, describe, did_you_mean, dotted, read_json, read_yaml
from tvlang.job import JOB_SUFFIXES, Job, PreparedJob
from tvlang.lowering.lower import Binding, ParamValue
from tvlang.options import SETTINGS, Options, check_chat_template
from tvlang.plan import parse_dtype
from tvlang.source import SourceText

ROLES = ("model", "task", "delta")
MAX_JOB_CHARS = 1 << 20  # a job is a few lines; refuse anything that could not be one

MARK_DEPTH = 3  # bindings.NAME.FIELD is the deepest field in the schema


# -- the fields ---------------------------------------------------------------------------------


def _bindings(f: Fields, value: Any) -> dict[str, Binding]:
    bindings: dict[str, Binding] = {}
    for name, spec in f.mapping(("bindings",), value).items():
        at: FieldPath = ("bindings", f.name_key(("bindings", name), name))
        if isinstance(spec, str):
            bindings[name] = Binding(f.path(at, spec), "model")
            continue
        if not isinstance(spec, Mapping):
            hint = "a number goes under `params:`" if isinstance(spec, (int, float)) else None
            f.wrong(at, spec, "a path or a mapping with `path:`", help=hint)
        f.keys(at, spec, ("path", "role", "base"))
        if "path" not in spec:
            f.fail(at, f"`{dotted(at)}` needs a `path:`", key=True)
        role = f.choice((*at, "role"), spec.get("role", "model"), ROLES)
        if "base" in spec and role != "task":
            f.fail((*at, "base"), f"only a task has a base, and `{name}` is a {role}", key=True)
        base = spec.get("base", "base")
        f.expect((*at, "base"), base, isinstance(base, str) and base.isidentifier(), "the name of a binding")
        bindings[name] = Binding(f.path((*at, "path"), spec["path"]), role, base)
    return bindings


def _params(f: Fields, value: Any) -> dict[str, ParamValue]:
    params = f.mapping(("params",), value)
    return {f.name_key(("params", k), k): f.param(("params", k), v) for k, v in params.items()}


def _output(f: Fields, value: Any) -> str | dict[str, str] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {f.name_key(("output", k), k): f.path(("output", k), v) for k, v in value.items()}
    f.expect(("output",), value, isinstance(value, str), "a path or a mapping of output name to path")
    return f.path(("output",), value)


# Options whose default is None: a job's `null` there means the default.
_UNSET_BY_NULL = ("dtype", "roots", "threads", "chunk", "address", "as_lora", "chat_template")


def _option(f: Fields, name: str, value: Any) -> Any:
    """A job's (or an override's) value of the :class:`Options` field ``name``, checked as the
    field's setting says (tvlang.options), with the error at the field."""
    setting = SETTINGS[name]
    at: FieldPath = (name,)
    if value is None and name in _UNSET_BY_NULL:
        return None
    if setting.kind == "size":
        return f.size(at, value)
    if setting.kind == "count":
        return f.integer(at, value)
    if setting.kind == "flag":
        return f.boolean(at, value)
    if setting.kind == "text":
        return f.string(at, value)
    if setting.kind == "template":
        text = f.string(at, value)
        try:
            check_chat_template(text)
        except TvParamError as e:
            f.fail(at, e.message, help=e.help)
        return text
    if setting.kind == "paths":
        f.expect(at, value, isinstance(value, (list, tuple)), "a list of directories")
        return tuple(f.path((name, i), r) for i, r in enumerate(value))
    if setting.kind == "dtype":
        f.expect(at, value, isinstance(value, str), "one of bf16, fp16, fp32, fp64")
        try:
            parse_dtype(value)
        except TvParamError as e:
            f.fail(at, f"`dtype` {value!r} is not a dtype", help=e.help)
        return str(value)
    if name == "device":  # (case-insensitive, with its own help)
        f.expect(at, value, isinstance(value, str), "one of " + ", ".join(setting.choices))
        if value.lower() not in setting.choices:
            f.fail(
                at,
                f"`device` {value!r} is not one of " + ", ".join(setting.choices),
                help='use `device: cpu`, `cuda` (pip install "tvlang[gpu]"; see docs/gpu.md) or `auto`',
            )
        return str(value.lower())
    return f.choice(at, value, setting.choices)


# Option fields a job file may hold (every Options field but the caller-only ones, which only
# run_job() overrides and the command line set).
_JOB_OPTIONS = tuple(name for name in SETTINGS if name not in ("progress", "chunk"))
FIELDS = ("program", "expression", "bindings", "params", "output", *_JOB_OPTIONS)


def _job(f: Fields, data: Any) -> Job:
    if isinstance(data, Mapping) and "merge_method" in data:  # a mergekit config (docs/mergekit.md)
        return mergekit.mergekit_job(f, data)
    if not isinstance(data, Mapping):
        f.fail((), f"a job is a mapping of fields, not {describe(data)}", help="fields: " + ", ".join(FIELDS))
    f.keys((), data, FIELDS)
    if "program" in data and "expression" in data:
        f.fail(("expression",), "give `program:` or `expression:`, not both", key=True)
    if "program" not in data and "expression" not in data:
        f.fail((), "a job needs `program:` (a .tv file) or `expression:`")
    program = f.path(("program",), data["program"]) if "program" in data else None
    if program is not None and not os.path.isfile(program):
        raise TvInputError(f"no such program file: {program}", f.span(("program",)), code="E300")
    options = {k: _option(f, k, data[k]) for k in _JOB_OPTIONS if k in data and data[k] is not None}
    device = options.get("device", "cpu")
    return Job(
        program=program,
        expression=f.string(("expression",), data["expression"]) if program is None else None,
        bindings=_bindings(f, data.get("bindings")),
        params=_params(f, data.get("params")),
        output=_output(f, data.get("output")),
        options=replace(Options(), **options),
        device=device,
        name=f.name,
        base_dir=f.base_dir,
        where={
            dotted(p): span
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
    return _job(Fields(source_name, base), plain if plain is not None else data)


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
    source = SourceText(text, path)
    if len(text) > MAX_JOB_CHARS:
        raise TvParamError(f"{path} is over {MAX_JOB_CHARS} characters: not a job file", code="E406")
    reader = read_json if path.lower().endswith(".json") else read_yaml
    data, marks = reader(source, depth=MARK_DEPTH)
    if isinstance(data, Mapping) and "merge_method" in data:  # a mergekit config (docs/mergekit.md)
        data, marks = reader(source, depth=mergekit.MARK_DEPTH)  # its fields nest deeper than a job's
    if data is None:
        raise TvParamError(f"{path} is empty", help="a job needs `program:` or `expression:`", code="E406")
    f = Fields(path, os.path.dirname(os.path.abspath(path)), source, marks)
    return _job(f, data)


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
    f = Fields("the options given to run the job", os.getcwd())
    for k in options:
        if k not in SETTINGS:
            raise TvParamError(
                f"unknown option `{k}`", help=did_you_mean(k, tuple(SETTINGS), "options"), code="E402"
            )
    checked = {k: _option(f, k, v) for k, v in options.items()}
    opts = replace(job.options, **{k: v for k, v in checked.items() if v is not None})
    extra = {k: _absolute(v) for k, v in (bindings or {}).items()}
    for name, bound in job.bindings.items():
        if bound.role == "task" and bound.base not in job.bindings and bound.base not in extra:
            span = job.where.get(f"bindings.{name}.base") or job.where.get(f"bindings.{name}")
            raise TvParamError(
                f"task vector `{name}` is relative to `{bound.base}`, which the job does not bind",
                span,
                help=did_you_mean(bound.base, tuple(job.bindings), "bindings")
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
    if isinstance(value, Binding) and isinstance(value.value, (str, os.PathLike)):
        return replace(value, value=os.path.abspath(value.value))
    return os.path.abspath(value) if isinstance(value, (str, os.PathLike)) else value


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
