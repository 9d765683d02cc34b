"""The chat template an output model's tokenizer files carry (``Options.chat_template``).

An output directory gets its template model's tokenizer files unchanged, chat template included.
A run may set another template there instead: ``auto`` (the template most of the input models
carry, as mergekit's ``chat_template: auto`` picks it), ``chatml``, or a Jinja template's text.
The template is written where the template model keeps its own: ``chat_template.jinja`` (which
transformers reads first) and the ``chat_template`` key of ``tokenizer_config.json`` (which other
converters read), into a copy of each; a model that keeps neither gets the key.  Nothing here
renders a template: that is the tokenizer's work when the model is used.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tvlang.errors import TvInputError, TvParamError

JINJA_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
MAX_CONFIG_BYTES = 64 << 20  # a tokenizer_config.json with every added token listed stays far below

# ChatML: each message as <|im_start|>ROLE, a newline, its content and <|im_end|> on its own line;
# a generation prompt opens the assistant's turn.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML}  # tvlang.options.CHAT_TEMPLATES names them, with `auto`


def model_template(directory: str) -> str | None:
    """The default chat template a model directory's tokenizer files give transformers:
    ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (a string, or the
    template named ``default`` of a list of them); None where there is none."""
    jinja = os.path.join(directory, JINJA_FILE)
    config_path = os.path.join(directory, CONFIG_FILE)
    if os.path.isfile(jinja):
        value: Any = _read_text(jinja)
    elif os.path.isfile(config_path):
        value = _read_config(config_path).get("chat_template")
    else:
        return None
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    return value if isinstance(value, str) and value.strip() else None


def choose(setting: str, directories: Sequence[str]) -> str | None:
    """The template text ``setting`` (``auto``, a name of :data:`NAMED` or a template's text)
    means for a run whose input models are the ``directories``; None for ``auto`` when none of
    them carries a template (the template model's files are then left as they are).  ``auto``
    counts each distinct directory once, templates compared without surrounding whitespace; a
    tie goes to the input that comes first."""
    if setting == "auto":
        found = [t.strip() for d in dict.fromkeys(directories) if (t := model_template(d)) is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED.get(setting, setting)


def carry(sidecars: Sequence[str], template: str, output: str, folder: str) -> list[str]:
    """``sidecars`` (the files the output directory ``output`` copies from its template model) with
    the chat template set to ``template``: ``chat_template.jinja`` and ``tokenizer_config.json``
    replaced by edited copies written into ``folder`` (one per output, kept until the output is
    written).  Raises E402 when the output would have no tokenizer files to carry it."""
    by_name = {os.path.basename(p): p for p in sidecars}
    if CONFIG_FILE not in by_name and JINJA_FILE not in by_name:
        raise TvParamError(
            f"output {output}: no {CONFIG_FILE} to carry the chat template",
            help="its template model has no tokenizer files: add them to that model's directory, or run "
            "without --chat-template",
            code="E402",
        )
    edited: dict[str, str] = {}
    if JINJA_FILE in by_name:
        edited[JINJA_FILE] = os.path.join(folder, JINJA_FILE)
        with open(edited[JINJA_FILE], "w", encoding="utf-8") as f:
            f.write(template)
    if CONFIG_FILE in by_name:
        config = _read_config(by_name[CONFIG_FILE])
        if JINJA_FILE not in by_name or "chat_template" in config:
            config["chat_template"] = template
            edited[CONFIG_FILE] = os.path.join(folder, CONFIG_FILE)
            with open(edited[CONFIG_FILE], "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, ensure_ascii=False)
                f.write("\n")
    return [edited.get(os.path.basename(p), p) for p in sidecars]


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(MAX_CONFIG_BYTES)
    except (OSError, UnicodeDecodeError) as e:
        raise TvInputError(f"{path}: cannot read it ({e})", code="E300") from None


def _read_config(path: str) -> dict[str, Any]:
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise TvInputError(f"{path}: not valid JSON ({e})", code="E301") from None
    if not isinstance(doc, dict):
        raise TvInputError(f"{path}: not a JSON object", code="E301")
    return doc


__all__ = ["CHATML", "NAMED", "carry", "choose", "model_template"]
