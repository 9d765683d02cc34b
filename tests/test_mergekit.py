"""mergekit configs: each method, translated and run, against float64 references written here from
mergekit's formulas (its parameter lookup, gradients and filters included); every unsupported field
is a positioned E407; the CLI's import-mergekit and ``run merge.yml``.

Inputs are float32, so tvlang accumulates in float64 and results agree with the references to
float32 rounding.  DARE and DELLA masks are tvlang's seeded generator: the references draw the same
numbers from the stream tvlang documents (the task vector's source text, ``a - base``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import tvlang
from tvlang import cli
from tvlang.backends.interpreter import random_key, uniform
from tvlang.config import load_job, run_job
from tvlang.errors import TvError, TvParamError
from tvlang.mergekit import load_config, translate
from tvlang.synth import llama_shapes, make_family

from .test_methods import ref_breadcrumbs, ref_model_stock, ref_nuslerp, ref_prune, ref_slerp, ref_ties

yaml = pytest.importorskip("yaml", reason="mergekit configs are YAML (the `config` extra)")

NAMES = ("base", "a", "b", "c")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mergekit"
LAYERS = 4


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mergekit")
    make_family(str(d / "ckpt"), NAMES, llama_shapes(16, LAYERS, 32), dtype=torch.float32)
    return d


@pytest.fixture(scope="module")
def states(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        n: {k: v.double() for k, v in load_file(str(root / "ckpt" / f"{n}.safetensors")).items()}
        for n in NAMES
    }


def write(root: Path, name: str, cfg: dict[str, Any] | str) -> Path:
    path = root / f"{name}.yml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


def flat(program: str) -> str:
    """The program with its line breaks inside parentheses undone."""
    return re.sub(r"\s+", " ", program).replace("( ", "(").replace(",)", ")").replace(", )", ")")


def close(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert out.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(out[k].double(), ref[k], rtol=2e-7, atol=1e-12, msg=k)


# -- mergekit's semantics, written out ---------------------------------------------------------------


def position(name: str) -> float:
    """mergekit 0.1.5's t (plan.py): layer / (layers - 1); 0 for every tensor outside the layers,
    the pre-weights (embeddings) and the post-weights (final norm, head) alike."""
    parts = name.split(".")
    if "layers" in parts:
        return int(parts[parts.index("layers") + 1]) / (LAYERS - 1)
    return 0.0


def evaluate(setting: Any, name: str, t: float) -> float | None:
    """mergekit's evaluate_setting: a number, a gradient, or conditionals matched by substring."""
    if isinstance(setting, (int, float)):
        return float(setting)
    if all(isinstance(e, (int, float)) for e in setting):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return float((1 - frac) * setting[i0] + frac * setting[i1])
    for cond in setting:
        flt = cond.get("filter")
        if flt is None or flt == "*" or flt in name:
            return evaluate(cond["value"], name, t)
    return None


def lookup(cfg: dict[str, Any], model: str | None, param: str, name: str, default: Any = None) -> Any:
    """ConfigReader.parameter: the model's own setting, then the top-level one, then the default."""
    entry = next((m for m in cfg["models"] if model and m["model"] == model), {})
    for params in (entry.get("parameters"), cfg.get("parameters")):
        if params and param in params:
            value = evaluate(params[param], name, position(name))
            if value is not None:
                return value
    return default


GTA = {  # consensus, sparsification, default normalize, default rescale (mergekit's registry)
    "task_arithmetic": (False, None, False, False),
    "ties": (True, "magnitude", True, False),
    "dare_ties": (True, "random", False, True),
    "dare_linear": (False, "random", False, True),
    "breadcrumbs": (False, "outliers", False, False),
    "breadcrumbs_ties": (True, "outliers", False, False),
    "della": (True, "della", True, True),
    "della_linear": (False, "della", False, True),
}


