"""The paper's three experiments.  Every weight edit is a tvlang program; torch only evaluates.

Each experiment is one multi-output program with a scaling coefficient per
output (``param lam_<output>``).  Choosing the coefficients on validation data
runs the program once per grid value -- one pass over the checkpoints computes
every output -- and one more run with each output at its chosen value gives
the models that are scored on test data.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import tvlang
from examples.paper.data import CONTROL, TARGETS, Digits, Split, load_digits
from examples.paper.model import StateDict, accuracies
from examples.paper.train import ANALOGY, TrainConfig, Zoo, build_zoo

TVLANG = tvlang.Options(threads=1)  # the example shares its 2 cores; one thread is plenty at this size


@dataclass(frozen=True)
class Config:
    """What to train (``train``), which target tasks to use, and the λ grids searched on validation data."""

    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: tuple[str, ...] = TARGETS
    negation_grid: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    addition_grid: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
    analogy_grid: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    control_floor: float = 0.95  # negation keeps control accuracy >= this fraction of the base model's

    @classmethod
    def quick(cls, seed: int = 0) -> Config:
        """A reduced run for CI: 4 tasks (16 merges), far fewer steps, coarser grids."""
        return cls(
            TrainConfig(seed=seed, pretrain_steps=600, finetune_steps=80, finetune_lr=1e-3),
            tasks=("rot90", "invert", "permute", "shift"),
            negation_grid=(0.5, 1.0, 2.0, 3.0),
            addition_grid=(0.3, 0.5, 0.7, 1.0),
            analogy_grid=(0.5, 1.0, 1.5),
        )


class Sweep:
    """One program, one output per entry of ``exprs`` (name -> expression with a ``{lam}`` hole),
    each output scaled by its own parameter ``lam_<name>``.

    λ is chosen per output with :func:`tvlang.tune`: that output's program alone, merged on every
    trial into one preallocated model (``into=``) whose state dict the score reads; nothing is
    written to disk.  The chosen merges then come from one run of the whole program."""

    def __init__(self, exprs: Mapping[str, str], bindings: Mapping[str, Any],
                 memory: Mapping[str, Any], template: StateDict) -> None:  # fmt: skip
        self.names = list(exprs)
        self.exprs = {n: e.format(lam=f"lam_{n}") for n, e in exprs.items()}
        self.source = "\n".join(
            [
                *(f"param lam_{n} = 1" for n in self.names),
                *(f"output {n} = {e}" for n, e in self.exprs.items()),
            ]
        )
        self.program = tvlang.compile(self.source, bindings=bindings)
        self.memory = memory  # the same checkpoints, bound in memory, for the trials
        self.into = {k: v.clone() for k, v in template.items()}  # the model every trial merges into
        self.runs = 0
        self.trials = 0
        self.tuned: dict[str, tvlang.TuneResult] = {}

    def run(self, lams: Mapping[str, float]) -> dict[str, StateDict]:
        """Every output at once, output ``n`` at ``lams[n]``."""
        out = self.program.run(params={f"lam_{n}": lams[n] for n in self.names}, options=TVLANG)
        self.runs += 1
        return out if len(self.names) > 1 else {self.names[0]: out}

    def pick(self, grid: tuple[float, ...], score: Callable[[str, StateDict], float]) -> dict[str, float]:
        """Per output, the grid value with the highest ``score`` on validation data (the smallest
        one on ties), chosen by :func:`tvlang.tune`."""
        lams = {}
        for name in self.names:
            program = tvlang.compile(f"param lam_{name} = 1\noutput {name} = {self.exprs[name]}",
                                     bindings=self.memory)  # fmt: skip
            res = tvlang.tune(program, {f"lam_{name}": list(grid)}, partial(score, name), into=self.into,
                              options=TVLANG, progress=False, keep_best=False)  # fmt: skip
            self.tuned[name] = res
            self.trials += len(res.trials)
            lams[name] = res.best_params[f"lam_{name}"]
        return lams


def _bindings(zoo: Zoo, names: list[str], memory: bool = False) -> dict[str, Any]:
    """``base`` and each named task vector (fine-tuned file minus ``base``), read by tvlang from disk
    (``memory=True``: the same checkpoints as state dicts, for the many runs that choose λ)."""
    get = zoo.weights if memory else zoo.paths.__getitem__
    return {"base": get("base"), **{n: tvlang.task_vector(get(n)) for n in names}}


def _sweep(zoo: Zoo, exprs: Mapping[str, str], names: list[str]) -> Sweep:
    return Sweep(exprs, _bindings(zoo, names), _bindings(zoo, names, memory=True), zoo.weights("base"))


# ---------------------------------------------------------------------------------------- negation


@dataclass
class NegationRow:
    task: str
    lam: float
    base: tuple[float, float]  # (target, control) test accuracy
    finetuned: tuple[float, float]
    negated: tuple[float, float]


@dataclass
class Curve:
    """Validation accuracy against λ while negating one task vector: what tvlang.tune measured."""

    task: str
    lams: list[float]
    target: list[float]
    control: list[float]
    chosen: float
    floor: float  # the control accuracy a λ must keep


def negation(cfg: Config, zoo: Zoo, digits: Digits) -> tuple[list[NegationRow], str, Curve]:
    """Paper Table 1: forget a task with ``base - lam*tau``.  ``lam`` is the one that lowers the
    target most on validation data while control accuracy stays >= ``control_floor`` of the base
    model's (the smallest grid value if none does)."""
    sweep = _sweep(zoo, {t: f"base - {{lam}}*{t}" for t in cfg.tasks}, list(cfg.tasks))
    heads, enc = zoo.heads, zoo.encoder

    def pair(weights: StateDict | None, task: str, part: str) -> tuple[float, float]:
        data = {task: digits.task(task, part), CONTROL: digits.task(CONTROL, part)}
        acc = accuracies(enc, weights, heads, data)
        return acc[task], acc[CONTROL]

    control_val = pair(None, cfg.tasks[0], "val")[1]

    measured: dict[str, list[tuple[float, float]]] = {t: [] for t in cfg.tasks}

    def score(task: str, weights: StateDict) -> float:
        target, control = pair(weights, task, "val")
        measured[task].append((target, control))
        return -target if control >= cfg.control_floor * control_val else float("-inf")

    lams = sweep.pick(cfg.negation_grid, score)
    first = cfg.tasks[0]
    curve = Curve(
        first, [t.params[f"lam_{first}"] for t in sweep.tuned[first].trials],
        [m[0] for m in measured[first]], [m[1] for m in measured[first]], lams[first],
        cfg.control_floor * control_val,
    )  # fmt: skip
    negated = sweep.run(lams)
    fts = {t: zoo.weights(t) for t in cfg.tasks}
    rows = [
        NegationRow(t, lams[t], pair(None, t, "test"), pair(fts[t], t, "test"), pair(negated[t], t, "test"))
        for t in cfg.tasks
    ]
    return rows, sweep.source, curve


