"""mergekit configs of sce, ram, ramplus_tl, filter-wise model_stock, multislerp, karcher, arcee_fusion and row/column-wise nuslerp, run as
``tvlang run config.yml`` on tiny Llama-shaped checkpoints, against float64 references of mergekit's
code (tests/test_methods_extra.py); per-model parameters a method ignores are warnings with their
position, typos stay errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tvlang import cli
from tvlang.errors import TvParamError
from tvlang.mergekit import load_config, translate
from tvlang.synth import llama_shapes, make_family

from .test_methods_extra import (
    ref_arcee_fusion,
    ref_karcher,
    ref_model_stock_rows,
    ref_multislerp,
    ref_nuslerp,
    ref_ram,
    ref_ramplus,
    ref_sce,
)

yaml = pytest.importorskip("yaml", reason="mergekit configs are YAML (the `config` extra)")

NAMES = ("base", "a", "b", "c")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mergekit_methods")
    make_family(str(d / "ckpt"), NAMES, llama_shapes(16, 2, 32), dtype=torch.float32)
    return d


@pytest.fixture(scope="module")
def states(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {
        n: {k: v.double() for k, v in load_file(str(root / "ckpt" / f"{n}.safetensors")).items()}
        for n in NAMES
    }


def config(method: str, models: dict[str, dict[str, Any]], base: bool = True, **top: Any) -> dict[str, Any]:
    entries = [
        {"model": f"ckpt/{n}.safetensors", **({"parameters": v} if v else {})} for n, v in models.items()
    ]
    cfg: dict[str, Any] = {"merge_method": method, "models": entries}
    if base:
        cfg["base_model"] = "ckpt/base.safetensors"
    return {**cfg, **top}


Ref = Any
CASES: dict[str, tuple[dict[str, Any], str, Ref, float]] = {  # config, phrase of the program, reference, rtol
    "sce": (
        config("sce", {"a": {}, "b": {}, "c": {}}, parameters={"select_topk": 0.5}),
        "base + sce(a - base, b - base, c - base, select_topk=0.5)",
        lambda s: ref_sce(s["base"], [s["a"], s["b"], s["c"]], 0.5),
        2e-7,
    ),
    "ram": (
        config("ram", {"a": {}, "b": {}}, parameters={"epsilon": 0.05}),
        "base + ram(a - base, b - base, epsilon=0.05)",
        lambda s: ref_ram(s["base"], [s["a"], s["b"]], 0.05),
        2e-7,
    ),
    # |a - base| is about 1e-4 in the matrices: about half the entries of each are live, unique and shared mixed
    "ramplus_tl": (
        config("ramplus_tl", {"a": {}, "b": {}, "c": {}}, parameters={"r": 0.5, "alpha": 4, "epsilon": 1e-4}),
        "base + ramplus(a - base, b - base, c - base, r=0.5, alpha=4, epsilon=0.0001)",
        lambda s: ref_ramplus(s["base"], [s["a"], s["b"], s["c"]], 0.5, 4.0, 1e-4),
        2e-7,
    ),
    "ramplus_tl_defaults": (
        config("ramplus_tl", {"a": {}, "b": {}}),
        "base + ramplus(a - base, b - base)",
        lambda s: ref_ramplus(s["base"], [s["a"], s["b"]]),
        2e-7,
    ),
    "model_stock_filter_wise": (
        config("model_stock", {"a": {}, "b": {}, "c": {}}, parameters={"filter_wise": True}),
        'model_stock(base, a, b, c, per="row")',
        lambda s: ref_model_stock_rows(s["base"], [s["a"], s["b"], s["c"]]),
        1e-6,
    ),
    "multislerp": (
        config("multislerp", {"a": {"weight": 0.2}, "b": {"weight": 0.5}, "c": {"weight": 0.3}}, base=False),
        "multislerp(a, b, c, weights=[0.2, 0.5, 0.3])",
        lambda s: ref_multislerp([s["a"], s["b"], s["c"]], [0.2, 0.5, 0.3]),
        2e-7,
    ),
    "multislerp_base": (
        config("multislerp", {"a": {"weight": 1}, "b": {"weight": 3}}),
        "base + multislerp(a - base, b - base, weights=[1, 3])",
        lambda s: ref_multislerp([s["a"], s["b"]], [1, 3], base=s["base"]),
        2e-7,
    ),
    "karcher": (
        config("karcher", {"a": {}, "b": {}}, parameters={"max_iter": 5}),
        "karcher(base, a, b, max_iter=5)",  # mergekit averages the base model too
        lambda s: ref_karcher([s["base"], s["a"], s["b"]], 5),
        1e-6,
    ),
    "arcee_fusion": (
        config("arcee_fusion", {"base": {}, "a": {}}),
        "arcee_fusion(base, a)",
        lambda s: ref_arcee_fusion(s["base"], s["a"]),
        1e-6,
    ),
    "nuslerp_rows": (
        config("nuslerp", {"a": {"weight": 1}, "b": {"weight": 3}}, parameters={"nuslerp_flatten": False}),
        'base + nuslerp(a - base, b - base, 0.75, per="row")',
        lambda s: s["base"] + ref_nuslerp(0.75, s["a"] - s["base"], s["b"] - s["base"], "row"),
        2e-7,
    ),
    "nuslerp_columns": (
        config(
            "nuslerp",
            {"a": {"weight": 2}, "b": {"weight": 2}},
            base=False,
            parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True},
        ),
        'nuslerp(a, b, 0.5, per="column")',
        lambda s: ref_nuslerp(0.5, s["a"], s["b"], "column"),
        2e-7,
    ),
}


def write(root: Path, name: str, cfg: dict[str, Any] | str) -> Path:
    path = root / f"{name}.yml"
    path.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_config_runs_from_the_cli_and_matches_mergekit(
    case: str, root: Path, states: dict[str, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, phrase, ref, rtol = CASES[case]
    path = write(root, case, cfg)
    assert phrase in " ".join(load_config(path).program.split()), load_config(path).program
    out = root / f"{case}.safetensors"
    assert cli.main(["run", str(path), "-o", str(out), "-q", "--force"]) == 0, capsys.readouterr().err
    got = load_file(str(out))
    assert got.keys() == states["base"].keys()
    for k, v in got.items():
        expected = ref({n: s[k] for n, s in states.items()})
        torch.testing.assert_close(v.double(), expected, rtol=rtol, atol=1e-12, msg=f"{case}: {k}")


LENIENT = """merge_method: {method}
base_model: ckpt/base.safetensors
models:
  - model: ckpt/base.safetensors
  - model: ckpt/a.safetensors
    parameters:
      weight: 0.5
      density: 0.3
{extra}parameters:
  t: 0.4