def l1(d: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    before, after = d.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def della(d: torch.Tensor, density: float, epsilon: float, u: torch.Tensor, rescale: bool) -> torch.Tensor:
    """mergekit's della_magprune: keep probability from density - ε (smallest magnitude in its row)
    to density + ε (largest), then the L1 rescale or none."""
    rows = d.reshape(d.shape[0], -1) if d.dim() > 1 else d.reshape(1, -1)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).double()
    probs = density - epsilon + ranks / (rows.shape[1] - 1) * 2 * epsilon
    kept = (rows * (u.reshape(rows.shape) < probs)).reshape(d.shape)
    return l1(d, kept) if rescale else kept


def draws(model: str, name: str, n: int, seed: int = 0) -> torch.Tensor:
    u = torch.empty(n, dtype=torch.float64)
    uniform(random_key(seed, f"{model} - base", name), 0, n, u)
    return u


def reference(cfg: dict[str, Any], states: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    method = cfg["merge_method"]
    path = {f"ckpt/{n}.safetensors": n for n in NAMES}
    models = [path[m["model"]] for m in cfg["models"]]
    glob = cfg.get("parameters", {})
    base = states["base"]
    result = {}
    for k, b in base.items():
        others = [m for m in models if m != "base"]

        def p(param: str, model: str | None = None, default: Any = None, k: str = k) -> Any:
            return lookup(cfg, f"ckpt/{model}.safetensors" if model else None, param, k, default)

        if method in GTA:
            consensus, sparse, normalize, rescale = GTA[method]
            normalize, rescale = glob.get("normalize", normalize), glob.get("rescale", rescale)
            deltas, weights = [], []
            for m in others:
                d, density = states[m][k] - b, p("density", m, 1.0)
                if sparse and density < 1:
                    if sparse == "magnitude":
                        d = l1(d, ref_prune(d, density)) if rescale else ref_prune(d, density)
                    elif sparse == "outliers":
                        kept = ref_breadcrumbs(d, density, p("gamma", m, 0.01))
                        d = l1(d, kept) if rescale else kept
                    elif sparse == "random":
                        keep = (draws(m, k, d.numel()) >= 1 - density).reshape(d.shape).double()
                        d = l1(d, d * keep) if rescale else d * keep
                    else:
                        u = draws(m, k, d.numel())
                        d = della(d, density, p("epsilon", m, 0.15), u, rescale)
                deltas.append(d)
                weights.append(p("weight", m))
            if consensus:
                merged = ref_ties(deltas, weights, 1.0, divide="weights" if normalize else "none")
            else:
                merged = sum(w * d for w, d in zip(weights, deltas, strict=True))
                total = sum(weights)
                merged = merged / (1.0 if abs(total) < 1e-8 else total) if normalize else merged
            result[k] = b + p("lambda", None, 1.0) * merged
        elif (
            method == "linear"
        ):  # base_model, when not among the models, is averaged in with the top-level weight
            members = models + (["base"] if "base_model" in cfg and "base" not in models else [])
            ws = [p("weight", m) for m in members]
            total = sum(w * states[m][k] for w, m in zip(ws, members, strict=True))
            result[k] = total / sum(ws) if cfg.get("parameters", {}).get("normalize", True) else total
        elif method == "slerp":
            result[k] = ref_slerp(b, states[others[0]][k], p("t"))
        elif method == "nearswap":
            d = states[others[0]][k] - b
            w = torch.nan_to_num(p("t") / d.abs(), nan=1.0, posinf=1.0).clamp(0, 1)
            result[k] = w * states[others[0]][k] + (1 - w) * b
        elif method == "nuslerp":
            w0, w1 = p("weight", others[0]), p("weight", others[1])
            tt = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
            if "base_model" in cfg:
                result[k] = b + ref_nuslerp(tt, states[others[0]][k] - b, states[others[1]][k] - b)
            else:
                result[k] = ref_nuslerp(tt, states[others[0]][k], states[others[1]][k])
        elif method == "model_stock":
            result[k] = ref_model_stock(b, [states[m][k] for m in others])
    return result


def config(method: str, per_model: dict[str, dict[str, Any]], **top: Any) -> dict[str, Any]:
    models = [
        {"model": f"ckpt/{n}.safetensors", **({"parameters": v} if v else {})} for n, v in per_model.items()
    ]
    return {"models": models, "merge_method": method, "base_model": "ckpt/base.safetensors", **top}


ATTN_MLP = [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.7}, {"value": 0.5}]

