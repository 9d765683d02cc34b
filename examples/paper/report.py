"""Tables, the addition plot and RESULTS.md, from a :class:`Results`."""

from __future__ import annotations

import random
from collections.abc import Sequence

from examples.paper.experiments import Results
from examples.paper.train import ANALOGY


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def negation_table(res: Results) -> str:
    rows = res.negation
    summary = _table(
        ["model (mean over tasks)", "target acc. (↓)", "control acc. (upright)"],
        [[label, _pct(_mean([getattr(r, f)[0] for r in rows])), _pct(_mean([getattr(r, f)[1] for r in rows]))]
         for label, f in (("pretrained", "base"), ("fine-tuned", "finetuned"), ("negated: base − λ·τ", "negated"))],
    )  # fmt: skip
    per_task = _table(
        ["task", "λ", "pretrained target / control", "fine-tuned target / control", "negated target / control"],
        [[r.task, f"{r.lam:g}", *(f"{_pct(p[0])} / {_pct(p[1])}" for p in (r.base, r.finetuned, r.negated))]
         for r in rows],
    )  # fmt: skip
    floor = f"{100 * res.config.control_floor:g}"
    return (
        f"Per task, λ is the value that lowers the target most on validation data while control accuracy "
        f"stays ≥ {floor} % of the pretrained model's.\n\n{summary}\n\n{per_task}"
    )


def addition_table(res: Results) -> str:
    add = res.addition
    n = len(res.config.tasks)
    body = []
    for k in range(n + 1):
        rows = [r for r in add.rows if len(r.subset) == k]
        lams = sorted({r.lam for r in rows if r.lam is not None})
        body.append([
            str(k), str(len(rows)),
            _pct(_mean([r.normalized_all for r in rows])), _pct(max(r.normalized_all for r in rows)),
            _pct(_mean([r.normalized_subset for r in rows if r.normalized_subset is not None])) if k else "–",
            ", ".join(f"{x:g}" for x in lams) or "–",
        ])  # fmt: skip
    table = _table(
        ["task vectors added", "merges", f"norm. acc., all {n} tasks: mean", "best",
         "norm. acc., tasks in the subset: mean", "λ chosen"],
        body,
    )  # fmt: skip
    full = next(r for r in add.rows if len(r.subset) == n)
    base = next(r for r in add.rows if not r.subset)
    return (
        "Normalised accuracy is a merge's accuracy over each task's fine-tuned accuracy.  The paper's "
        f"figure averages it over all {n} tasks, so a merge earns nothing on tasks it lacks and the "
        "curve rises as vectors are added; averaged over the tasks in the subset only, it shows the "
        "price of interference instead.  Each merge's λ maximises the all-task average on validation "
        f"data.\n\n{table}\n\nAll {n} vectors in one model (λ = {full.lam:g}): mean test accuracy "
        f"{_pct(_mean(list(full.accuracy.values())))} % over the {n} tasks, against "
        f"{_pct(_mean(list(base.accuracy.values())))} % for the pretrained model and "
        f"{_pct(_mean(list(add.finetuned.values())))} % for {n} separate fine-tuned models. "
        f"Each merge's λ was chosen by `tvlang.tune` ({add.trials} trials in all, each a merge into one "
        f"model in memory); the {len(add.rows) - 1} chosen merges then came from one run of one tvlang "
        f"program."
    )


def analogy_table(res: Results) -> str:
    table = _table(
        ["model", "labelled images of D used", "λ", "D acc.", "control acc. (upright)"],
        [[r.model, r.d_data, "–" if r.lam is None else f"{r.lam:g}", _pct(r.target), _pct(r.control)]
         for r in res.analogy],
    )  # fmt: skip
    a, b, c, d = (name.removeprefix("bars_").replace("_", "-") for name in ANALOGY)
    return (
        f"Digits behind a bar along one horizontal and one vertical edge: A = {a}, B = {b}, C = {c}, "
        f"D = {d}; D's bars are C's + (B's − A's).  All four share one head (the pretrained model's "
        f"upright class means: one set of class names), so D's labels are needed only to choose λ.\n\n"
        f"{table}"
    )


def tables(res: Results) -> str:
    return "\n\n".join([
        "## Negation (paper Table 1): forgetting a task with base − λ·τ\n\n" + negation_table(res),
        "## Addition (paper Figure 3): one model for several tasks with base + λ·Σ τ\n\n" + addition_table(res),
        "## Analogy (paper Table 4, in spirit): a new task from three others\n\n" + analogy_table(res),
    ])  # fmt: skip


