"""Fields of configuration files: values checked with errors that name the field and point at it.

Job files (:mod:`tvlang.config`) and mergekit configs (:mod:`tvlang.mergekit`) are both plain data
read from YAML or JSON.  The readers here keep every field's position in the text, so that a wrong
value anywhere in the schema is reported at its place in the file, not just by name.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any, NoReturn

from tvlang.errors import TvParamError
from tvlang.lowering.lower import ParamValue
from tvlang.options import parse_size
from tvlang.source import SourceText, Span

FieldPath = tuple[str | int, ...]
Marks = dict[FieldPath, tuple[int, int, int, int]]  # key start, key end, value start, value end
MAX_MARKS = 1 << 16  # a config is a few lines; stop recording positions (only errors use them) beyond this


def dotted(path: FieldPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def describe(value: Any) -> str:
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


def did_you_mean(word: str, choices: tuple[str, ...], what: str) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"did you mean `{close[0]}`?" if close else f"{what}: " + ", ".join(choices)


class Fields:
    """Validates fields and raises errors that name them and, where the text is known, point at them."""

    def __init__(
        self, name: str, base_dir: str, source: SourceText | None = None, marks: Marks | None = None
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
        self.fail(path, f"`{dotted(path)}` must be {expected}, not {describe(value)}", help=help)

    def expect(self, path: FieldPath, value: Any, ok: bool, expected: str, help: str | None = None) -> None:
        if not ok:
            self.wrong(path, value, expected, help)

    def keys(self, path: FieldPath, data: Mapping[Any, Any], allowed: tuple[str, ...]) -> None:
        for k in data:
            if not isinstance(k, str):
                self.fail((*path, str(k)), f"field names must be strings, not {describe(k)}", key=True)
            if k not in allowed:
                where = f"`{dotted((*path, k))}`" if path else f"`{k}`"
                self.fail(
                    (*path, k), f"unknown field {where}", key=True, help=did_you_mean(k, allowed, "fields")
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
                f"`{dotted(path)}` must be one of {', '.join(choices)}, not {value!r}",
                help=did_you_mean(value, choices, "choices"),
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
                return max(1, parse_size(value, f"`{dotted(path)}`"))
            except TvParamError as e:
                self.fail(path, e.message, help=e.help)
        return self.integer(path, value)


# -- reading files, with the position of every field ----------------------------------------------


def syntax_error(source: SourceText, pos: int, message: str, end: int | None = None) -> TvParamError:
    pos = min(max(pos, 0), len(source.text))
    span = Span(source, pos, max(pos + 1, end or 0))
    return TvParamError(f"{source.name} is not valid: {message}", span, code="E406")


def read_yaml(source: SourceText, depth: int) -> tuple[Any, Marks]:
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
        raise syntax_error(source, mark.index if mark else 0, str(e.problem or e.context)) from None
    except yaml.YAMLError as e:
        raise syntax_error(source, 0, str(e)) from None
    except RecursionError:
        raise syntax_error(source, 0, "nested too deeply") from None
    finally:
        loader.dispose()
    marks: Marks = {}

    def walk(n: Any, path: FieldPath) -> None:
        if len(path) >= depth or len(marks) > MAX_MARKS:  # aliases could make a deep walk exponential
            return
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                if not isinstance(k, yaml.ScalarNode):
                    continue
                p = (*path, k.value)
                if p in marks:
                    raise syntax_error(
                        source, k.start_mark.index, f"`{dotted(p)}` is given twice", k.end_mark.index
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


def read_json(source: SourceText, depth: int) -> tuple[Any, Marks]:
    text = source.text
    try:
        data = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as e:
        raise syntax_error(source, e.pos, e.msg) from None
    except RecursionError:
        raise syntax_error(source, 0, "nested too deeply") from None
    marks: Marks = {}
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
                raise syntax_error(source, key_start, f"`{dotted(p)}` is given twice", key_end)
            marks[p] = (key_start, key_end if key_end >= 0 else end, start, end)
            i, n = skip(end), n + 1
            if text[i] == ",":
                i = skip(i + 1)
        return i + 1

    if data is not None:
        value(0, ())
    return data, marks


__all__ = [
    "FieldPath",
    "Fields",
    "Marks",
    "describe",
    "did_you_mean",
    "dotted",
    "read_json",
    "read_yaml",
    "syntax_error",
]