# ---------------------------------------------------------------------------------------- addition


@dataclass
class AdditionRow:
    subset: tuple[str, ...]
    lam: float | None  # None for the empty subset (the pretrained model)
    accuracy: dict[str, float]  # test accuracy on every task
    normalized_all: float  # merged / fine-tuned accuracy, averaged over all tasks (the paper's figure)
    normalized_subset: float | None  # the same, averaged over the tasks in the subset only


@dataclass
class Addition:
    rows: list[AdditionRow]
    finetuned: dict[str, float]  # test accuracy of each task's own fine-tuned model
    runs: int  # tvlang program runs (each one pass computing all 2^n - 1 merges)
    source: str
    trials: int = 0  # tvlang.tune trials choosing λ (one merge into a model in memory each)


def addition(cfg: Config, zoo: Zoo, digits: Digits) -> Addition:
    """Paper Figure 3: ``base + lam*(sum of the subset's task vectors)`` for every subset of the
    task vectors, all merges as outputs of one program; ``lam`` per merge, chosen on validation
    data for the best normalised accuracy over all tasks."""
    tasks = list(cfg.tasks)
    subsets = [s for k in range(1, len(tasks) + 1) for s in itertools.combinations(tasks, k)]
    names = {"m_" + "_".join(s): s for s in subsets}
    sums = {n: " + ".join(s) if len(s) == 1 else f"({' + '.join(s)})" for n, s in names.items()}
    sweep = _sweep(zoo, {n: f"base + {{lam}}*{total}" for n, total in sums.items()}, tasks)
    val = {t: digits.task(t, "val") for t in tasks}
    test = {t: digits.task(t, "test") for t in tasks}
    enc, heads = zoo.encoder, zoo.heads

    def finetuned(data: Mapping[str, Split]) -> dict[str, float]:
        return {t: accuracies(enc, zoo.weights(t), heads, {t: data[t]})[t] for t in tasks}

    ft_val, ft_test = finetuned(val), finetuned(test)

    def score(name: str, weights: StateDict) -> float:
        acc = accuracies(enc, weights, heads, val)
        return sum(acc[t] / ft_val[t] for t in tasks) / len(tasks)

    lams = sweep.pick(cfg.addition_grid, score)
    merged: dict[tuple[str, ...], tuple[float | None, StateDict | None]] = {(): (None, None)}
    chosen = sweep.run(lams)
    merged.update({s: (lams[n], chosen[n]) for n, s in names.items()})
    rows = []
    for subset, (lam, weights) in merged.items():
        acc = accuracies(enc, weights, heads, test)
        norm = {t: acc[t] / ft_test[t] for t in tasks}
        rows.append(AdditionRow(
            subset, lam, acc, sum(norm.values()) / len(tasks),
            sum(norm[t] for t in subset) / len(subset) if subset else None,
        ))  # fmt: skip
    return Addition(rows, ft_test, sweep.runs, sweep.source, sweep.trials)


