"""mergekit configs: translate a mergekit merge YAML into an equivalent tvlang program.

``tvlang import-mergekit merge.yml`` prints the program (``-o merge.tv`` writes it), and
``tvlang run merge.yml -o out/`` runs it: a job file with a top-level ``merge_method:`` is read as
mergekit's.  Each method becomes the tvlang method, or composition of methods, that computes what
mergekit computes; per-model parameters given as gradients or with filters become per-tensor
numbers (``gradient([...])``, ``where(matches("*mlp*"), a, b)``), resolved before any data is read.
See ``docs/mergekit.md`` for the mapping and for where the results differ.

Anything tvlang cannot reproduce (``slices:``, ``modules:``, tokenizer surgery, LoRA and Hub
references, unknown methods or parameters) is a :class:`TvParamError` ``E407`` that names the field
and points at it in the YAML; nothing is dropped without a word.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn

from tvlang.api import Options, Program
from tvlang.builtins import BUILTINS
from tvlang.config import (
    FieldPath,
    Job,
    _dotted,
    _Fields,
    _read_json,
    _read_yaml,
    _what,
)
from tvlang.errors import TvInputError, TvParamError
from tvlang.lower import Bound
from tvlang.source import Source, Span

MARK_DEPTH = 8  # models[i].parameters.NAME[j].value[k] is the deepest field a mergekit config has
CODE = "E407"
OUTPUT = "merged"
REQUIRED: Any = object()

TOP_LEVEL = ("merge_method", "models", "base_model", "parameters", "dtype", "out_dtype")
UNSUPPORTED_TOP_LEVEL = {
    "slices": "tvlang merges whole models of one shape, tensor by tensor: it cannot stack or cut layer "
    "ranges (a frankenmerge)",
    "modules": "tvlang merges whole models: per-module `slices:`/`models:` are not supported",
    "tokenizer_source": "tvlang does not rebuild tokenizers or permute embeddings; it copies the base "
    "model's tokenizer files",
    "tokenizer": "tvlang does not rebuild tokenizers or permute embeddings; it copies the base model's "
    "tokenizer files",
    "chat_template": "tvlang does not write chat templates; it copies the base model's tokenizer files",
}
OTHER_METHODS = ("passthrough", "sce", "karcher", "multislerp", "arcee_fusion", "task_arithmetic_sce")
BOOLEANS = ("int8_mask", "normalize", "rescale", "nuslerp_flatten", "nuslerp_row_wise", "filter_wise")
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
_RESERVED = {*BUILTINS, "param", "output", "def", "base", "lam", "t", OUTPUT, "l1_rescale"}
_L1_RESCALE = (
    "def l1_rescale(d, kept) = where(max(sum(abs(d)) < 1e-7, sum(abs(kept)) < 1e-7), 1, "
    "sum(abs(d)) / max(sum(abs(kept)), 1e-7)) * kept"
)


@dataclass(frozen=True)
class _Method:
    kind: str  # gta | linear | slerp | nearswap | nuslerp | model_stock
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
}


@dataclass(frozen=True)
class Translation:
    """A mergekit config as a tvlang program.

    ``program`` is the complete ``.tv`` text; ``body`` is the same program without its ``load()``
    lines, for the caller to bind ``models`` (name → absolute checkpoint path) instead, so that a
    missing checkpoint is reported at its ``model:`` line in the YAML (``where``).  ``dtype`` is
    the output dtype (``--dtype``) from mergekit's ``out_dtype`` or ``dtype``, or None."""

    program: str
    body: str
    models: Mapping[str, str]
    dtype: str | None
    method: str
    name: str = "<mergekit>"
    base_dir: str = "."
    notes: tuple[str, ...] = ()
    where: Mapping[str, Span] = field(default_factory=dict, compare=False, repr=False)

    def job(self) -> Job:
        """The job ``tvlang run merge.yml`` runs: the body, with the models bound by name."""
        return Job(
            program=None,
            expression=self.body,
            bindings={n: Bound(p, "model") for n, p in self.models.items()},
            params={},
            output=None,
            options=replace(Options(), dtype=self.dtype),
            name=self.name,
            base_dir=self.base_dir,
            where=dict(self.where),
        )

    def compile(self) -> Program:
        return self.job().compile()