"""


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("slerp", ""),
        ("nearswap", ""),
        ("model_stock", "  - model: ckpt/b.safetensors\n    parameters: {weight: 1}\n"),
    ],
)
def test_ignored_per_model_parameters_warn_with_their_position(
    method: str, extra: str, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = LENIENT.format(method=method, extra=extra)
    if method == "model_stock":
        text = text.replace("parameters:\n  t: 0.4\n", "")
    path = write(root, f"lenient_{method}", text)
    out = root / f"lenient_{method}.safetensors"
    assert cli.main(["run", str(path), "-o", str(out), "-q", "--force"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert f"warning: {path}:7:7: per-model parameter `weight` is ignored by merge_method `{method}`" in err
    assert f"{path}:8:7: per-model parameter `density`" in err
    assert len(lines) == (3 if method == "model_stock" else 2), err
    assert cli.main(["import-mergekit", str(path)]) == 0
    printed, err = capsys.readouterr()
    assert "weight" not in printed and "per-model parameter `weight`" in err


def test_a_top_level_per_model_parameter_the_method_ignores_warns(root: Path) -> None:
    text = "merge_method: karcher\nparameters:\n  weight: 0.5\nmodels: [{model: ckpt/a.safetensors}, {model: ckpt/b.safetensors}]\n"
    tr = translate(text, source_name="k.yml", base_dir=root)
    assert tr.warnings == (
        "warning: k.yml:3:3: per-model parameter `weight` is ignored by merge_method `karcher`, as in mergekit",
    )
    assert "karcher(a, b)" in tr.program


def test_typos_and_misplaced_globals_stay_errors(root: Path) -> None:
    for text, message, caret in (
        (
            LENIENT.format(method="slerp", extra="").replace("density", "densty"),
            "unknown parameter `densty`",
            "densty",
        ),
        (LENIENT.format(method="slerp", extra="").replace("density: 0.3", "t: 0.3"), "global parameter", "t"),
        (
            "merge_method: sce\nparameters: {select_top_k: 0.5}\nbase_model: ckpt/base.safetensors\n"
            "models: [{model: ckpt/a.safetensors}]\n",
            "unknown parameter `select_top_k`",
            "select_top_k",
        ),
        (
            "merge_method: arcee_fusion\nbase_model: ckpt/base.safetensors\nmodels: [{model: ckpt/a.safetensors}, "
            "{model: ckpt/b.safetensors}]\n",
            "needs exactly 1 model(s)",
            "[{model",
        ),
        (
            "merge_method: karcher\nparameters: {max_iter: 2.5}\nmodels: [{model: ckpt/a.safetensors}, "
            "{model: ckpt/b.safetensors}]\n",
            "whole number",
            "2.5",
        ),
    ):
        with pytest.raises(TvParamError) as info:
            translate(text, source_name=str(root / "bad.yml"), base_dir=root)
        err = info.value
        assert err.code == "E407" and message in err.message, err.render()
        assert err.span is not None and err.span.text.startswith(caret), err.render()


def test_outputs_load_in_transformers_and_run_forward(tmp_path: Path) -> None:
    """New methods' configs, on Hugging Face directories, write models transformers runs."""
    transformers = pytest.importorskip("transformers", reason="the forward pass needs transformers")
    from tvlang.synth import LlamaSpec, write_family

    write_family(str(tmp_path / "ckpt"), NAMES, LlamaSpec(32, 2, 64, 48, 4, 2), dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 3]])
    for case in ("sce", "karcher", "nuslerp_columns", "arcee_fusion"):  # (the writer is the same for all)
        cfg = CASES[case][0]
        text = yaml.safe_dump(cfg, sort_keys=False).replace(".safetensors", "")  # the directories
        path = write(tmp_path, case, text)
        out = tmp_path / f"out_{case}"
        assert cli.main(["run", str(path), "-o", str(out), "-q"]) == 0, case
        model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, 4, 64) and bool(torch.isfinite(logits).all()), case