CASES: dict[str, tuple[dict[str, Any], str]] = {  # a config and a phrase of the program it becomes
    "task_arithmetic": (
        config(
            "task_arithmetic",
            {"base": {}, "a": {"weight": 0.6}, "b": {"weight": -0.3}},
            parameters={"lambda": 0.8},
        ),
        "lam*(0.6*(a - base) + (-0.3)*(b - base))",
    ),
    "task_arithmetic_normalized": (
        config(
            "task_arithmetic",
            {"a": {"weight": ATTN_MLP}, "b": {"weight": [1, 0.25]}},
            parameters={"normalize": True},
        ),
        "where(abs(",
    ),
    "ties_shared_density": (
        config(
            "ties",
            {"base": {}, "a": {"weight": 0.6}, "b": {"weight": 0.4}, "c": {"weight": 0.3}},
            parameters={"density": 0.4},
        ),
        "ties(a - base, b - base, c - base, weights=[0.6, 0.4, 0.3], density=0.4)",
    ),
    "ties_per_model": (
        config(
            "ties", {"a": {"weight": ATTN_MLP, "density": 0.5}, "b": {"weight": 0.4, "density": [0.3, 0.9]}}
        ),
        "density_b = gradient([0.3, 0.9])",
    ),
    "ties_rescaled_unnormalized": (
        config(
            "ties",
            {"a": {"weight": 1, "density": 0.3}, "b": {"weight": 0.5, "density": 0.6}},
            parameters={"normalize": False, "rescale": True},
        ),
        "l1_rescale(a - base, magnitude_prune(a - base, 0.3))",
    ),
    "dare_ties_shared": (
        config("dare_ties", {"a": {"weight": 0.5}, "b": {"weight": 0.5}}, parameters={"density": 0.6}),
        'dare_ties(a - base, b - base, weights=[0.5, 0.5], density=0.6, seed=0, divide="none")',
    ),
    "dare_ties_per_model": (
        config(
            "dare_ties",
            {"a": {"weight": 0.7, "density": 0.5}, "b": {"weight": 0.4, "density": [0.2, 0.8]}},
            parameters={"normalize": True},
        ),
        'dare(a - base, 1 - 0.5, seed=0, rescale="l1")',
    ),
    "dare_linear": (
        config(
            "dare_linear",
            {"a": {"weight": 0.7}, "b": {"weight": 0.6}, "c": {"weight": 0.2}},
            parameters={"density": 0.7, "rescale": False},
        ),
        'dare_linear(a - base, b - base, c - base, weights=[0.7, 0.6, 0.2], density=0.7, seed=0, rescale="none")',
    ),
    "breadcrumbs": (
        config(
            "breadcrumbs",
            {"a": {"weight": 0.5, "gamma": 0.05}, "b": {"weight": 0.5, "density": ATTN_MLP}},
            parameters={"density": 0.8},
        ),
        "breadcrumbs(a - base, 0.8, 0.05)",
    ),
    "breadcrumbs_ties": (
        config(
            "breadcrumbs_ties",
            {"a": {"weight": 1, "density": 0.6, "gamma": 0.1}, "b": {"weight": 0.5, "density": 0.7}},
        ),
        'divide="none"',
    ),
    "della": (
        config(
            "della",
            {
                "a": {"weight": 1, "density": [{"filter": "mlp", "value": 0.4}, {"value": 0.6}]},
                "b": {"weight": 0.5, "density": 0.5, "epsilon": 0.2},
            },
            parameters={"lambda": 1.1},
        ),
        'where(matches("*mlp*"), della(a - base, 0.4, 0.15, seed=0, rescale="l1"), della(a - base, 0.6, 0.15',
    ),
    "della_linear": (
        config(
            "della_linear",
            {"a": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}, "b": {"weight": 0.5, "density": 0.7}},
            parameters={"rescale": False},
        ),
        'della(b - base, 0.7, 0.15, seed=0, rescale="none")',
    ),
    "linear": (
        {
            "models": [
                {"model": "ckpt/a.safetensors", "parameters": {"weight": 1}},
                {"model": "ckpt/b.safetensors", "parameters": {"weight": 3}},
            ],
            "merge_method": "linear",
        },
        "linear(a, b, weights=[1, 3])",
    ),
    "linear_unnormalized": (  # Σ wᵢmᵢ with Σ wᵢ = 4: the average scaled as a whole
        {
            "models": [
                {"model": "ckpt/a.safetensors", "parameters": {"weight": 1}},
                {"model": "ckpt/b.safetensors", "parameters": {"weight": 3}},
            ],
            "merge_method": "linear",
            "parameters": {"normalize": False},
        },
        "scale(linear(a, b, weights=[1, 3]), 4)",
    ),
    "linear_per_tensor": (
        {
            "models": [
                {"model": f"ckpt/{n}.safetensors", "parameters": {"weight": w}}
                for n, w in (("a", ATTN_MLP), ("b", 0.4), ("c", [0.1, 0.9]))
            ],
            "merge_method": "linear",
        },
        "*(b - a)",
    ),
    "linear_with_base": (
        config("linear", {"a": {"weight": [0.5, 1]}, "c": {}}, parameters={"weight": 0.25}),
        "(base - a)",
    ),
    "slerp": (
        config(
            "slerp",
            {"base": {}, "b": {}},
            parameters={
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
        ),
        "slerp(base, b, t)",
    ),
    "slerp_constant": (config("slerp", {"a": {}}, parameters={"t": 0.3}), "param t = 0.3"),
    "nearswap": (config("nearswap", {"base": {}, "c": {}}, parameters={"t": 0.001}), "nearswap(base, c, t)"),
    "nuslerp": (
        config("nuslerp", {"a": {"weight": 1}, "b": {"weight": 3}}),
        "base + nuslerp(a - base, b - base, 0.75)",
    ),
    "nuslerp_models": (
        {
            "models": [
                {"model": "ckpt/b.safetensors", "parameters": {"weight": [1, 0]}},
                {"model": "ckpt/c.safetensors", "parameters": {"weight": 0.5}},
            ],
            "merge_method": "nuslerp",
        },
        "t = where(abs(weight_b + 0.5) < 1e-6, 0.5, 0.5 / where(abs(weight_b + 0.5) < 1e-6, 1, weight_b + 0.5))",
    ),
    "model_stock": (
        config("model_stock", {"base": {}, "a": {}, "b": {}, "c": {}}),
        "model_stock(base, a, b, c)",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_method_matches_mergekit_formula(
    case: str, root: Path, states: dict[str, dict[str, torch.Tensor]]
) -> None:
    cfg, phrase = CASES[case]
    path = write(root, case, cfg)
    translation = load_config(path)
    assert phrase in flat(translation.program), translation.program
    out = run_job(path)  # what `tvlang run merge.yml` runs
    close(out, reference(cfg, states))


def test_program_and_config_give_the_same_bits(root: Path) -> None:
    """The .tv file (relative load() paths) and the config run as a job compute identical outputs,
    random masks included: both spell the task vectors' streams the same way."""
    cfg, _ = CASES["dare_ties_per_model"]
    path = write(root, "bits", cfg)
    tv = root / "sub" / "bits.tv"
    tv.parent.mkdir(exist_ok=True)
    tv.write_text(load_config(path, out_dir=tv.parent).program)
    assert 'load("../ckpt/a.safetensors")' in tv.read_text()
    from_tv = tvlang.compile_file(tv).run()
    from_config = run_job(path)
    assert all(torch.equal(from_tv[k], from_config[k]) for k in from_tv)


def test_gradients_and_filters_reach_every_layer(
    root: Path, states: dict[str, dict[str, torch.Tensor]]
) -> None:
    """task_arithmetic with one model: the output is base + w(tensor)·(a - base), so w can be read
    back per tensor and compared with mergekit's lookup at each layer."""
    cfg = config("task_arithmetic", {"a": {"weight": [{"filter": "mlp.up", "value": 0.9}, {"filter": "layers.2.", "value": [0, 1]}]}}, parameters={"weight": [0.1, 0.2, 0.7]})  # fmt: skip
    out = run_job(write(root, "layers", cfg))
    for k, b in states["base"].items():
        d = states["a"][k] - b
        got = ((out[k].double() - b) * d).sum() / (d * d).sum()
        expected = (
            0.9
            if "mlp.up" in k
            else (position(k) if "layers.2." in k else evaluate([0.1, 0.2, 0.7], k, position(k)))
        )
        assert got.item() == pytest.approx(expected, abs=1e-4), k  # float32 outputs


def test_dtype_and_out_dtype(root: Path) -> None:
    cfg, _ = CASES["linear"]
    for key, value, dtype in (("dtype", "bfloat16", torch.bfloat16), ("out_dtype", "float16", torch.float16)):
        path = write(root, f"dtype_{key}", {**cfg, "dtype": "float32", key: value})
        assert load_config(path).dtype == {"bfloat16": "bf16", "float16": "fp16"}[value]
        out = run_job(path)
        assert all(v.dtype == dtype for v in out.values())


def test_json_config_and_mapping(root: Path, states: dict[str, dict[str, torch.Tensor]]) -> None:
    import json

    cfg, _ = CASES["ties_shared_density"]
    path = root / "ties.json"
    path.write_text(json.dumps(cfg))
    close(run_job(path), reference(cfg, states))
    close(run_job(cfg, base_dir=root), reference(cfg, states))  # a mapping, as from Python or Hydra


def test_example_is_the_translation_of_its_config(tmp_path: Path) -> None:
    """examples/mergekit/ties.tv is what import-mergekit makes of ties.yml (tests/test_examples.py
    runs the .tv); the config runs too, in its dtype."""
    from .conftest import NAMES as SENTIMENT

    make_family(str(tmp_path / "ckpt"), SENTIMENT, llama_shapes(16, LAYERS, 32), layout="dir")
    (tmp_path / "ties.yml").write_text((EXAMPLE / "ties.yml").read_text())
    assert load_config(tmp_path / "ties.yml", out_dir=tmp_path).program == (EXAMPLE / "ties.tv").read_text()
    assert all(v.dtype == torch.float16 for v in run_job(tmp_path / "ties.yml").values())


# -- errors -----------------------------------------------------------------------------------------

MODELS = "models:\n  - model: ckpt/a.safetensors\n    parameters: {weight: 1}\n  - model: ckpt/b.safetensors\n    parameters: {weight: 1}\n"
BASED = "base_model: ckpt/base.safetensors\n" + MODELS
PLAIN = (
    "base_model: ckpt/base.safetensors\nmodels: [{model: ckpt/a.safetensors}, {model: ckpt/b.safetensors}]\n"
)

ERRORS = [  # config text, a phrase of the message, the text the caret underlines
    ("merge_method: linear\nslices: []\n" + MODELS, "exactly one of `models:`, `slices:`", "slices"),
    ("merge_method: linear\nmodules: {}\n" + MODELS, "exactly one of `models:`, `slices:`", "modules"),
    (
        "merge_method: ties\ntokenizer_source: union\ntokenizer: {source: base}\n" + BASED,
        "cannot both be given",
        "tokenizer",
    ),
    ("merge_method: ties\ntokenizer: {sorce: base}\n" + BASED, "unknown field `tokenizer.sorce`", "sorce"),
    (
        "merge_method: ties\ntokenizer: {tokens: {x: {source: {kind: one}}}}\n" + BASED,
        "must be one of zero, model_token",
        "one",
    ),
    ("merge_method: ties\ntokenizer: {tokens: {x: {force: true}}}\n" + BASED, "needs a `source:`", "x"),
    ("merge_method: ties\nchat_template: llama3\n" + BASED, "tvlang has no `llama3` chat template", "llama3"),
    ("merge_method: ties\nchat_template: hello\n" + BASED, "'hello' is not a chat template", "hello"),
    ("merge_method: ties\nchat_template: [chatml]\n" + BASED, "must be a non-empty string", "[chatml]"),
    ("merge_method: ties\nname: x\n" + BASED, "unknown mergekit field `name`", "name"),
    ("merge_method: tiez\n" + BASED, "unknown merge_method `tiez`", "tiez"),
    # no mergekit release has it (its registry's SCE merge is `sce`): an unknown name, as in mergekit
    (
        "merge_method: task_arithmetic_sce\n" + BASED,
        "unknown merge_method `task_arithmetic_sce`",
        "task_arithmetic_sce",
    ),
    ("merge_method: ties\nparameters: {densty: 0.5}\n" + BASED, "unknown parameter `densty`", "densty"),
    (
        "merge_method: ties\n" + BASED.replace("{weight: 1}", "{weight: 1, normalize: true}", 1),
        "global parameter",
        "normalize",
    ),
    ("merge_method: ties\n" + MODELS, "needs a `base_model:`", "ties"),
    (
        "merge_method: ties\n" + BASED.replace("{weight: 1}", "{density: 0.5}", 1),
        "has no `weight`",
        "model: ckpt/a",
    ),
    (
        "merge_method: ties\n" + BASED.replace("{weight: 1}", "{weight: [{filter: mlp, value: 1}]}", 1),
        "no entry without a `filter:`",
        "[{filter",
    ),
    (
        "merge_method: ties\n" + BASED.replace("{weight: 1}", "{weight: {filter: mlp, value: 1}}", 1),
        "conditional parameters are a list",
        "{filter",
    ),
    (
        "merge_method: ties\n" + BASED.replace("{weight: 1}", "{weight: [0.5, x]}", 1),
        "must be a finite number",
        "x",
    ),
    (
        "merge_method: ties\n" + BASED.replace("ckpt/a.safetensors", "ckpt/b+lora/x+y"),
        "is not `model+lora`",
        "ckpt/b+lora/x+y",
    ),
    (
        "merge_method: ties\n" + BASED.replace("ckpt/a.safetensors", "ckpt/b.safetensors"),
        "listed twice",
        "ckpt/b",
    ),
    (
        "merge_method: della\n" + BASED.replace("{weight: 1}", "{weight: 1, density: [0.3, 0.6]}", 1),
        "gradient for `density`",
        "[0.3",
    ),
    (
        "merge_method: della\n" + BASED.replace("{weight: 1}", "{weight: 1, density: 0.5, epsilon: 0.6}", 1),
        "must lie in (0, 1)",
        "0.6",
    ),
    ("merge_method: slerp\nparameters: {t: 0.5}\n" + PLAIN, "needs exactly 1 model(s)", "[{model"),
    (
        "merge_method: slerp\nparameters: {t: true}\n" + PLAIN.replace(", {model: ckpt/b.safetensors}", ""),
        "must be a finite number",
        "true",
    ),
    (
        "merge_method: slerp\n" + BASED.replace("weight", "wieght"),
        "unknown parameter `wieght` for merge_method `slerp` (it takes none per model)",
        "wieght",
    ),
    ("merge_method: linear\nparameters: {normalize: 'yes'}\n" + MODELS, "must be true or false", "'yes'"),
    (
        "merge_method: linear\nparameters: {normalize: false}\n"
        + MODELS.replace("{weight: 1}", "{weight: -1}", 1),
        "weights that sum to zero the result is a task vector",
        "false",
    ),
    (
        "merge_method: nearswap\nparameters: {t: 0}\nbase_model: ckpt/base.safetensors\nmodels: [{model: ckpt/a.safetensors}]\n",
        "above 0",
        "0",
    ),
    ("merge_method: linear\ndtype: int8\n" + MODELS, "not a float dtype", "int8"),
    (
        "merge_method: linear\n" + MODELS + "  - model: ckpt/c.safetensors\n    weight: 1\n",
        "unknown field `models[2].weight`",
        "weight",
    ),
    ("merge_method: linear\nmodels: [: bad\n", "is not valid", None),
]


@pytest.mark.parametrize(("text", "message", "caret"), ERRORS)
def test_unsupported_or_malformed_is_a_positioned_e407(
    root: Path, text: str, message: str, caret: str | None
) -> None:
    with pytest.raises(TvParamError) as info:
        translate(text, source_name=str(root / "bad.yml"), base_dir=root)
    err = info.value
    assert err.code == "E407" and message in err.message, err.render()
    assert err.span is not None, err.render()
    if caret is not None:
        assert err.span.text.startswith(caret), err.render()


def test_run_reports_the_config_position(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(root, "missing", "merge_method: ties\n" + BASED.replace("ckpt/b.safetensors", "./ckpt/nope"))
    assert cli.main(["run", str(path), "-o", str(root / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "E300" in err and "missing.yml:6:12" in err and "Traceback" not in err
    path = write(root, "bad_run", "merge_method: ties\nslices: []\n" + BASED)
    assert cli.main(["run", str(path), "-o", str(root / "x.safetensors")]) == 1
    assert "error[E407]" in capsys.readouterr().err
    job = load_job(write(root, "ok", CASES["linear"][0]))  # the models are the job's bindings
    assert {k: v.value for k, v in job.bindings.items()} == {
        n: str(root / "ckpt" / f"{n}.safetensors") for n in ("a", "b")
    }


# -- the command line -------------------------------------------------------------------------------


def test_cli_import_then_run(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = CASES["ties_per_model"]
    path = write(root, "cli", {**cfg, "out_dtype": "bfloat16"})
    assert cli.main(["import-mergekit", str(path)]) == 0
    printed, err = capsys.readouterr()
    assert f'a = load("{root / "ckpt" / "a.safetensors"}")' in printed and "--dtype bf16" in err  # absolute
    tv = tmp_path / "merge.tv"
    assert cli.main(["import-mergekit", str(path), "-o", str(tv)]) == 0
    assert tv.read_text() == load_config(path, out_dir=tmp_path).program
    assert os.path.relpath(root / "ckpt" / "a.safetensors", tmp_path) in tv.read_text()
    assert cli.main(["import-mergekit", str(path), "-o", str(tv)]) == 1  # exists
    assert "E500" in capsys.readouterr().err
    assert cli.main(["import-mergekit", str(path), "-o", str(tv), "--force"]) == 0
    from_tv, from_yml = tmp_path / "tv.safetensors", tmp_path / "yml.safetensors"
    assert cli.main(["run", str(tv), "-o", str(from_tv), "--dtype", "bf16", "-q"]) == 0
    assert cli.main(["run", str(path), "-o", str(from_yml), "-q"]) == 0, capsys.readouterr().err
    a, b = load_file(str(from_tv)), load_file(str(from_yml))
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, b[k]) for k, v in a.items())


def test_cli_set_reaches_lambda_and_t(
    root: Path, tmp_path: Path, states: dict[str, dict[str, torch.Tensor]]
) -> None:
    out = tmp_path / "o.safetensors"
    for case, setting in (("slerp_constant", "t=0"), ("task_arithmetic", "lam=0")):
        path = write(root, f"set_{case}", CASES[case][0])
        assert cli.main(["run", str(path), "-o", str(out), "-q", "--force", "--set", setting]) == 0
        got = load_file(str(out))
        assert all(torch.equal(got[k].double(), v) for k, v in states["base"].items()), case  # the base


def test_cli_errors_are_rendered(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(root, "render", "merge_method: ties\nslices: []\n" + BASED)
    assert cli.main(["import-mergekit", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error[E407]" in err and "render.yml:2:1" in err and "help:" in err
    assert cli.main(["import-mergekit", str(root / "nope.yml")]) == 1
    assert "E300" in capsys.readouterr().err


def test_translation_is_deterministic_and_parses(root: Path) -> None:
    for case, (cfg, _) in CASES.items():
        path = write(root, f"det_{case}", cfg)
        first, second = load_config(path), load_config(path)
        assert first == second
        try:
            tvlang.compile(first.program)
        except TvError as e:  # pragma: no cover - a translation that does not parse is a bug
            pytest.fail(f"{case}: {e.render()}")


def test_hub_ids_become_cache_references() -> None:
    text = "merge_method: ties\n" + BASED.replace("ckpt/a.safetensors", "org/model-7b@v2")
    program = translate(text, source_name="m.yml", base_dir="/nonexistent").program
    assert 'load("hf://org/model-7b@v2")' in program