class _MkFields(_Fields):
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
        source = Source(spec, source_name)
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


def mergekit_job(f: _Fields, data: Mapping[str, Any]) -> Job:
    """The job for a mergekit config met where a tvlang job was expected (``tvlang run merge.yml``,
    :func:`tvlang.config.run_job`)."""
    mk = _MkFields(f.name, f.base_dir, f.source, f.marks)
    job = _Translator(mk, data, None, 0).translate().job()
    return replace(job, mergekit_config=mergekit_text(f.source, data))


def mergekit_text(source: Source | None, data: Mapping[str, Any]) -> str:
    """The config as the model card shows it: the file's text, or the mapping written as JSON
    (which YAML reads too)."""
    if source is not None:
        return source.text
    return json.dumps(data, indent=2, default=str)


def _read(source: Source) -> tuple[Any, dict[FieldPath, tuple[int, int, int, int]]]:
    reader = _read_json if source.name.lower().endswith(".json") else _read_yaml
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
        self.defs: list[str] = []
        self.params: list[str] = []  # `param` lines and the names of per-tensor numbers
        self.taken = set(_RESERVED) - {"lam", "t"}  # names in the program (`lam` and `t` are for parameters)
        self.bound: dict[str, str] = {}  # per-tensor number bound to a name → its expression

    # -- checks --------------------------------------------------------------------------------
    def fail(self, path: FieldPath, message: str, *, key: bool = False, help: str | None = None) -> NoReturn:
        self.f.fail(path, message, key=key, help=help)

    def translate(self) -> Translation:
        f, data = self.f, self.data
        if not isinstance(data, Mapping):
            self.fail((), f"a mergekit config is a mapping of fields, not {_what(data)}")
        for k in data:
            if not isinstance(k, str):
                self.fail((str(k),), f"field names must be strings, not {_what(k)}", key=True)
            if k in UNSUPPORTED_TOP_LEVEL:
                self.fail(
                    (k,), f"mergekit's `{k}:` is not supported", key=True, help=UNSUPPORTED_TOP_LEVEL[k]
                )
            if k not in TOP_LEVEL:
                self.fail(
                    (k,),
                    f"unknown mergekit field `{k}`",
                    key=True,
                    help=_close(k, (*TOP_LEVEL, *UNSUPPORTED_TOP_LEVEL), "fields"),
                )
        if "merge_method" not in data:
            self.fail((), "a mergekit config needs `merge_method:`", help="supported: " + ", ".join(METHODS))
        name = f.string(("merge_method",), data["merge_method"])
        if name not in METHODS:
            if name in OTHER_METHODS:
                message = f"mergekit's merge_method `{name}` is not supported by tvlang yet"
            else:
                message = f"unknown merge_method `{name}`"
            self.fail(("merge_method",), message, help="supported: " + ", ".join(METHODS))
        self.name, self.method = name, METHODS[name]
        self.globals = self._parameters(("parameters",), data.get("parameters"), per_model=False)
        self.base = self._base()
        self.models = self._models()
        self._name_models()
        body = self._body()
        dtype = self._dtype()
        return self._assemble(body, dtype)

    def _parameters(self, at: FieldPath, raw: Any, *, per_model: bool) -> dict[str, Any]:
        params = self.f.mapping(at, raw)
        known = (*self.method.globals, *self.method.per_model)
        for k in params:
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
        if "+" in text:
            self.fail(
                at,
                f"`{text}` names a LoRA (`model+lora`): applying LoRA adapters is not supported",
                help="merge the adapter into its model first (PEFT's merge_and_unload) and give that path",
            )
        if "@" in text or (_HUB_ID.fullmatch(text) and not text.startswith(".")):
            # a Hugging Face Hub id (with or without @revision): read from the local cache (docs/language.md)
            return "hf://" + text
        return path  # missing: reported (E300) at this line when run

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
                self.fail(at, f"`{_dotted(at)}` needs a `model:`")
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

    def others(self) -> list[_Model]:
        """The models besides the base, in config order."""
        return [m for m in self.models if m.name != "base"]

    # -- parameters -----------------------------------------------------------------------------
    def _rules_of(self, at: FieldPath, raw: Any) -> list[_Rule]:
        if isinstance(raw, Mapping):
            self.fail(
                at,
                f"`{_dotted(at)}` is a single mapping: mergekit's conditional parameters are a list",
                help="write `- {filter: self_attn, value: 0.5}` entries, the last one without a filter",
            )
        if isinstance(raw, list) and raw and all(isinstance(x, Mapping) for x in raw):
            rules = []
            for j, item in enumerate(raw):
                self.f.keys((*at, j), item, ("filter", "value"))
                if "value" not in item:
                    self.fail((*at, j), f"`{_dotted((*at, j))}` needs a `value:`")
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
            who = f"`{_dotted(model.at[:2])}`" if model is not None else "the config"
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
        return self._model_stock()

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
            if not normalize and abs(total - 1.0) > 1e-9:
                self.fail(
                    ("parameters", "normalize"),
                    f"with `normalize: false` the weights must sum to 1 (they sum to {_num(total)}): a tvlang "
                    "output is an affine combination of models",
                    help="normalise them, or express the scaling as a task vector with task_arithmetic",
                )
            args = [*names, "weights=[" + ", ".join(w.text for w in weights) + "]"]
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
        if not self.flag("nuslerp_flatten"):
            self.fail(
                ("parameters", "nuslerp_flatten"),
                "row- or column-wise nuslerp (`nuslerp_flatten: false`) is not built in tvlang",
                help="tvlang's nuslerp interpolates whole tensors (mergekit's default)",
            )
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
            return f"output {OUTPUT} = nuslerp({first.name}, {second.name}, {t})"
        return f"output {OUTPUT} = base + nuslerp({first.name} - base, {second.name} - base, {t})"

    def _model_stock(self) -> str:
        if self.flag("filter_wise"):
            self.fail(
                ("parameters", "filter_wise"),
                "filter-wise model_stock (`filter_wise: true`) is not built in tvlang",
                help="tvlang's model_stock measures the angle over the whole tensor (mergekit's default)",
            )
        others = self._needs(2)
        return f"output {OUTPUT} = " + _call("model_stock", ["base", *(o.name for o in others)])

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

    def _assemble(self, body: str, dtype: str | None) -> Translation:
        everyone = ([self.base] if self.base is not None else []) + [
            m for m in self.models if m.name != "base"
        ]
        models = {m.name: m.path for m in everyone}
        where = {f"bindings.{m.name}": span for m in everyone if (span := self.f.span(m.at)) is not None}
        lines = [*self.defs, *self.params, body]
        body_text = "\n".join(lines) + "\n"
        source = os.path.basename(self.f.name)
        header = [
            f"# {source} (mergekit, merge_method: {self.name}), translated by `tvlang import-mergekit`."
        ]
        if dtype is not None:
            given = self.data.get("out_dtype") or self.data.get("dtype")
            header.append(f"# mergekit writes {given}: run this program with `--dtype {dtype}`.")
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
            name=self.f.name,
            base_dir=self.f.base_dir,
            notes=tuple(self.notes),
            where=where,
        )

    def _load_path(self, path: str) -> str:
        if self.out_dir is None:
            return path
        return os.path.relpath(path, self.out_dir)


def _close(word: str, choices: Sequence[str], what: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean `{close[0]}`?" if close else f"{what}: " + ", ".join(choices)


__all__ = ["METHODS", "Translation", "load_config", "mergekit_job", "translate"]
