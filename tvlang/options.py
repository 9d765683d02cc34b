"""How to run a program: one validated value, each of its fields declared once.

:class:`Options` is what the command line, job files, mergekit configs and the Python API all
build.  Each field says here, and nowhere else, its default, what it means (the command line's
``--help`` is written from it) and which values it takes; the layers that act on a value import
its choices from this module.  ``Options(...)`` checks itself when it is made, so every front-end
refuses a bad value with the same E402 message, before anything is opened.

This module sits at the bottom of the package (it imports only the errors and the dtype table),
so the planner and the runtime can read their choices from it without importing upwards.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tvlang.dtypes import OUTPUT_NAMES
from tvlang.errors import TvParamError

DEFAULT_MEMORY = 256 << 20  # bytes; eager chunked kernels were fastest at 256K–1M elements (measured)
DEFAULT_SHARD_SIZE = 5 << 30

NONFINITE_MODES = ("error", "warn", "propagate")
KEY_POLICIES = ("exact", "intersection", "union")
ROW_POLICIES = ("exact", "common")
KERNEL_MODES = ("auto", "compiled", "eager")
DEVICES = ("cpu", "cuda", "auto")
EXECUTORS = ("local", "ray")
SVD_METHODS = ("auto", "exact", "randomized")
CHAT_TEMPLATES = ("auto", "chatml")  # besides a template's own text (tvlang.io.chat_template)
# mergekit's other template names: formats that vary by model family, whose own files carry them
FAMILY_TEMPLATES = ("alpaca", "exaone", "llama3", "mistral")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "--memory") -> int:
    """``512M``, ``2G``, ``1.5GiB`` or plain bytes → bytes (binary units)."""
    m = _SIZE.match(text)
    if not m:
        raise TvParamError(
            f"{what} {text!r} is not a size", help="write e.g. 512M, 2G or 1073741824", code="E402"
        )
    scale = 1024 ** " kmgt".index((m.group(2) or " ").lower())
    return int(float(m.group(1)) * scale)


def format_size(n: int) -> str:
    """Bytes as the shortest size :func:`parse_size` reads back exactly (``256M``, ``5G``)."""
    for unit, scale in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


@dataclass(frozen=True)
class Setting:
    """How one field of :class:`Options` is given and checked.

    ``kind``: ``size`` (bytes, or text like ``512M``), ``count`` (an integer of at least 1),
    ``choice`` (one of ``choices``), ``flag`` (true or false), ``text``, ``template`` (a chat
    template: :func:`check_chat_template`), ``dtype`` (an output dtype name) or ``paths``.
    ``what`` names the value in errors (``unknown kernel mode 'x'``); ``help`` is the command
    line's help text; ``flag`` its option, where it has one."""

    kind: str
    help: str
    flag: str | None = None
    choices: tuple[str, ...] = ()
    what: str = ""
    hint: str = ""  # the error's help, where a plain list of the choices says too little


def _setting(default: Any, setting: Setting) -> Any:
    return field(default=default, metadata={"setting": setting})


