"""The parse cache (tvlang/syntax/cached.py): a cached AST equals Lark's, spans included, so every
later message is the same; a bad entry is a miss; no cache is no caching, not an error."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tvlang.errors import TvError, TvSyntaxError
from tvlang.lowering.lower import lower
from tvlang.source import SourceText, Span
from tvlang.syntax import ast, cached, lalr
from tvlang.syntax.parser import parse

from .test_check import ERROR_CASES

ROOT = Path(__file__).resolve().parents[1]

# Every form of the grammar; with examples/**/*.tv, every node type (checked below).
CORPUS = (
    "base + 0.4*(amazon_sent - amazon_lm + yelp_lm) - toxic",
    "-2**2 + +a / 3e-2 - .5",
    "where(abs(d) >= 0.5, d, 0) != x",
    "ties([a - b, c - b], weights=[0.5, 0.25,], density=0.5,)",
    "load('x\\'y') + load(\"a\\\\b\\n\")",
    "# a comment\n\nparam lam = 0.4\nout = base + lam*(\n    x - base\n)\noutput o = out \\\n  + 0\n",
    "def half(a, b, w=0.5,) = w*a + (1 - w)*b\ndef none() = 1\noutput o = half(x, y)\n",
    'vocab union, base=base, pad_to=64\ntoken "<|im_end|>" = chat, force\ntoken "a" = m["b"]\n'
    'token "c" = m[64]\ntoken "d" = zero\noutput o = base\n',
    "vocab chat\n",
    "a < b\nc <= d\ne > f\ng == h\n",
    "[]",
    "",
)


def corpus() -> list[tuple[str, str]]:
    files = sorted((ROOT / "examples").rglob("*.tv"))
    return [(text, "<expr>") for text in CORPUS] + [
        (f.read_text(encoding="utf-8"), str(f.relative_to(ROOT))) for f in files
    ]


def same(a: Any, b: Any, source_a: SourceText, source_b: SourceText) -> bool:
    """Structural equality of two ASTs, spans by position (each in its own program's source)."""
    if isinstance(a, Span) and isinstance(b, Span):
        return (a.start, a.end) == (b.start, b.end) and a.source is source_a and b.source is source_b
    if isinstance(a, SourceText) and isinstance(b, SourceText):
        return a is source_a and b is source_b
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(
            same(getattr(a, f.name), getattr(b, f.name), source_a, source_b) for f in dataclasses.fields(a)
        )
    if isinstance(a, tuple):
        return len(a) == len(b) and all(same(x, y, source_a, source_b) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def node_types(x: Any) -> set[type]:
    if isinstance(x, tuple):
        return set().union(*map(node_types, x)) if x else set()
    if type(x) in cached.NODES:
        return {type(x)}.union(*(node_types(getattr(x, f.name)) for f in dataclasses.fields(x)))
    return set()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TVLANG_CACHE", str(tmp_path))
    return tmp_path / "parse"


def no_lark(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on a parse must come from the cache."""

    def fail(source: SourceText) -> ast.Program:
        raise AssertionError(f"parsed with Lark: {source.text!r}")

    monkeypatch.setattr(lalr, "parse", fail)


def test_the_registry_is_every_node_type_of_the_ast() -> None:
    classes = {
        v
        for v in vars(ast).values()
        if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == ast.__name__
    }
    assert set(cached.NODES) == classes and len(cached.NODES) == len(classes)


def test_a_cached_ast_equals_a_fresh_parse_for_every_node_type(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = corpus()
    fresh = [parse(text, name, "/some/dir") for text, name in texts]  # misses: Lark, then stored
    assert len(list(cache.glob("*.json"))) == len(set(texts))
    no_lark(monkeypatch)
    seen: set[type] = set()
    for (text, name), cold in zip(texts, fresh, strict=True):
        warm = parse(text, name, "/some/dir")
        assert same(cold, warm, cold.source, warm.source), text
        assert (warm.source.text, warm.source.name, warm.source.base_dir) == (text, name, "/some/dir")
        seen |= node_types(warm)
    assert seen == set(cached.NODES)  # the corpus covers the grammar


def test_encode_and_decode_are_inverse() -> None:
    for text, name in corpus():
        program = lalr.parse(SourceText(text, name))
        data = json.loads(json.dumps(cached.encode(program)))
        source = SourceText(text, name)
        assert same(program, cached.decode(data, source), program.source, source)


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_a_checker_error_reads_the_same_from_a_cold_and_a_warm_cache(
    case: str, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("base", "toxic"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")

    def report() -> str:
        with pytest.raises(TvError) as info:
            lower(parse(ERROR_CASES[case], "merge.tv", tmp_path))
        return info.value.render()

    cold = report()
    assert len(list(cache.glob("*.json"))) == 1
    no_lark(monkeypatch)
    assert report() == cold


def test_a_name_or_directory_is_part_of_the_key(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "out = base + toxc"
    for name, where in (("a.tv", "/x"), ("b.tv", "/x"), ("a.tv", "/y"), ("a.tv", None)):
        parse(text, name, where)
    assert len(list(cache.glob("*.json"))) == 4
    no_lark(monkeypatch)
    with pytest.raises(TvError, match=r"--> b\.tv:1:"):
        lower(parse(text, "b.tv", "/x"))


def test_syntax_errors_are_not_cached(cache: Path) -> None:
    messages = []
    for _ in range(2):
        with pytest.raises(TvSyntaxError) as info:
            parse("a + )", "bad.tv")
        messages.append(info.value.render())
    assert messages[0] == messages[1] and "bad.tv:1:5" in messages[0]
    assert not cache.exists() or list(cache.iterdir()) == []


def entry_of(text: str, name: str = "<expr>") -> Path:
    path = cached.entry(SourceText(text, name))
    assert path is not None
    return path


GOOD = "out = f(a, w=[1, 2]) - 0.5"


@pytest.mark.parametrize(
    "spoil",
    [
        lambda s: s[: len(s) // 2],  # truncated
        lambda s: "\x00\xff garbage",
        lambda s: "[]",
        lambda s: s.replace('"format": 1', '"format": 99'),
        lambda s: s.replace('"text": "out', '"text": "oot'),  # another text's entry
        lambda s: s.replace('"Call"', '"Exec"'),  # a type the AST does not have
        lambda s: s.replace('"Call"', '"Name"'),  # a node of the wrong shape
        lambda s: s.replace('["Name", "f",', '["Number", 1.0,'),  # a number where only a name goes
        lambda s: s.replace('"a"', "1"),  # a number where a string goes
        lambda s: s.replace("1.0", "true"),
        lambda s: s.replace("0.5", "NaN"),
        lambda s: s.replace("[0, 3]", "[0, 300]"),  # a span outside the text
        lambda s: s.replace("[0, 3]", "[3, 0]"),
        lambda s: s.replace("[0, 3]", "[0.0, 3]"),
        lambda s: s.replace("[0, 3]", "[0, 3, 4]"),
        lambda s: s.replace("null]", '"src"]'),
        lambda s: s.replace("]]]", "]]]]"),
    ],
)
def test_a_bad_entry_is_a_miss_parsed_again_and_replaced(cache: Path, spoil: Any) -> None:
    fresh = parse(GOOD)
    path = entry_of(GOOD)
    good = path.read_text()
    spoilt = spoil(good)
    assert spoilt != good
    path.write_text(spoilt, encoding="utf-8", errors="surrogateescape")
    assert cached.load(path, SourceText(GOOD)) is None
    again = parse(GOOD)
    assert same(fresh, again, fresh.source, again.source)
    assert path.read_text() == good  # the miss stored a good entry in its place


def test_decode_names_what_is_wrong() -> None:
    with pytest.raises(cached.Invalid, match="outside the text"):
        cached.decode(["Program", [["ExprStmt", ["Name", "a", [0, 9]], [0, 1]]], None], SourceText("a"))


def test_an_unwritable_cache_still_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("TVLANG_CACHE", str(blocker / "cache"))  # mkdir below a file fails
    for _ in range(2):
        program = parse(GOOD)
        assert isinstance(program.statements[0], ast.Binding)
    assert list(tmp_path.iterdir()) == [blocker]


def test_an_entry_that_cannot_be_encoded_is_not_stored(cache: Path) -> None:
    program = parse(GOOD)
    other = dataclasses.replace(program, statements=(*program.statements, "not a node"))
    path = cache / "x.json"
    cached.store(path, other)
    assert not path.exists() and [p.name for p in cache.iterdir()] == [entry_of(GOOD).name]


def test_the_cache_keeps_the_most_recently_used_entries(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cached, "MAX_ENTRIES", 4)
    parse("keep = 1")
    for i in range(8):
        for old in cache.iterdir():
            os.utime(old, ns=(i, i))  # every entry so far is old...
        parse("keep = 1")  # ...until it is used again
        parse(f"x = {i}")  # a miss: stored, then the cache is pruned
    entries = set(cache.iterdir())
    assert len(entries) <= 4 and entry_of("keep = 1") in entries and entry_of("x = 7") in entries