def plot(res: Results, path: str) -> None:
    """Normalised accuracy against the number of task vectors added, one dot per merge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(res.config.tasks)
    rng = random.Random(0)  # jitter only
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = (("normalized_all", f"averaged over all {n} tasks (the paper's figure)"),
              ("normalized_subset", "same merges, averaged over the tasks in the subset"))  # fmt: skip
    for ax, (attr, title) in zip(axes, panels, strict=True):
        ks = range(0 if attr == "normalized_all" else 1, n + 1)
        points = [
            (len(r.subset), getattr(r, attr)) for r in res.addition.rows if getattr(r, attr) is not None
        ]
        ax.scatter([k + rng.uniform(-0.15, 0.15) for k, _ in points], [100 * v for _, v in points],
                   s=10, alpha=0.35, color="tab:blue", label="one merge")  # fmt: skip
        means = [_mean([v for kk, v in points if kk == k]) for k in ks]
        ax.plot(list(ks), [100 * m for m in means], "o-", color="tab:red", label="mean per subset size")
        ax.axhline(100, ls="--", color="gray", lw=1, label="fine-tuned (one model per task)")
        ax.set_xlabel("number of task vectors added")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(list(range(n + 1)))
        ax.set_xlim(-0.5, n + 0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("normalised accuracy (%)")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle("Adding task vectors (base + λ·Σ τ), digits MLP — every merge computed by tvlang")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lambda(res: Results, path: str) -> None:
    """Validation accuracy against λ while negating one task vector, as tvlang.tune measured it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = res.curve
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(c.lams, [100 * v for v in c.target], "o-", color="tab:red", label=f"target: {c.task} (↓)")
    ax.plot(c.lams, [100 * v for v in c.control], "s-", color="tab:blue", label="control: upright digits")
    ax.axhline(100 * c.floor, ls="--", color="tab:blue", lw=1, label="control floor")
    ax.axvline(c.chosen, ls=":", color="black", lw=1.2, label=f"chosen λ = {c.chosen:g}")
    ax.set_xlabel("λ in base − λ·τ")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"Choosing λ with tvlang.tune: negating {c.task}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_md(res: Results, command: str, total_seconds: float, png: str) -> str:
    cfg = res.config
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in res.seconds.items())
    trained = (f"{len(res.trained)} checkpoints trained in this run" if res.trained
               else "all checkpoints loaded from the cache")  # fmt: skip
    add_src = res.sources["addition"].splitlines()
    n_out = sum(line.startswith("output") for line in add_src)
    params = [line for line in add_src if line.startswith("param")]
    outputs = [line for line in add_src if line.startswith("output")]
    add_excerpt = "\n".join(
        [
            *params[:2],
            f"# ... {n_out - 2} more params",
            *outputs[:2],
            f"# ... {n_out - 3} more outputs",
            outputs[-1],
        ]
    )
    return f"""# Task arithmetic on digits: the paper's three experiments, every edit in tvlang

Made by `{command}` in {total_seconds:.0f} s ({timing}; {trained}).
Seed {cfg.train.seed}; tasks: {", ".join(cfg.tasks)}; control: upright digits.
Accuracies are on held-out test images (%); every λ was chosen on validation data
(the analogy's on D's few training images) with `tvlang.tune`: a grid search that merges each
candidate straight into one model in memory and scores it, writing nothing to disk.

{tables(res)}

![normalised accuracy against the number of task vectors added]({png})

![validation accuracy against λ, negating one task vector](lambda.png)

## The tvlang programs

`base` is bound to the pretrained checkpoint's file and each task name (A, B, C in the analogy)
to `tvlang.task_vector(<its fine-tuned file>)`, i.e. fine-tuned − base; tvlang reads the files.

Each output's λ is chosen by `tvlang.tune` on that output's line alone (with its `param`), then
the chosen values are passed as `params=` and one run computes every model.

Negation:

```
{res.sources["negation"]}
```

Addition (one output per non-empty subset of the task vectors):

```
{add_excerpt}
```

Analogy (and, for the row without D data, `tvlang.evaluate("base + C + (B - A)", ...)`):

```
{res.sources["analogy"]}
```
"""
