"""mergekit configs: translate a mergekit merge YAML into an equivalent tvlang program.

``tvlang import-mergekit merge.yml`` prints the program (``-o merge.tv`` writes it), and
``tvlang run merge.yml -o out/`` runs it: a job file with a top-level ``merge_method:`` is read as
mergekit's.  Each method becomes the tvlang method, or composition of methods, that computes what
mergekit computes; per-model parameters given as gradients or with filters become per-tensor
numbers (``gradient([...])``, ``where(matches("*mlp*"), a, b)``), resolved before any data is read.
``tokenizer_source:`` and ``tokenizer:`` become ``vocab`` and ``token`` statements (rows matched by
token, :mod:`tvlang.io.vocab`).  See ``docs/mergekit.md`` for the mapping and for where the results differ.

``slices:`` and ``modules:`` become layer ranges stacked with ``layers()`` and ``stack()``, and a
``model+lora`` reference the model plus ``lora(adapter)``.  Anything tvlang cannot reproduce (several
modules, unknown methods or parameters) is a :class:`TvParamError` ``E407`` that names the field and
points at it in the YAML; nothing is dropped without a word.

>>> tr = translate({"merge_method": "linear", "models": [
...     {"model": "/m/a.safetensors", "parameters": {"weight": 0.3}},
...     {"model": "/m/b.safetensors", "parameters": {"weight": [0.2, 0.9]}}]})
>>> print(tr.body, end="")
weight_b = gradient([0.2, 0.9])
output merged = a + (weight_b / (0.3 + weight_b))*(b - a)
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from tvlang.api import Program
from tvlang.errors import TvInputError, TvParamError
from tvlang.fields import FieldPath, Fields, describe, dotted, read_json, read_yaml
from tvlang.job import Job
from tvlang.lowering.builtins import BUILTINS
from tvlang.lowering.lower import Binding
from tvlang.options import CHAT_TEMPLATES, Options, check_chat_template
from tvlang.source import SourceText, Span

# modules.M.slices[i].sources[j].parameters.NAME[k].value[l] is the deepest field a mergekit config has
MARK_DEPTH = 12
CODE = "E407"
OUTPUT = "merged"
REQUIRED: Any = object()

TOP_LEVEL = (
    "merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source", "tokenizer",
    "chat_template", "slices", "modules",
)  # fmt: skip
BOOLEANS = (
    "int8_mask",
    "normalize",
    "rescale",
    "nuslerp_flatten",
    "nuslerp_row_wise",
    "filter_wise",
    "normalize_weights",
)
DTYPES = {
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "half": "fp16",
    "float32": "fp32",
    "fp32": "fp32",
    "float": "fp32",
    "float64": "fp64",
    "fp64": "fp64",
    "double": "fp64",
}
# org/name as the Hugging Face Hub writes it (what a missing local path most likely is)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_RESERVED = {
    *BUILTINS,
    "param",
    "output",
    "def",
    "base",
    "lam",
    "t",
    OUTPUT,
    "l1_rescale",
    "vocab",
    "token",
    "union",
    "zero",
}
_L1_RESCALE = (
    "def l1_rescale(d, kept) = where(max(sum(abs(d)) < 1e-7, sum(abs(kept)) < 1e-7), 1, "
    "sum(abs(d)) / max(sum(abs(kept)), 1e-7)) * kept"
)


@dataclass(frozen=True)
class _Method:
    # gta | linear | slerp | nearswap | nuslerp | model_stock | sce | ram | ramplus | multislerp | karcher | arcee_fusion
    kind: str
    base: str  # required | optional
    globals: Mapping[str, Any]  # parameter name → default (REQUIRED: none)
    per_model: Mapping[str, Any]
    consensus: bool = False  # TIES sign election
    sparsify: str | None = None  # magnitude | random | outliers | della


def _gta(consensus: bool, sparsify: str | None, normalize: bool, rescale: bool) -> _Method:
    per_model: dict[str, Any] = {"weight": REQUIRED, "density": 1.0}
    if sparsify == "outliers":
        per_model["gamma"] = 0.01
    if sparsify == "della":
        per_model["epsilon"] = 0.15
    options = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 1.0}
    return _Method("gta", "required", options, per_model, consensus, sparsify)


# mergekit's registry (merge_methods/registry.py): consensus, sparsification, default normalize, rescale
METHODS: dict[str, _Method] = {
    "linear": _Method("linear", "optional", {"normalize": True}, {"weight": REQUIRED}),
    "task_arithmetic": _gta(False, None, False, False),
    "ties": _gta(True, "magnitude", True, False),
    "dare_ties": _gta(True, "random", False, True),
    "dare_linear": _gta(False, "random", False, True),
    "breadcrumbs": _gta(False, "outliers", False, False),
    "breadcrumbs_ties": _gta(True, "outliers", False, False),
    "della": _gta(True, "della", True, True),
    "della_linear": _gta(False, "della", False, True),
    "slerp": _Method("slerp", "required", {"t": REQUIRED}, {}),
    "nearswap": _Method("nearswap", "required", {"t": REQUIRED}, {}),
    "nuslerp": _Method(
        "nuslerp", "optional", {"nuslerp_flatten": True, "nuslerp_row_wise": False}, {"weight": REQUIRED}
    ),
    "model_stock": _Method("model_stock", "required", {"filter_wise": False}, {}),
    "sce": _Method("sce", "required", {"int8_mask": False, "select_topk": 1.0}, {}),
    "ram": _Method("ram", "required", {"epsilon": 1e-5}, {}),
    "ramplus_tl": _Method("ramplus", "required", {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, {}),
    "multislerp": _Method(
        "multislerp", "optional", {"normalize_weights": True, "eps": 1e-8}, {"weight": REQUIRED}
    ),
    "karcher": _Method("karcher", "optional", {"max_iter": 10, "tol": 1e-5}, {}),
    "arcee_fusion": _Method("arcee_fusion", "required", {}, {}),
    "passthrough": _Method("passthrough", "optional", {}, {"scale": 1.0}),
}
# Per-model parameters of some mergekit method: under a method that does not read one, mergekit
# ignores it, and tvlang warns (any other unknown name stays an error: most likely a typo).
PER_MODEL = frozenset(name for m in METHODS.values() for name in m.per_model)


@dataclass(frozen=True)
class Translation:
    """A mergekit config as a tvlang program.

    ``program`` is the complete ``.tv`` text; ``body`` is the same program without its ``load()``
    lines, for the caller to bind ``models`` (name → absolute checkpoint path) instead, so that a
    missing checkpoint is reported at its ``model:`` line in the YAML (``where``).  ``dtype`` is
    the output dtype (``--dtype``) from mergekit's ``out_dtype`` or ``dtype``, or None;
    ``chat_template`` the output's chat template (``--chat-template``), or None."""

    program: str
    body: str
    models: Mapping[str, str]
    dtype: str | None
    method: str
    chat_template: str | None = None
    name: str = "<mergekit>"
    base_dir: str = "."
    notes: tuple[str, ...] = ()
    where: Mapping[str, Span] = field(default_factory=dict, compare=False, repr=False)
    # one line each, ``warning: merge.yml:7:7: ...``: what mergekit accepts and ignores
    warnings: tuple[str, ...] = ()

    def job(self) -> Job:
        """The job ``tvlang run merge.yml`` runs: the body, with the models bound by name."""
        return Job(
            program=None,
            expression=self.body,
            bindings={n: Binding(p, "model") for n, p in self.models.items()},
            params={},
            output=None,
            options=replace(Options(), dtype=self.dtype, chat_template=self.chat_template),
            name=self.name,
            base_dir=self.base_dir,
            where=dict(self.where),
            translated=self.program,
        )

    def compile(self) -> Program:
        return self.job().compile()


