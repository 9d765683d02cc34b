"""Model cards: the ``README.md`` written into every Hugging Face directory tvlang outputs.

The Hub reads a card's YAML front matter (``base_model``, ``tags``, ``library_name``) to link a
merge to the models it came from; the body says how to reproduce it: the program (and the
mergekit config it was translated from), every input, the parameter values and the tvlang
version.  The merged model's card replaces any ``README.md`` of the template input, as
mergekit's does: the template's card describes another model.

The front matter is written with JSON-quoted strings, which YAML reads as they are, so no YAML
library is needed to write it.

>>> card = model_card(
...     title="merged",
...     program="output merged = base + 0.5*(ft - base)",
...     inputs=[CardInput("base", "model", "/m/base"), CardInput("ft", "model", "/m/ft")],
...     params={},
...     version="0.1.0",
... )
>>> print(card.split("---")[1].strip())
base_model:
- "/m/base"
- "/m/ft"
library_name: transformers
tags:
- merge
- tvlang
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CARD_NAME = "README.md"
TAGS = ("merge", "tvlang")
# A snapshot in the Hugging Face cache: .../models--org--name/snapshots/<revision>
_HUB_SNAPSHOT = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/([^/]+)")


@dataclass(frozen=True)
class CardInput:
    """One input as the card lists it: its name in the program, its kind, where it was read."""

    label: str
    kind: str  # "model", "delta" (a stored task vector) or "lora" (an adapter)
    location: str  # a path, or "memory" for an in-memory state dict


def hub_id(location: str) -> str | None:
    """``org/name`` for a snapshot in the Hugging Face cache, else None."""
    m = _HUB_SNAPSHOT.search(location.replace("\\", "/"))
    return f"{m.group(1)}/{m.group(2)}" if m else None


def base_models(inputs: Sequence[CardInput]) -> list[str]:
    """The ``base_model`` list: every checkpoint input (a Hub id where it is one), in order, once."""
    out: list[str] = []
    for inp in inputs:
        if inp.kind != "model" or inp.location == "memory":
            continue
        ref = hub_id(inp.location) or inp.location
        if ref not in out:
            out.append(ref)
    return out


def _fence(text: str, lang: str) -> str:
    """``text`` in a code block whose fence no line of it can close."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def model_card(
    *,
    title: str,
    program: str,
    inputs: Sequence[CardInput],
    params: Mapping[str, float],
    version: str,
    mergekit_config: str | None = None,
    library: str = "transformers",
    extra: Sequence[str] = (),
    base_model: Sequence[str] | None = None,
) -> str:
    """The card's text.  ``extra``: further Markdown sections (an adapter's error table);
    ``base_model``: the front matter's list, when not every checkpoint input (an adapter names
    only the model it applies to)."""
    models = base_models(inputs) if base_model is None else list(base_model)
    front = [
        "---",
        *(["base_model:", *(f"- {json.dumps(b)}" for b in models)] if models else ["base_model: []"]),
    ]
    front += [f"library_name: {library}", "tags:", *(f"- {t}" for t in TAGS), "---"]
    what = "a LoRA adapter" if library == "peft" else "a model"
    body = [
        f"# {title}",
        "",
        f"This is {what} written by [tvlang](https://pypi.org/project/tvlang/) {version}, a language "
        "for model-weight arithmetic, from the inputs and the program below.",
        "",
        "## Inputs",
        "",
        "| name | kind | read from |",
        "|---|---|---|",
        *(
            f"| `{_cell(i.label)}` | {i.kind} | "
            + ("an in-memory state dict" if i.location == "memory" else f"`{_cell(i.location)}`")
            + " |"
            for i in inputs
        ),
        "",
        "## Program",
        "",
        _fence(program, "python"),
    ]
    if mergekit_config is not None:
        body += [
            "",
            "It was translated from this mergekit configuration:",
            "",
            _fence(mergekit_config, "yaml"),
        ]
    body += ["", "## Parameters", ""]
    body += [f"- `{k}` = {v:g}" for k, v in sorted(params.items())] or ["None."]
    for section in extra:
        body += ["", section.rstrip()]
    body += [
        "",
        "## Reproducing it",
        "",
        f"Install `tvlang=={version}` and run the program with the same inputs and parameters "
        "(`tvlang run PROGRAM -o OUT --set NAME=VALUE`). tvlang accumulates wider than the inputs and "
        "rounds once, so the same inputs give the same bits.",
    ]
    return "\n".join(front + body) + "\n"


__all__ = ["CARD_NAME", "CardInput", "base_models", "hub_id", "model_card"]