# ----------------------------------------------------------------------------------------- analogy


@dataclass
class AnalogyRow:
    model: str
    d_data: str  # which data from task D the row used
    lam: float | None
    target: float  # test accuracy on D
    control: float


def analogy(cfg: Config, zoo: Zoo, digits: Digits) -> tuple[list[AnalogyRow], str]:
    """Paper Table 4 in spirit: "A is to B as C is to D" -- digits behind bars at the top-left
    edges are to bottom-left as top-right are to bottom-right.  ``tau_C + (tau_B - tau_A)``
    builds a vector for D from three other tasks; D's labels serve only to choose ``lam``
    (a few images), or not at all at ``lam = 1``."""
    names = dict(zip("ABCD", ANALOGY, strict=True))
    few = digits.fewshot(names["D"], cfg.train.fewshot, cfg.train.seed)
    bindings = {"base": zoo.paths["base"], **{k: tvlang.task_vector(zoo.paths[names[k]]) for k in "ABC"}}
    exprs = {
        "C_only": "base + {lam}*C",
        "B_only": "base + {lam}*B",
        "B_plus_C": "base + {lam}*(C + B)",
        "analogy": "base + {lam}*(C + (B - A))",
    }
    memory = {"base": zoo.weights("base"), **{k: tvlang.task_vector(zoo.weights(names[k])) for k in "ABC"}}
    sweep = Sweep(exprs, bindings, memory, zoo.weights("base"))
    enc, heads = zoo.encoder, zoo.heads
    d = names["D"]
    lams = sweep.pick(cfg.analogy_grid, lambda _, w: accuracies(enc, w, heads, {d: few})[d])
    edited = sweep.run(lams)
    no_data = tvlang.evaluate("base + C + (B - A)", bindings, threads=1)
    test = {d: digits.task(d, "test"), CONTROL: digits.task(CONTROL, "test")}
    n_few, n_all = len(few), len(digits.task(d, "train"))

    def row(model: str, data: str, weights: StateDict | None, lam: float | None = None) -> AnalogyRow:
        acc = accuracies(enc, weights, heads, test)
        return AnalogyRow(model, data, lam, acc[d], acc[CONTROL])

    chose = f"{n_few} (to choose λ)"
    rows = [
        row("pretrained", "none", None),
        row(f"fine-tuned on {n_few} images of D", str(n_few), zoo.weights("D_fewshot")),
        row("base + λ·τ_C", chose, edited["C_only"], lams["C_only"]),
        row("base + λ·τ_B", chose, edited["B_only"], lams["B_only"]),
        row("base + λ·(τ_C + τ_B)", chose, edited["B_plus_C"], lams["B_plus_C"]),
        row("**analogy: base + λ·(τ_C + (τ_B − τ_A))**", chose, edited["analogy"], lams["analogy"]),
        row("**analogy: base + τ_C + (τ_B − τ_A)**", "none", no_data, 1.0),
        row("fine-tuned on all of D (reference)", str(n_all), zoo.weights("D_full")),
    ]
    return rows, sweep.source


# --------------------------------------------------------------------------------------------- all


@dataclass
class Results:
    config: Config
    negation: list[NegationRow]
    addition: Addition
    analogy: list[AnalogyRow]
    sources: dict[str, str]  # experiment -> its tvlang program
    curve: Curve  # validation accuracy against λ, negating the first task
    trained: list[str]  # checkpoints trained by this run (empty when all came from the cache)
    seconds: dict[str, float] = field(default_factory=dict)


def run(cfg: Config, cache_root: str, log: Callable[[str], None] = lambda _: None) -> Results:
    """Train (or load) every model, then run the three experiments."""
    digits = load_digits(cfg.train.seed)
    seconds: dict[str, float] = {}
    log("training (or loading cached) models ...")
    zoo = build_zoo(cfg.train, digits, cfg.tasks, cache_root)
    seconds["training"] = zoo.seconds
    log(
        f"  {len(zoo.trained)} trained, {len(zoo.paths) - len(zoo.trained)} from the cache ({zoo.seconds:.0f} s)"
    )
    sources = {}
    t = time.perf_counter()
    neg, sources["negation"], curve = negation(cfg, zoo, digits)
    seconds["negation"] = time.perf_counter() - t
    log(f"negation done ({seconds['negation']:.0f} s)")
    t = time.perf_counter()
    add = addition(cfg, zoo, digits)
    sources["addition"] = add.source
    seconds["addition"] = time.perf_counter() - t
    log(
        f"addition done ({seconds['addition']:.0f} s, λ of {len(add.rows) - 1} merges chosen in {add.trials} "
        f"tvlang.tune trials)"
    )
    t = time.perf_counter()
    ana, sources["analogy"] = analogy(cfg, zoo, digits)
    seconds["analogy"] = time.perf_counter() - t
    log(f"analogy done ({seconds['analogy']:.0f} s)")
    return Results(cfg, neg, add, ana, sources, curve, zoo.trained, seconds)