@dataclass(frozen=True)
class Options:
    """How to run a program; shared by the CLI, job files and the Python API (see ``SETTINGS``)."""

    dtype: str | None = _setting(
        None,
        Setting(
            "dtype",
            "output dtype of float tensors: bf16, fp16, fp32, fp64 (default: as the inputs)",
            "--dtype",
        ),
    )
    memory: int = _setting(
        DEFAULT_MEMORY,
        Setting(
            "size",
            "working-memory budget, e.g. 512M or 2G; sets the chunk size (default {default})",
            "--memory",
        ),
    )
    threads: int | None = _setting(
        None, Setting("count", "worker threads (default: the CPUs this process may use)", "--threads")
    )
    chunk: int | None = _setting(
        None, Setting("count", "elements per chunk (default: from the memory budget; for tests)", "--chunk")
    )
    shard_size: int = _setting(
        DEFAULT_SHARD_SIZE,
        Setting(
            "size", "largest output shard of a directory output, e.g. 5G (default {default})", "--shard-size"
        ),
    )
    overwrite: bool = _setting(
        False, Setting("flag", "replace an existing output once the new one is complete", "--force")
    )
    progress: bool = _setting(False, Setting("flag", "a progress line with throughput on stderr"))
    roots: tuple[str, ...] | None = _setting(
        None, Setting("paths", "if set, load() may only read below these directories")
    )
    keys: str = _setting(
        "exact",
        Setting(
            "choice",
            "when inputs hold different tensor names: an error (exact, the default), only the shared ones "
            "(intersection), or all of them, a model lacking one counting as the first input that has it (union)",
            "--keys",
            KEY_POLICIES,
            "key policy",
        ),
    )
    rows: str = _setting(
        "exact",
        Setting(
            "choice",
            "tensors whose shapes differ only in their rows (a resized vocabulary): an error (exact, the "
            "default) or merge the rows every input has (common)",
            "--rows",
            ROW_POLICIES,
            "row policy",
        ),
    )
    nonfinite: str = _setting(
        "error",
        Setting(
            "choice",
            "NaN/inf in an input, or overflow to inf in the output dtype: stop without writing (error, "
            "the default), write and print a warning per tensor (warn), or write silently (propagate)",
            "--nonfinite",
            NONFINITE_MODES,
            "non-finite policy",
        ),
    )
    device: str = _setting(
        "cpu",
        Setting(
            "choice",
            "where kernels run: cpu (the default), cuda (generated Triton kernels on the GPU; "
            'pip install "tvlang[gpu]") or auto (cuda when available, else cpu); the plan\'s chunks follow '
            "it; see docs/gpu.md",
            "--device",
            DEVICES,
            "device",
        ),
    )
    kernels: str = _setting(
        "auto",
        Setting(
            "choice",
            "CPU kernels: fused loops built by the system C compiler (compiled; auto uses them when a "
            "compiler is found, the default) or torch op by op (eager); the results are the same",
            "--kernels",
            KERNEL_MODES,
            "kernel mode",
        ),
    )
    executor: str = _setting(
        "local",
        Setting(
            "choice",
            "where the tasks run: this machine (local, the default) or a Ray cluster (ray: units of "
            'whole output shards, the same bits; pip install "tvlang[ray]"; see docs/distributed.md)',
            "--executor",
            EXECUTORS,
            "executor",
            "choose local (this machine, the default) or ray (a Ray cluster; docs/distributed.md)",
        ),
    )
    address: str | None = _setting(
        None,
        Setting(
            "text",
            "with --executor ray: the cluster to join, HOST:PORT or auto (the one running here); default: "
            "$RAY_ADDRESS, else a local cluster for the run",
            "--address",
        ),
    )
    as_lora: int | None = _setting(
        None,
        Setting(
            "count",
            "write each output as a PEFT LoRA adapter directory of this rank: its task vector (a model "
            "output minus the base) factored per 2-D weight by a truncated SVD; see docs/language.md",
            "--as-lora",
        ),
    )
    lora_base: str = _setting(
        "base",
        Setting("text", "the adapter's base model, a name in the program (default: base)", "--lora-base"),
    )
    chat_template: str | None = _setting(
        None,
        Setting(
            "template",
            "the chat template the outputs' tokenizer files carry: auto (the one most input models "
            "carry), chatml, or a Jinja template's text (default: the template model's files unchanged)",
            "--chat-template",
        ),
    )
    lora_svd: str = _setting(
        "auto",
        Setting(
            "choice",
            "the adapter's SVD: exact (LAPACK), randomized (a sketch with power iterations), or auto "
            "(the default: randomized where the rank is small against the matrix)",
            "--lora-svd",
            SVD_METHODS,
            "SVD method",
        ),
    )

    def __post_init__(self) -> None:
        for name, setting in SETTINGS.items():
            check(name, getattr(self, name), setting)

    def resolved_threads(self) -> int:
        if self.threads is not None:
            return self.threads
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)

    @classmethod
    def from_text(cls, given: Mapping[str, Any], base: Options | None = None) -> Options:
        """``base`` (default: the defaults) with the fields ``given`` as text or values, as a
        command line gives them (sizes as ``512M``); errors name the flag."""
        values = {name: parse_text(name, value) for name, value in given.items()}
        return dataclasses.replace(base or cls(), **values)


SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in dataclasses.fields(Options)}


def default(name: str) -> Any:
    """The default of an :class:`Options` field, as a person writes it (sizes as ``256M``)."""
    value = getattr(Options(), name)
    return format_size(value) if SETTINGS[name].kind == "size" else value


def help_text(name: str) -> str:
    """The command line's help for an :class:`Options` field, its default filled in."""
    return SETTINGS[name].help.replace("{default}", str(default(name)))


def _label(name: str) -> str:
    setting = SETTINGS[name]
    return setting.flag or name


def parse_text(name: str, value: Any) -> Any:
    """A command-line value of the field ``name``: sizes may be text (``512M``); others as given."""
    if SETTINGS[name].kind == "size" and isinstance(value, str):
        return parse_size(value, _label(name))
    return value


def check(name: str, value: Any, setting: Setting | None = None) -> None:
    """Raise E402 when ``value`` is not one the field ``name`` takes."""
    setting = setting or SETTINGS[name]
    kind = setting.kind
    if kind == "choice" and value not in setting.choices:
        raise TvParamError(
            f"unknown {setting.what} {value!r}",
            help=setting.hint or "choose one of " + ", ".join(setting.choices),
            code="E402",
        )
    if kind in ("count", "size") and value is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TvParamError(f"{name} must be an integer, not {value!r}", code="E402")
        if value < 1:
            raise TvParamError(f"{name} must be at least 1, not {value}", code="E402")
    if kind == "template" and value is not None:
        check_chat_template(value)
    if (
        kind == "dtype"
        and value is not None
        and OUTPUT_NAMES.get(str(value).lower().removeprefix("torch.")) is None
    ):
        raise TvParamError(
            f"unknown output dtype {value!r}", help="choose one of bf16, fp16, fp32, fp64", code="E402"
        )


def check_chat_template(value: Any) -> None:
    """Raise E402 unless ``value`` is ``auto``, a name of :data:`CHAT_TEMPLATES` or looks like a
    Jinja template's text (mergekit's test: at least 20 characters, one of them ``{``)."""
    if not isinstance(value, str):
        raise TvParamError(f"a chat template is text, not {type(value).__name__}", code="E402")
    if value in CHAT_TEMPLATES:
        return
    if value in FAMILY_TEMPLATES:
        raise TvParamError(
            f"tvlang has no `{value}` chat template",
            help=f"a {value} model carries its own in its tokenizer files: `auto` takes the one most input "
            "models carry; or give the template's text",
            code="E402",
        )
    if len(value) < 20 or "{" not in value:
        raise TvParamError(
            f"{value!r} is not a chat template",
            help="give auto, chatml, or a Jinja template's text",
            code="E402",
        )


__all__ = [
    "CHAT_TEMPLATES",
    "DEFAULT_MEMORY",
    "DEFAULT_SHARD_SIZE",
    "DEVICES",
    "EXECUTORS",
    "FAMILY_TEMPLATES",
    "KERNEL_MODES",
    "KEY_POLICIES",
    "NONFINITE_MODES",
    "ROW_POLICIES",
    "SETTINGS",
    "SVD_METHODS",
    "Options",
    "Setting",
    "check",
    "check_chat_template",
    "default",
    "format_size",
    "help_text",
    "parse_size",
    "parse_text",
]