class _MkFields(Fields):
    """The job-file field checks, reporting E407 and falling back to the nearest positioned field."""

    def fail(
        self, path: FieldPath, message: str, *, key: bool = False, help: str | None = None, label: str = ""
    ) -> NoReturn:
        span = self.span(path, key=key)
        while span is None and path and self.source is not None:  # e.g. a field reached through an alias
            path = path[:-1]
            span = self.span(path)
        notes = () if span is not None else (f"in {self.name}",)
        raise TvParamError(message, span, label=label, help=help, notes=notes, code=CODE)


Leaf = float | tuple[float, ...]  # a number, or a gradient over the layers


@dataclass(frozen=True)
class _Rule:
    """One entry of a parameter's lookup: its value for tensors whose name contains ``filter``
    (None: every tensor)."""

    filter: str | None
    leaf: Leaf
    at: FieldPath


@dataclass(frozen=True)
class _Num:
    text: str  # a tvlang expression for a number (per tensor when not constant)
    const: float | None = None


@dataclass(frozen=True)
class _Operand:
    text: str
    atomic: bool  # a name, number or call: needs no parentheses as a factor


# -- entry points ---------------------------------------------------------------------------------


def translate(
    spec: str | Mapping[str, Any],
    *,
    source_name: str = "<mergekit>",
    base_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> Translation:
    """Translate a mergekit config: YAML (or JSON, for a ``.json`` ``source_name``) text, or the
    parsed mapping.  Relative model paths resolve against ``base_dir`` (default: the current
    directory); ``load()`` paths in ``program`` are relative to ``out_dir``, the directory the
    ``.tv`` file will be in, or absolute when it is None.  ``seed`` seeds DARE and DELLA masks."""
    base = os.path.abspath(base_dir if base_dir is not None else os.getcwd())
    if isinstance(spec, str):
        source = SourceText(spec, source_name)
        data, marks = _read(source)
        f = _MkFields(source_name, base, source, marks)
    else:
        data, f = spec, _MkFields(source_name, base)
    return _Translator(f, data, out_dir, seed).translate()


def load_config(
    path: str | os.PathLike[str], *, out_dir: str | os.PathLike[str] | None = None, seed: int = 0
) -> Translation:
    """Read and translate a mergekit config file; its relative model paths resolve against its
    directory (as a tvlang job's do)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(1 << 20)
    except FileNotFoundError:
        raise TvInputError(f"no such config file: {path}", code="E300") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TvInputError(f"cannot read {path}: {e}", code="E300") from None
    return translate(
        text, source_name=path, base_dir=os.path.dirname(os.path.abspath(path)), out_dir=out_dir, seed=seed
    )


def mergekit_job(f: Fields, data: Mapping[str, Any]) -> Job:
    """The job for a mergekit config met where a tvlang job was expected (``tvlang run merge.yml``,
    :func:`tvlang.config.run_job`)."""
    mk = _MkFields(f.name, f.base_dir, f.source, f.marks)
    translation = _Translator(mk, data, None, 0).translate()
    for line in translation.warnings:  # what mergekit accepts and ignores: said once, not an error
        print(line, file=sys.stderr)
    return replace(translation.job(), mergekit_config=mergekit_text(f.source, data))


def mergekit_text(source: SourceText | None, data: Mapping[str, Any]) -> str:
    """The config as the model card shows it: the file's text, or the mapping written as JSON
    (which YAML reads too)."""
    if source is not None:
        return source.text
    return json.dumps(data, indent=2, default=str)


def _read(source: SourceText) -> tuple[Any, dict[FieldPath, tuple[int, int, int, int]]]:
    reader = read_json if source.name.lower().endswith(".json") else read_yaml
    try:
        data, marks = reader(source, depth=MARK_DEPTH)
    except TvParamError as e:  # a syntax error, reported by the job-file reader
        e.code = CODE
        raise
    if data is None:
        raise TvParamError(
            f"{source.name} is empty", help="a mergekit config needs `merge_method:`", code=CODE
        )
    return data, marks


# -- formatting -----------------------------------------------------------------------------------


def _num(v: float) -> str:
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _match(substring: str) -> str:
    """mergekit's filter is a substring of the tensor name: the glob ``*filter*``, or an escaped
    regular expression (searched in the name) when the filter has glob metacharacters."""
    if any(c in substring for c in "*?[]"):
        return f"matches({_string('re:' + re.escape(substring))})"
    return f"matches({_string('*' + substring + '*')})"


def _leaf_text(leaf: Leaf) -> str:
    if isinstance(leaf, tuple):
        return "gradient([" + ", ".join(_num(v) for v in leaf) + "])"
    return _num(leaf)


def _factor(text: str) -> str:
    """``text`` as the left operand of ``*`` or the right of ``/``."""
    if re.fullmatch(r"\d[\w.+]*|[A-Za-z_]\w*", text) or (
        re.fullmatch(r"([A-Za-z_]\w*)?\(.*\)", text, re.DOTALL) and _balanced_call(text)
    ):
        return text
    return f"({text})"


def _balanced_call(text: str) -> bool:
    """``f(...)`` or ``(...)`` whose first ``(`` closes at the very end (not ``f(x) + g(y)``)."""
    depth = 0
    for i, c in enumerate(text):
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
            if depth == 0 and c == ")":
                return i == len(text) - 1
    return False


def _scale(weight: _Num, operand: _Operand) -> str:
    term = operand.text if operand.atomic else f"({operand.text})"
    if weight.const == 1.0:
        return operand.text
    return f"{_factor(weight.text)}*{term}"


def _call(name: str, args: Sequence[str], indent: str = "") -> str:
    """``name(a, b, ...)``, one argument a line when long (newlines inside parentheses are ignored)."""
    flat = f"{name}({', '.join(args)})"
    if len(flat) + len(indent) <= 96:
        return flat
    inner = indent + "    "
    return f"{name}(\n" + "".join(f"{inner}{a},\n" for a in args) + f"{indent})"


def _terms(terms: Sequence[str]) -> str:
    text = " + ".join(terms)
    if len(text) <= 90 or len(terms) == 1:
        return text
    return "(\n    " + "\n    + ".join(terms) + "\n)"


def _identifier(path: str) -> str:
    stem = os.path.basename(path.rstrip("/\\")) or "model"
    stem = stem.removesuffix(".safetensors")
    name = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_") or "model"
    return name if not name[0].isdigit() else f"m_{name}"


# -- the translation ------------------------------------------------------------------------------


@dataclass
class _Model:
    path: str  # absolute
    at: FieldPath  # where its reference is
    params: Mapping[str, Any]
    params_at: FieldPath
    name: str = ""


class _Translator:
    def __init__(self, f: _MkFields, data: Any, out_dir: str | os.PathLike[str] | None, seed: int) -> None:
        self.f = f
        self.data = data
        self.out_dir = None if out_dir is None else os.path.abspath(out_dir)
        self.seed = seed
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.defs: list[str] = []
        self.params: list[str] = []  # `param` lines and the names of per-tensor numbers
        self.vocab_models: list[_Model] = []  # models named only as a tokenizer source
        self.vocab_lines: list[str] = []
        self.taken = set(_RESERVED) - {"lam", "t"}  # names in the program (`lam` and `t` are for parameters)
        self.bound: dict[str, str] = {}  # per-tensor number bound to a name → its expression
        self.loras: dict[str, tuple[str, str]] = {}  # `model+lora` reference → (model path, adapter path)
        # a call in the translated program → where the config says it (a slice's layer_range)
        self.calls: dict[str, Span] = {}

    # -- checks --------------------------------------------------------------------------------
    def warn(self, path: FieldPath, message: str) -> None:
        span = self.f.span(path, key=True)
        if span is not None:
            line, col = span.line_col()
            where = f"{self.f.name}:{line}:{col}"
        else:
            where = f"{self.f.name}: {dotted(path)}"
        self.warnings.append(f"warning: {where}: {message}")

    def fail(self, path: FieldPath, message: str, *, key: bool = False, help: str | None = None) -> NoReturn:
        self.f.fail(path, message, key=key, help=help)

    def translate(self) -> Translation:
        f, data = self.f, self.data
        if not isinstance(data, Mapping):
            self.fail((), f"a mergekit config is a mapping of fields, not {describe(data)}")
        for k in data:
            if not isinstance(k, str):
                self.fail((str(k),), f"field names must be strings, not {describe(k)}", key=True)
            if k not in TOP_LEVEL:
                self.fail(
                    (k,),
                    f"unknown mergekit field `{k}`",
                    key=True,
                    help=_close(k, TOP_LEVEL, "fields"),
                )
        if "merge_method" not in data:
            self.fail((), "a mergekit config needs `merge_method:`", help="supported: " + ", ".join(METHODS))
        name = f.string(("merge_method",), data["merge_method"])
        if name not in METHODS:
            self.fail(
                ("merge_method",), f"unknown merge_method `{name}`", help="supported: " + ", ".join(METHODS)
            )
        self.name, self.method = name, METHODS[name]
        self.globals = self._parameters(("parameters",), data.get("parameters"), per_model=False)
        self.base = self._base()
        if "slices" in data or "modules" in data:  # layer structure (see _Structure below)
            for field_ in ("tokenizer_source", "tokenizer"):
                if data.get(field_) is not None:
                    self.fail(
                        (field_,),
                        f"`{field_}:` together with `slices:` or `modules:` is not supported",
                        key=True,
                        help="match the vocabularies in a merge of whole models first, then stack its layers",
                    )
            self.vocab_models, self.vocab_lines = [], []
            body = _Structure(self).body()
            return self._assemble(body, self._dtype())
        self.models = self._models()
        self._name_models()
        self.vocab_lines = self._vocab()
        body = self._body()
        dtype = self._dtype()
        return self._assemble(body, dtype)

    def _parameters(self, at: FieldPath, raw: Any, *, per_model: bool) -> dict[str, Any]:
        params = dict(self.f.mapping(at, raw))
        known = (*self.method.globals, *self.method.per_model)
        for k in list(params):
            if isinstance(k, str) and k in PER_MODEL and k not in known:  # (under a model, or for all)
                self.warn(
                    (*at, k),
                    f"per-model parameter `{k}` is ignored by merge_method `{self.name}`, as in mergekit",
                )
                del params[k]
                continue
            if not isinstance(k, str) or k not in known:
                none = " (it takes none per model)" if per_model and not self.method.per_model else ""
                self.fail(
                    (*at, str(k)),
                    f"unknown parameter `{k}` for merge_method `{self.name}`{none}",
                    key=True,
                    help=_close(str(k), known, "parameters") if known else None,
                )
            if per_model and k in self.method.globals:
                self.fail(
                    (*at, k),
                    f"`{k}` is a global parameter of `{self.name}`: mergekit ignores it under a model",
                    key=True,
                    help=f"move it to the top-level `parameters:` ({k}: ...)",
                )
        return dict(params)

    def _reference(self, at: FieldPath, raw: Any) -> str:
        """A model reference as an absolute local path."""
        if isinstance(raw, Mapping):
            self.fail(
                at,
                "a model given as a mapping (a Hub revision, a LoRA, an architecture override) is not supported",
                help="write the model as the path of a local checkpoint",
            )
        text = self.f.string(at, raw)
        path = os.path.normpath(os.path.join(self.f.base_dir, os.path.expanduser(text)))
        if os.path.exists(path) or os.path.exists(path + ".safetensors"):
            return path
        if "+" in text:  # mergekit's `model+lora`: the model plus the adapter's task vector
            return self._with_lora(at, text)
        if "@" in text or (_HUB_ID.fullmatch(text) and not text.startswith(".")):
            # a Hugging Face Hub id (with or without @revision): read from the local cache (docs/language.md)
            return "hf://" + text
        return path  # missing: reported (E300) at this line when run

    def _with_lora(self, at: FieldPath, text: str) -> str:
        """``model+adapter``: a reference that stands for the model plus the adapter's task vector
        (``load(model) + lora(adapter)``), split as mergekit splits it."""
        parts = text.split("+")
        if len(parts) != 2 or not all(parts):
            self.fail(at, f"`{text}` is not `model+lora`: mergekit takes exactly one `+`")
        model = self._reference(at, parts[0])
        adapter = os.path.normpath(os.path.join(self.f.base_dir, os.path.expanduser(parts[1])))
        key = f"{model}+{adapter}"
        self.loras[key] = (model, adapter)
        span = self.f.span(at)
        if span is not None:  # a missing adapter is reported at this line
            self.calls.setdefault(_string(adapter), span)
        return key

    def _split_loras(
        self, models: Mapping[str, str]
    ) -> tuple[dict[str, str], list[tuple[str, str]], dict[str, str]]:
        """The bindings with each ``model+lora`` model bound as ``NAME_base``, and the lines
        ``NAME = NAME_base + lora("adapter")`` (for the program, for the job)."""
        bound: dict[str, str] = {}
        lines: list[tuple[str, str]] = []
        renamed: dict[str, str] = {}
        for name, path in models.items():
            if path not in self.loras:
                bound[name] = path
                continue
            model, adapter = self.loras[path]
            base = f"{name}_base"
            while base in models or base in self.taken:
                base += "_"
            bound[base] = model
            renamed[name] = base
            lines.append(
                (
                    f"{name} = {base} + lora({_string(self._load_path(adapter))})",
                    f"{name} = {base} + lora({_string(adapter)})",
                )
            )
        return bound, lines, renamed

    def _base(self) -> _Model | None:
        raw = self.data.get("base_model")
        if raw is None:
            if self.method.base == "required":
                self.fail(("merge_method",), f"merge_method `{self.name}` needs a `base_model:`")
            return None
        return _Model(self._reference(("base_model",), raw), ("base_model",), {}, ("base_model",))

    def _models(self) -> list[_Model]:
        raw = self.data.get("models")
        if raw is None:
            self.fail((), "a mergekit config needs `models:` (`slices:` is not supported)")
        if not isinstance(raw, list) or not raw:
            self.f.wrong(("models",), raw, "a non-empty list of `- model: PATH` entries")
        models: list[_Model] = []
        for i, entry in enumerate(raw):
            at: FieldPath = ("models", i)
            if not isinstance(entry, Mapping):
                self.f.wrong(at, entry, "a mapping `- model: PATH` (with optional `parameters:`)")
            self.f.keys(at, entry, ("model", "parameters"))
            if "model" not in entry:
                self.fail(at, f"`{dotted(at)}` needs a `model:`")
            path = self._reference((*at, "model"), entry["model"])
            if any(m.path == path for m in models):
                self.fail((*at, "model"), f"`{entry['model']}` is listed twice under `models:`")
            params = self._parameters((*at, "parameters"), entry.get("parameters"), per_model=True)
            models.append(_Model(path, (*at, "model"), params, (*at, "parameters")))
        return models

    def _name_models(self) -> None:
        taken = self.taken
        if self.base is not None:
            self.base.name = "base"
        for m in self.models:
            if self.base is not None and m.path == self.base.path:
                m.name = "base"
                continue
            name, n = _identifier(m.path), 2
            while name in taken or name in _RESERVED:
                name, n = f"{_identifier(m.path)}_{n}", n + 1
            taken.add(name)
            m.name = name

    # -- tokenizer_source / tokenizer: rows matched by token (tvlang.io.vocab) ------------------
    def _vocab(self) -> list[str]:
        """``vocab`` and ``token`` lines for mergekit's ``tokenizer_source:`` or ``tokenizer:``."""
        self.vocab_models = []
        data = {k: v for k, v in self.data.items() if v is not None}  # `null` is mergekit's default: none
        if "tokenizer_source" in data and "tokenizer" in data:
            self.fail(
                ("tokenizer",),
                "`tokenizer_source:` and `tokenizer:` cannot both be given",
                key=True,
                help="mergekit refuses both too: keep `tokenizer:` (its `source:` is the tokenizer_source)",
            )
        tokens: Mapping[Any, Any] = {}
        pad: int | None = None
        if "tokenizer" in data:
            at: FieldPath = ("tokenizer",)
            cfg = self.f.mapping(at, data["tokenizer"])
            self.f.keys(at, cfg, ("source", "tokens", "pad_to_multiple_of"))
            raw, src_at = cfg.get("source", "union"), (*at, "source")
            tokens = self.f.mapping((*at, "tokens"), cfg.get("tokens"))
            if cfg.get("pad_to_multiple_of") is not None:
                pad = self.f.integer((*at, "pad_to_multiple_of"), cfg["pad_to_multiple_of"])
        elif "tokenizer_source" in data:
            raw, src_at = data["tokenizer_source"], ("tokenizer_source",)
        else:
            return []
        first = self.base or self.models[0]  # mergekit: the base model, else one of the models
        if raw == "union":
            source = "union"
        elif raw == "base":
            source = first.name
        else:
            source = self._vocab_model(src_at, raw)
        line = f"vocab {source}"
        if self.base is not None:
            line += ", base=base"
        if pad is not None:
            line += f", pad_to={pad}"
        lines = [line]
        for token, rule in tokens.items():
            t_at: FieldPath = ("tokenizer", "tokens", str(token))
            if not isinstance(token, str) or not token:
                self.fail(t_at, "a token is a non-empty string", key=True)
            rule = self.f.mapping(t_at, rule)
            self.f.keys(t_at, rule, ("source", "force"))
            force = self.f.boolean((*t_at, "force"), rule["force"]) if "force" in rule else False
            if rule.get("source") is None:
                self.fail(t_at, f"token {token!r} needs a `source:`", key=True,
                          help="a model, {kind: zero} or {kind: model_token, model: M, token: T}")  # fmt: skip
            lines.append(f"token {_string(token)} = {self._token_source((*t_at, 'source'), rule['source'])}"
                         + (", force" if force else ""))  # fmt: skip
        return lines

    def _vocab_model(self, at: FieldPath, raw: Any) -> str:
        """The name of a model a tokenizer field refers to (a model outside the merge gets one)."""
        path = self._reference(at, raw)
        for m in [*([self.base] if self.base else []), *self.models, *self.vocab_models]:
            if m.path == path:
                return m.name
        name, n = _identifier(path), 2
        while name in self.taken or name in _RESERVED or any(m.name == name for m in self.models):
            name, n = f"{_identifier(path)}_{n}", n + 1
        self.taken.add(name)
        self.vocab_models.append(_Model(path, at, {}, at, name))
        return name

    def _token_source(self, at: FieldPath, raw: Any) -> str:
        if not isinstance(raw, Mapping):
            return self._vocab_model(at, raw)
        kind = self.f.choice((*at, "kind"), raw.get("kind"), ("zero", "model_token"))
        if kind == "zero":
            self.f.keys(at, raw, ("kind",))
            return "zero"
        self.f.keys(at, raw, ("kind", "model", "token", "token_id"))
        if "model" not in raw:
            self.fail(at, "a `model_token` source needs `model:`")
        model = self._vocab_model((*at, "model"), raw["model"])
        if ("token" in raw) == ("token_id" in raw):
            self.fail(at, "a `model_token` source needs one of `token:` and `token_id:`")
        if "token" in raw:
            return f"{model}[{_string(self.f.string((*at, 'token'), raw['token']))}]"
        return f"{model}[{self.f.integer((*at, 'token_id'), raw['token_id'], minimum=0)}]"

    def others(self) -> list[_Model]:
        """The models besides the base, in config order."""
        return [m for m in self.models if m.name != "base"]

    # -- parameters -----------------------------------------------------------------------------
    def _rules_of(self, at: FieldPath, raw: Any) -> list[_Rule]:
        if isinstance(raw, Mapping):
            self.fail(
                at,
                f"`{dotted(at)}` is a single mapping: mergekit's conditional parameters are a list",
                help="write `- {filter: self_attn, value: 0.5}` entries, the last one without a filter",
            )
        if isinstance(raw, list) and raw and all(isinstance(x, Mapping) for x in raw):
            rules = []
            for j, item in enumerate(raw):
                self.f.keys((*at, j), item, ("filter", "value"))
                if "value" not in item:
                    self.fail((*at, j), f"`{dotted((*at, j))}` needs a `value:`")
                flt = item.get("filter")
                if flt is not None and not isinstance(flt, str):
                    self.f.wrong((*at, j, "filter"), flt, "a string (a part of tensor names)")
                rules.append(
                    _Rule(
                        flt if flt not in (None, "", "*") else None,
                        self._leaf((*at, j, "value"), item["value"]),
                        (*at, j),
                    )
                )
            return rules
        return [_Rule(None, self._leaf(at, raw), at)]

    def _leaf(self, at: FieldPath, raw: Any) -> Leaf:
        if isinstance(raw, list):
            if not raw:
                self.f.wrong(at, raw, "a number or a non-empty list of numbers (a gradient)")
            if any(isinstance(v, (Mapping, list)) for v in raw):
                self.f.wrong(
                    at, raw, "a number or a list of numbers (a gradient)", help="filters cannot be nested"
                )
            values = tuple(self.f.number((*at, k), v) for k, v in enumerate(raw))
            return values[0] if len(set(values)) == 1 else values
        if isinstance(raw, Mapping):
            self.f.wrong(
                at, raw, "a number or a list of numbers (a gradient)", help="filters cannot be nested"
            )
        return self.f.number(at, raw)

    def rules(self, name: str, model: _Model | None = None) -> list[_Rule]:
        """How mergekit looks a parameter up for a tensor: the model's own setting, then the
        top-level one, then the method's default; within each, the first entry whose filter is in
        the tensor's name."""
        per_model = name in self.method.per_model
        levels = []
        if model is not None and name in model.params:
            levels.append((*model.params_at, name))
        if name in self.globals:
            levels.append(("parameters", name))
        rules: list[_Rule] = []
        for at in levels:
            raw = model.params[name] if at[0] == "models" and model is not None else self.globals[name]
            rules.extend(self._rules_of(at, raw))
            if any(r.filter is None for r in rules):
                return rules[: next(i for i, r in enumerate(rules) if r.filter is None) + 1]
        default = (self.method.per_model if per_model else self.method.globals)[name]
        if default is REQUIRED:
            who = f"`{dotted(model.at[:2])}`" if model is not None else "the config"
            if rules:
                self.fail(
                    levels[-1],
                    f"`{name}` has no entry without a `filter:` for {who}: mergekit stops with "
                    f"'Missing required parameter {name}' on a tensor no filter matches",
                    help="end the list with an entry without a filter: `- value: ...`",
                )
            at_ = model.at[:2] if model is not None else ("parameters",)
            self.fail(
                at_,
                f"{who} has no `{name}`, which merge_method `{self.name}` needs",
                help=f"add `parameters: {{{name}: ...}}` to it, or a top-level `parameters: {{{name}: ...}}`"
                if model is not None
                else f"add `{name}: ...` under the top-level `parameters:`",
            )
        return [*rules, _Rule(None, float(default), ())]

    def number(self, name: str, model: _Model | None = None, label: str | None = None) -> _Num:
        """A parameter's value for every tensor.  One that differs between tensors is bound to a
        name (``weight_a``, or ``weight`` when it comes from the top-level setting), so the
        program spells it once."""
        rules = self.rules(name, model)
        text = _leaf_text(rules[-1].leaf)
        for r in reversed(rules[:-1]):
            t = _leaf_text(r.leaf)
            if t != text:
                assert r.filter is not None
                text = f"where({_match(r.filter)}, {t}, {text})"
        leaf = rules[-1].leaf
        if isinstance(leaf, float) and text == _num(leaf):
            return _Num(text, leaf)
        own = model is not None and name in model.params
        return _Num(self.bind(label or (f"{name}_{model.name}" if own and model is not None else name), text))

    def bind_def(self, label: str, params: Sequence[str], body: str, lines: list[str]) -> str:
        """``def label(params) = body`` as a line of ``lines`` (a fresh name), and that name."""
        line = f"({', '.join(params)}) = {body}"
        same = next((d for d in lines if d.startswith("def ") and d.split("(", 1)[1] == line[1:]), None)
        if same is not None:  # slices with one formula share one def
            return same[4:].split("(", 1)[0]
        while label in self.taken:
            label += "_"
        self.taken.add(label)
        lines.append(f"def {label}{line}")
        return label

    def bind(self, label: str, text: str) -> str:
        """``label = text`` as a line of the program (once), and the name it got."""
        while label in self.taken and self.bound.get(label) != text:
            label += "_"
        if label not in self.bound:
            self.taken.add(label)
            self.bound[label] = text
            self.params.append(f"{label} = {text}")
        return label

    def branch(self, rules: list[_Rule], what: str, make: Callable[[float, FieldPath], str]) -> str:
        """A where-chain over the filters of ``rules`` with ``make(value)`` at each leaf, for
        arguments tvlang needs as constants (DELLA's density and epsilon)."""
        for r in rules:
            if isinstance(r.leaf, tuple):
                self.fail(
                    r.at,
                    f"a gradient for `{what}` is not supported with `{self.name}`: tvlang's della takes one "
                    f"{what} per tensor group, known before any data is read",
                    help="give a number, or a list of `- {filter: ..., value: NUMBER}` entries",
                )
        text = make(rules[-1].leaf, rules[-1].at)  # type: ignore[arg-type]
        for r in reversed(rules[:-1]):
            t = make(r.leaf, r.at)  # type: ignore[arg-type]
            if t != text:
                assert r.filter is not None
                text = f"where({_match(r.filter)}, {t}, {text})"
        return text

    def flag(self, name: str) -> bool:
        if name not in self.globals:
            return bool(self.method.globals[name])
        value = self.globals[name]
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        self.f.wrong(("parameters", name), value, "true or false")

    def param(self, name: str, tv_name: str) -> _Num:
        """A global number: a ``param`` line when it is one given number (so ``--set`` and sweeps
        reach it), else the per-tensor expression."""
        value = self.number(name, label=tv_name)
        if value.const is None or name not in self.globals:
            return value
        self.params.append(f"param {tv_name} = {value.text}")
        return _Num(tv_name, value.const)

    # -- methods --------------------------------------------------------------------------------
    def _body(self) -> str:
        kind = self.method.kind
        for name in self.method.globals:
            if name in BOOLEANS:
                self.flag(name)  # checked even where it changes nothing
        if kind == "gta":
            return self._gta()
        if kind == "linear":
            return self._linear()
        if kind in ("slerp", "nearswap"):
            return self._pair(kind)
        if kind == "nuslerp":
            return self._nuslerp()
        if kind == "model_stock":
            return self._model_stock()
        if kind == "passthrough":
            return self._passthrough()
        if kind in ("sce", "ram", "ramplus"):
            return self._sce_ram(kind)
        if kind == "multislerp":
            return self._multislerp()
        if kind == "karcher":
            return self._karcher()
        (other,) = self._needs(1, exact=True)
        return f"output {OUTPUT} = arcee_fusion(base, {other.name})"

    def _sce_ram(self, kind: str) -> str:
        others = self._needs(1)
        deltas = [f"{o.name} - base" for o in others]
        if kind == "sce":
            if "int8_mask" in self.globals:
                self.notes.append("int8_mask changes only mergekit's mask dtype: tvlang's masks are exact")
            topk = self.number("select_topk", label="select_topk")
            extra = [] if topk.const == 1.0 else [f"select_topk={topk.text}"]
        else:
            extra = []
            defaults = {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5} if kind == "ramplus" else {"epsilon": 1e-5}
            for name, default in defaults.items():
                value = self.number(name, label=name)
                if value.const != default:
                    extra.append(f"{name}={value.text}")
        return f"output {OUTPUT} = base + " + _call(kind, [*deltas, *extra])

    def _multislerp(self) -> str:
        others = self._needs(1)
        weights = [self.number("weight", o) for o in others]
        operands = [o.name if self.base is None else f"{o.name} - base" for o in others]
        args = [*operands, "weights=[" + ", ".join(w.text for w in weights) + "]"]
        if not self.flag("normalize_weights"):
            args.append("normalize=0")
        eps = self.number("eps", label="eps")
        if eps.const != 1e-8:
            args.append(f"eps={eps.text}")
        merged = _call("multislerp", args)
        return f"output {OUTPUT} = {merged}" if self.base is None else f"output {OUTPUT} = base + {merged}"

    def _karcher(self) -> str:
        # mergekit averages the base model too, as one more operand
        models = ([self.base] if self.base is not None else []) + self.others()
        if len(models) < 2:
            self._needs(2)
        args = [m.name for m in models]
        for name, default, integer in (("max_iter", 10, True), ("tol", 1e-5, False)):
            value = self.number(name, label=name)
            if value.const is None or (integer and value.const != int(value.const)) or value.const < 0:
                self.fail(
                    ("parameters", name),
                    f"karcher's `{name}` must be a {'whole ' if integer else ''}number known before any data "
                    "is read, at least 0",
                )
            if value.const != default:
                args.append(f"{name}={_num(value.const)}")
        return f"output {OUTPUT} = " + _call("karcher", args)

    def _needs(self, count: int, exact: bool = False) -> list[_Model]:
        others = self.others()
        if (exact and len(others) != count) or len(others) < count:
            amount = f"exactly {count}" if exact else f"at least {count}"
            base = " besides the base model" if self.base is not None else ""
            self.fail(
                ("models",),
                f"merge_method `{self.name}` needs {amount} model(s){base}, not {len(others)}",
            )
        return others

    def _gta(self) -> str:
        m = self.method
        others = self._needs(1)
        if any(mm.name == "base" and mm.params for mm in self.models):
            self.notes.append(f"the base model's parameters are unused by {self.name}, as in mergekit")
        if "int8_mask" in self.globals:
            self.notes.append("int8_mask changes only mergekit's mask dtype: tvlang's masks are exact")
        normalize, rescale = self.flag("normalize"), self.flag("rescale")
        deltas = [_Operand(f"{o.name} - base", False) for o in others]
        weights = [self.number("weight", o) for o in others]
        # della takes its density as constants, in _della (no per-tensor name for it)
        density = [_Num("") if m.sparsify == "della" else self.number("density", o) for o in others]
        same_density = len({d.text for d in density}) == 1
        seed = f"seed={self.seed}"
        rescale_arg = 'rescale="l1"' if rescale else 'rescale="none"'
        divide = [] if normalize else ['divide="none"']
        wlist = "weights=[" + ", ".join(w.text for w in weights) + "]"
        merged: str | None = None
        if m.consensus and m.sparsify == "magnitude" and not rescale and same_density:
            extra = [] if density[0].const == 1.0 else [f"density={density[0].text}"]
            merged = _call("ties", [*(d.text for d in deltas), wlist, *extra, *divide], "")
        elif m.sparsify == "random" and same_density and (m.consensus or not normalize):
            fn = "dare_ties" if m.consensus else "dare_linear"
            args = [*(d.text for d in deltas), wlist, f"density={density[0].text}", seed]
            args += [] if rescale else [rescale_arg]
            merged = _call(fn, [*args, *(divide if m.consensus else [])])
        if merged is None:
            sparse = [
                self._sparsify(o, d, dens, seed, rescale_arg, rescale)
                for o, d, dens in zip(others, deltas, density, strict=True)
            ]
            if m.consensus:
                merged = _call("ties", [*(s.text for s in sparse), wlist, *divide])
            else:
                merged = _terms([_scale(w, s) for w, s in zip(weights, sparse, strict=True)])
                if normalize:
                    merged = self._normalized(merged, weights)
        lam = self.param("lambda", "lam")
        if lam.const == 1.0 and lam.text != "lam":
            return f"output {OUTPUT} = base + {merged}"
        inner = merged if _factor(merged) == merged else f"({merged})"
        return f"output {OUTPUT} = base + {_factor(lam.text)}*{inner}"

    def _sparsify(
        self, model: _Model, delta: _Operand, density: _Num, seed: str, rescale_arg: str, rescale: bool
    ) -> _Operand:
        sparse = self.method.sparsify
        if sparse is None or (density.const is not None and density.const >= 1.0):
            return delta  # mergekit returns the task vector as it is, unrescaled
        if sparse == "magnitude":
            kept = f"magnitude_prune({delta.text}, {density.text})"
        elif sparse == "outliers":
            kept = f"breadcrumbs({delta.text}, {density.text}, {self.number('gamma', model).text})"
        elif sparse == "random":
            p = f"1 - {_factor(density.text)}"  # tvlang's dare takes the drop probability
            return _Operand(f"dare({delta.text}, {p}, {seed}, {rescale_arg})", True)
        else:
            return _Operand(self._della(model, delta, seed, rescale_arg), True)
        if rescale:
            self.defs = [_L1_RESCALE]
            kept = f"l1_rescale({delta.text}, {kept})"
        return _Operand(kept, True)

    def _della(self, model: _Model, delta: _Operand, seed: str, rescale_arg: str) -> str:
        eps_rules = self.rules("epsilon", model)

        def with_density(d: float, d_at: FieldPath) -> str:
            def with_epsilon(e: float, e_at: FieldPath) -> str:
                if 0 < d < 1 and not (d - e > 0 and d + e < 1):
                    self.fail(
                        e_at or d_at or model.at,
                        f"density {_num(d)} ± epsilon {_num(e)} must lie in (0, 1) for della",
                        help="choose epsilon < min(density, 1 - density)",
                    )
                return f"della({delta.text}, {_num(d)}, {_num(e)}, {seed}, {rescale_arg})"

            return self.branch(eps_rules, "epsilon", with_epsilon)

        return self.branch(self.rules("density", model), "density", with_density)

    def _normalized(self, merged: str, weights: Sequence[_Num]) -> str:
        """Divided by the summed weights, which mergekit replaces by 1 below 1e-8 in magnitude."""
        if all(w.const is not None for w in weights):
            total = sum(w.const for w in weights if w.const is not None)
            if abs(total) < 1e-8 or total == 1.0:
                return merged
            return f"{_factor(merged)} / {_factor(_num(total))}"
        total_text = " + ".join(w.text for w in weights)
        return f"{_factor(merged)} / where(abs({total_text}) < 1e-8, 1, {total_text})"

    def _linear(self) -> str:
        weights = [self.number("weight", m) for m in self.models]
        names = [m.name for m in self.models]
        if self.base is not None and all(m.path != self.base.path for m in self.models):
            if "weight" not in self.globals:
                self.fail(
                    ("base_model",),
                    "mergekit's linear averages `base_model` in too when it is not under `models:`, and "
                    "it has no weight",
                    help="list it under `models:` with a weight, or drop `base_model:`",
                )
            weights.append(self.number("weight"))  # the top-level weight
            names.append("base")
        normalize = self.flag("normalize")
        if all(w.const is not None for w in weights):
            total = sum(w.const for w in weights if w.const is not None)
            if normalize and abs(total) < 1e-12:
                self.fail(
                    ("models",), "the weights sum to zero: mergekit's normalised average divides by zero"
                )
            args = [*names, "weights=[" + ", ".join(w.text for w in weights) + "]"]
            if not normalize and abs(total - 1.0) > 1e-9:
                if abs(total) < 1e-12:
                    self.fail(
                        ("parameters", "normalize"),
                        "with `normalize: false` and weights that sum to zero the result is a task vector, "
                        "not a model",
                        help="write the difference in a program (`output d = a - b` is a task vector to "
                        "add to a model), or give the weights a non-zero sum",
                    )
                # Σ wᵢmᵢ = W·(Σ wᵢmᵢ / W): the average scaled as a whole, as passthrough's `scale` does
                return f"output {OUTPUT} = scale(" + _call("linear", args) + f", {_num(total)})"
            return f"output {OUTPUT} = " + _call("linear", args if normalize else [*args, "normalize=0"])
        if not normalize:
            self.fail(
                ("parameters", "normalize"),
                "per-tensor weights (gradients or filters) need `normalize: true`: otherwise the "
                "weights need not sum to 1 and the result is not a model",
            )
        # Σ wᵢmᵢ / Σ wᵢ = m₀ + Σ_{i>0} (wᵢ / Σ w)(mᵢ - m₀): a model scaled only through task vectors
        wsum = "(" + " + ".join(w.text for w in weights) + ")"
        terms = [
            f"({w.text} / {wsum})*({n} - {names[0]})" for w, n in zip(weights[1:], names[1:], strict=True)
        ]
        return f"output {OUTPUT} = " + _terms([names[0], *terms])

    def _pair(self, kind: str) -> str:
        (other,) = self._needs(1, exact=True)
        t = self.param("t", "t")
        if kind == "nearswap" and t.const is not None and t.const <= 0:
            self.fail(("parameters", "t"), f"nearswap's threshold t must be above 0, not {_num(t.const)}")
        return f"output {OUTPUT} = {kind}(base, {other.name}, {t.text})"

    def _nuslerp(self) -> str:
        per = ""  # mergekit's flatten wins over row_wise; row_wise means one vector per column (dim 0)
        if not self.flag("nuslerp_flatten"):
            per = ', per="column"' if self.flag("nuslerp_row_wise") else ', per="row"'
        first, second = self._needs(2, exact=True)
        w0, w1 = self.number("weight", first), self.number("weight", second)
        if w0.const is not None and w1.const is not None:
            total = w0.const + w1.const
            t = _num(0.5 if abs(total) < 1e-6 else w1.const / total)
        else:
            total_text = f"{w0.text} + {w1.text}"
            t = self.bind(
                "t",
                f"where(abs({total_text}) < 1e-6, 0.5, {_factor(w1.text)} / where(abs({total_text}) < 1e-6, 1, {total_text}))",
            )
        if self.base is None:
            return f"output {OUTPUT} = nuslerp({first.name}, {second.name}, {t}{per})"
        return f"output {OUTPUT} = base + nuslerp({first.name} - base, {second.name} - base, {t}{per})"

    def _passthrough(self) -> str:
        """mergekit's passthrough: one model's tensors as they are, each times its ``scale``."""
        everyone = list(self.models)
        if self.base is not None and all(m.path != self.base.path for m in everyone):
            everyone.append(self.base)  # mergekit adds the base model to the tensors it gathers
        if len(everyone) != 1:
            self.fail(
                ("models",),
                f"merge_method `passthrough` takes exactly one model, not {len(everyone)}: mergekit stops with "
                "'Passthrough merge expects exactly one tensor'",
                help="to stack layer ranges of several models, use `slices:` (one source per slice)",
            )
        (model,) = everyone
        factor = self.number("scale", model if model in self.models else None)
        if factor.const == 1.0:
            return f"output {OUTPUT} = {model.name}"
        return f"output {OUTPUT} = scale({model.name}, {factor.text})"

    def _model_stock(self) -> str:
        others = self._needs(2)
        per = ['per="row"'] if self.flag("filter_wise") else []
        return f"output {OUTPUT} = " + _call("model_stock", ["base", *(o.name for o in others), *per])

    # -- output ---------------------------------------------------------------------------------
    def _dtype(self) -> str | None:
        """The output dtype: mergekit writes ``out_dtype``, else ``dtype`` (in which it also computes)."""
        codes = {}
        for key in ("dtype", "out_dtype"):
            value = self.data.get(key)
            if value is None:
                continue
            text = self.f.string((key,), value)
            code = DTYPES.get(text.lower().removeprefix("torch."))
            if code is None:
                self.fail(
                    (key,),
                    f"`{key}` {text!r} is not a float dtype tvlang writes",
                    help="one of " + ", ".join(DTYPES),
                )
            codes[key] = code
        if "dtype" in codes:
            self.notes.append(
                f"mergekit computes in {self.data['dtype']}; tvlang accumulates in float32 (float64 when an "
                "input or the output is 32-bit) and rounds once to the output dtype"
            )
        return codes.get("out_dtype", codes.get("dtype"))

    def _chat_template(self) -> str | None:
        """mergekit's ``chat_template:`` (auto, chatml, or a template's text), checked here so that
        a bad one is reported at its line."""
        raw = self.data.get("chat_template")
        if raw is None:
            return None
        text = self.f.string(("chat_template",), raw)
        try:
            check_chat_template(text)
        except TvParamError as e:
            self.fail(("chat_template",), e.message, help=e.help)
        return text

    def _assemble(self, body: str, dtype: str | None) -> Translation:
        everyone = ([self.base] if self.base is not None else []) + [
            m for m in self.models if m.name != "base"
        ]
        everyone += self.vocab_models
        models, adapters, renamed = self._split_loras({m.name: m.path for m in everyone})
        where = {
            f"bindings.{renamed.get(m.name, m.name)}": span
            for m in everyone
            if (span := self.f.span(m.at)) is not None
        }
        where.update({f"expression:{call}": span for call, span in self.calls.items()})
        lines = [*(line for line, _ in adapters), *self.defs, *self.params, *self.vocab_lines, body]
        body_text = "\n".join([*(job_line for _, job_line in adapters), *lines[len(adapters) :]]) + "\n"
        source = os.path.basename(self.f.name)
        header = [
            f"# {source} (mergekit, merge_method: {self.name}), translated by `tvlang import-mergekit`."
        ]
        if dtype is not None:
            given = self.data.get("out_dtype") or self.data.get("dtype")
            header.append(f"# mergekit writes {given}: run this program with `--dtype {dtype}`.")
        template = self._chat_template()
        if template is not None:
            flag = f"--chat-template {template}" if template in CHAT_TEMPLATES else "--chat-template TEMPLATE"
            header.append(f"# mergekit sets the output's chat template: run this program with `{flag}`.")
        if self.method.sparsify in ("random", "della"):
            self.notes.append(
                f"the random masks come from tvlang's seeded generator (seed={self.seed}), not torch's: "
                "they are not mergekit's draws"
            )
        header += [f"# Note: {n}." for n in self.notes]
        loads = [f"{n} = load({_string(self._load_path(p))})" for n, p in models.items()]
        program = "\n".join([*header, *loads, *lines]) + "\n"
        return Translation(
            program=program,
            body=body_text,
            models=models,
            dtype=dtype,
            method=self.name,
            chat_template=template,
            name=self.f.name,
            base_dir=self.f.base_dir,
            notes=tuple(self.notes),
            where=where,
            warnings=tuple(self.warnings),
        )

    def _load_path(self, path: str) -> str:
        if self.out_dir is None:
            return path
        return os.path.relpath(path, self.out_dir)


# -- layer structure: slices, modules ------------------------------------------------------------

SLICE_FIELDS = ("sources", "base_model", "parameters", "residual_weight")
SOURCE_FIELDS = ("model", "layer_range", "parameters")


class _RemappedFields(_MkFields):
    """The fields of a slice read as if they were a whole config's (``models[j]`` is the slice's
    ``sources[j]``), with errors pointing at where each one really is."""

    def __init__(self, parent: _MkFields, remap: Callable[[FieldPath], FieldPath]) -> None:
        super().__init__(parent.name, parent.base_dir, parent.source, parent.marks)
        self.remap = remap

    def span(self, path: FieldPath, *, key: bool = False) -> Span | None:
        return super().span(self.remap(path), key=key)


@dataclass(frozen=True)
class _Source:
    path: str
    lo: int
    hi: int
    at: FieldPath  # the source's place in the config


class _Structure:
    """``slices:`` (and ``modules:`` with one module) as a stack of layer ranges.

    Each slice becomes ``layers(model, lo, hi)`` when it is one source passed through, else a
    ``def`` holding the method's formula over its sources' ranges, called with them: the
    method's parameters, gradients included, are looked up per slice as mergekit does (source,
    slice, module, top level) and gradients run over the slice's own layers.  The slices stack
    with ``stack()``: embeddings from the first slice, final norm and head from the last."""

    def __init__(self, top: _Translator) -> None:
        self.top = top
        self.f = top.f

    def body(self) -> str:
        top, data = self.top, self.top.data
        given = [k for k in ("models", "slices", "modules") if k in data]
        if len(given) != 1:
            top.fail(
                (given[-1],),
                "a mergekit config has exactly one of `models:`, `slices:` and `modules:`, not "
                + " and ".join(f"`{k}:`" for k in given),
                key=True,
                help="mergekit refuses such a config too: keep the one that says what to merge",
            )
        prefix: FieldPath = ()
        module_params: Mapping[str, Any] = {}
        raw = data.get("slices")
        if "modules" in data:
            prefix, raw, module_params = self._module()
        at = (*prefix, "slices")
        if raw is None:  # a module with `models:`: the whole models, merged as a config without slices
            return self._models_module(prefix, module_params)
        if not isinstance(raw, list) or not raw:
            self.f.wrong(at, raw, "a non-empty list of slices (`- sources: [...]`)")
        slices = [self._slice((*at, i), item) for i, item in enumerate(raw)]
        models = self._name(slices)
        lines: list[str] = []
        segments = [
            self._segment(at, i, item, sources, models, module_params, lines)
            for i, (item, sources) in enumerate(slices)
        ]
        out = segments[0] if len(segments) == 1 else _call("stack", segments)
        return "\n".join([*lines, f"output {OUTPUT} = {out}"])

    # -- the pieces -----------------------------------------------------------------------------
    def _module(self) -> tuple[FieldPath, Any, Mapping[str, Any]]:
        raw = self.f.mapping(("modules",), self.top.data["modules"])
        if len(raw) != 1:
            self.top.fail(
                ("modules",),
                f"`modules:` with {len(raw)} modules: tvlang merges models of one module (a decoder); "
                "per-module tensor prefixes of multi-module models are not known to it",
                help="write the one module's `slices:` or `models:` at the top level",
            )
        ((name, module),) = raw.items()
        prefix: FieldPath = ("modules", str(name))
        module = self.f.mapping(prefix, module)
        self.f.keys(prefix, module, ("slices", "models", "parameters"))
        if ("slices" in module) == ("models" in module):
            self.top.fail(prefix, f"module `{name}` needs exactly one of `slices:` and `models:`")
        params = self.f.mapping((*prefix, "parameters"), module.get("parameters"))
        return prefix, module.get("slices"), params

    def _models_module(self, prefix: FieldPath, module_params: Mapping[str, Any]) -> str:
        """A module given as ``models:``: the config without modules."""
        top = self.top
        module = top.data["modules"][prefix[1]]
        sub = _SliceTranslator(
            top,
            _RemappedFields(self.f, lambda p: _module_path(p, prefix, module_params)),
            {
                **{k: v for k, v in top.data.items() if k != "modules"},
                "models": module["models"],
                "parameters": _layered_params([module_params, top.globals]),
            },
        )
        sub.models = sub._models()
        sub._name_models()
        top.models, top.base = sub.models, sub.base
        return sub._body()

    def _slice(self, at: FieldPath, item: Any) -> tuple[Mapping[str, Any], list[_Source]]:
        item = self.f.mapping(at, item)
        self.f.keys(at, item, SLICE_FIELDS)
        if "residual_weight" in item:
            self.top.fail(
                (*at, "residual_weight"),
                "a slice's `residual_weight` is not supported",
                key=True,
                help="mergekit's planner does not read it either; delete the field",
            )
        raw = item.get("sources")
        if not isinstance(raw, list) or not raw:
            self.f.wrong(
                (*at, "sources"), raw, "a non-empty list of `- model: PATH` with `layer_range: [start, stop]`"
            )
        sources = []
        for j, src in enumerate(raw):
            sat: FieldPath = (*at, "sources", j)
            src = self.f.mapping(sat, src)
            self.f.keys(sat, src, SOURCE_FIELDS)
            for need in ("model", "layer_range"):
                if need not in src:
                    self.top.fail(sat, f"`{dotted(sat)}` needs a `{need}:`")
            path = self.top._reference((*sat, "model"), src["model"])
            rng = src["layer_range"]
            if (
                not isinstance(rng, list)
                or len(rng) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
                or not 0 <= rng[0] < rng[1]
            ):
                self.f.wrong(
                    (*sat, "layer_range"), rng, "a range `[start, stop]` of layers, 0 <= start < stop"
                )
            sources.append(_Source(path, rng[0], rng[1], sat))
        lengths = [s.hi - s.lo for s in sources]
        for s, n in zip(sources, lengths, strict=True):
            if n != lengths[0]:
                self.top.fail(
                    (*s.at, "layer_range"),
                    f"this source has {n} layers and the slice's first {lengths[0]}: mergekit stops with "
                    "'All inputs to a slice must contain the same number of layers'",
                )
        return item, sources

    def _name(self, slices: list[tuple[Mapping[str, Any], list[_Source]]]) -> dict[str, str]:
        """Every model any slice reads, named once (the base model ``base``): path → name."""
        top = self.top
        seen: dict[str, _Model] = {}
        for _, sources in slices:
            for s in sources:
                if s.path not in seen:
                    seen[s.path] = _Model(s.path, (*s.at, "model"), {}, (*s.at, "parameters"))
        top.models = list(seen.values())
        top._name_models()
        return {m.path: m.name for m in top.models} | ({top.base.path: "base"} if top.base else {})

    def _segment(
        self,
        at: FieldPath,
        i: int,
        item: Mapping[str, Any],
        sources: list[_Source],
        models: Mapping[str, str],
        module_params: Mapping[str, Any],
        lines: list[str],
    ) -> str:
        top = self.top
        ranges = [f"layers({models[s.path]}, {s.lo}, {s.hi})" for s in sources]
        for r, s in zip(ranges, sources, strict=True):
            span = self.f.span((*s.at, "layer_range"))
            if span is not None:
                top.calls.setdefault(r, span)
        raw_sources = [_raw_source(top.data, s.at) for s in sources]
        levels = [self.f.mapping((*at, i, "parameters"), item.get("parameters")), module_params, top.globals]
        if top.method.kind == "passthrough" and len(sources) == 1:
            own = self.f.mapping((*sources[0].at, "parameters"), raw_sources[0].get("parameters"))
            if not any("scale" in level for level in (own, *levels)):
                return ranges[0]  # the layers as they are
        slice_at: FieldPath = (*at, i)
        data: dict[str, Any] = {
            "merge_method": top.name,
            "models": [{k: r[k] for k in ("model", "parameters") if k in r} for r in raw_sources],
            "parameters": _layered_params(levels),
        }
        base_at: FieldPath = (*slice_at, "base_model") if "base_model" in item else ("base_model",)
        base_ref = item.get("base_model", top.data.get("base_model"))
        if base_ref is not None and top.method.kind != "passthrough":
            if top._reference(base_at, base_ref) in {s.path for s in sources}:
                data["base_model"] = base_ref
            elif top.method.base == "required":
                top.fail(
                    base_at,
                    f"the base model is not among the sources of slice {i}: mergekit reads its layers "
                    "from the slice's sources",
                    help="add the base model to the slice's `sources:`, with a `layer_range` of the same length",
                )
        slice_params = levels[0]
        sub = _SliceTranslator(
            top,
            _RemappedFields(self.f, lambda p: _slice_path(p, slice_at, slice_params, at[:-1], module_params)),
            data,
        )
        sub.models = sub._models()
        for m in sub.models:  # the names the whole program uses ("base" inside the slice's def)
            m.name = "base" if sub.base is not None and m.path == sub.base.path else models[m.path]
        expr = sub._body().removeprefix(f"output {OUTPUT} = ")
        name = top.bind_def(f"slice{i}", [m.name for m in sub.models], expr, lines)
        return _call(name, ranges, "    ")


class _SliceTranslator(_Translator):
    """A method's formula over one slice's sources: the parent's names, helpers and parameter lines
    are shared, and single-number parameters stay inline (a program has one `param t`)."""

    def __init__(self, top: _Translator, f: _MkFields, data: Mapping[str, Any]) -> None:
        super().__init__(f, data, top.out_dir, top.seed)
        self.notes, self.defs, self.params = top.notes, top.defs, top.params
        self.taken, self.bound, self.loras, self.calls = top.taken, top.bound, top.loras, top.calls
        self.name, self.method = top.name, top.method
        self.globals = self._parameters(("parameters",), data.get("parameters"), per_model=False)
        self.base = self._base()

    def param(self, name: str, tv_name: str) -> _Num:
        return self.number(name, label=tv_name)


def _raw_source(data: Mapping[str, Any], at: FieldPath) -> Mapping[str, Any]:
    node: Any = data
    for k in at:
        node = node[k]
    return node  # type: ignore[no-any-return]


def _layered_params(levels: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Parameters looked up level by level (slice, module, top level) as one level: a conditional
    list without a catch-all entry continues with the next level's setting, as mergekit's lookup does."""
    merged: dict[str, Any] = {}
    for name in dict.fromkeys(k for level in levels for k in level):
        values = [level[name] for level in levels if name in level]
        if len(values) == 1 or not _conditional(values[0]) or _catch_all(values[0]):
            merged[name] = values[0]
            continue
        chain = list(values[0])
        for value in values[1:]:
            if not _conditional(value):
                chain.append({"value": value})
                break
            chain.extend(value)
            if _catch_all(value):
                break
        merged[name] = chain
    return merged


def _conditional(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, Mapping) for x in value)


def _catch_all(value: list[Mapping[str, Any]]) -> bool:
    return any(x.get("filter") in (None, "", "*") for x in value)


def _slice_path(
    p: FieldPath,
    slice_at: FieldPath,
    slice_params: Mapping[str, Any],
    prefix: FieldPath,
    module_params: Mapping[str, Any],
) -> FieldPath:
    """Where a field of the config synthesised for one slice is in the real config."""
    if p[:1] == ("models",):
        return (*slice_at, "sources", *p[1:])
    if p[:1] == ("parameters",) and len(p) > 1:
        if p[1] in slice_params:
            return (*slice_at, *p)
        if p[1] in module_params:
            return (*prefix, *p)
    if p == ("base_model",):
        return (*slice_at, "base_model")
    return p if p[:1] in (("parameters",), ("merge_method",)) else slice_at


def _module_path(p: FieldPath, prefix: FieldPath, module_params: Mapping[str, Any]) -> FieldPath:
    if p[:1] == ("models",) or (p[:1] == ("parameters",) and len(p) > 1 and p[1] in module_params):
        return (*prefix, *p)
    return p


def _close(word: str, choices: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean `{close[0]}`?" if close else f"{what}: " + ", ".join(choices)


__all__ = ["METHODS", "Translation", "load_config", "mergekit_job", "translate"]
