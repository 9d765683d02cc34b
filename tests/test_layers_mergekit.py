"""mergekit's layer structure through ``tvlang run config.yml`` (the CLI): passthrough (with
``scale``), ``slices:`` (depth up-scaling; a method and a gradient per slice), ``modules:`` and
``model+lora`` references, on tiny Llama- and GPT-2-shaped checkpoints.  Every output is loaded with
``transformers`` and runs a forward pass; where the weights are copies, its logits equal those of a
model built from the expected state dict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvlang import cli
from tvlang.synth import gpt2_shapes, llama_shapes, make_lora_adapter, make_state, save_checkpoint

from .test_methods import ref_slerp

transformers = pytest.importorskip(
    "transformers", reason="outputs are checked by loading them (the test extra)"
)
pytest.importorskip("yaml", reason="mergekit configs are YAML (the `config` extra)")

State = dict[str, torch.Tensor]
LORA_SCALE = 8.0 / 4  # make_lora_adapter's alpha / rank


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mk_layers")
    llama = llama_shapes(32, 4, 64)
    a = make_state(llama, 0)
    save_checkpoint(a, str(d / "a"))
    save_checkpoint(make_state(llama, 1, base=a), str(d / "b"))
    make_lora_adapter(str(d / "ad"), llama)
    gpt2 = gpt2_shapes(32, 4, 64, 16)
    g = make_state(gpt2, 2)
    save_checkpoint(g, str(d / "g"))
    save_checkpoint(make_state(gpt2, 3, base=g), str(d / "g2"))
    return d


def state(path: Path) -> State:
    return load_file(str(path / "model.safetensors"))


def run(root: Path, name: str, yml: str) -> Path:
    (root / f"{name}.yml").write_text(yml)
    out = root / f"out_{name}"
    assert cli.main(["run", str(root / f"{name}.yml"), "-o", str(out), "-q", "--force"]) == 0
    return out


def restack(src: State, sources: list[int], key: str = "layers") -> State:
    """The state a depth-changing copy should write: output layer i is ``src``'s layer sources[i]."""
    out = {}
    for name, t in src.items():
        parts = name.split(".")
        if key not in parts:
            out[name] = t
            continue
        k = parts.index(key) + 1
        for i, s in enumerate(sources):
            if int(parts[k]) == s:
                out[".".join([*parts[:k], str(i), *parts[k + 1 :]])] = t
    return out


def lora_delta(root: Path, name: str) -> torch.Tensor | None:
    ad = load_file(str(root / "ad" / "adapter_model.safetensors"))
    module = "base_model.model." + name.removesuffix(".weight")
    if module + ".lora_A.weight" not in ad:
        return None
    return LORA_SCALE * ad[module + ".lora_B.weight"].double() @ ad[module + ".lora_A.weight"].double()


def loads_and_runs(out: Path, depth: int, expected: State | None = None) -> None:
    """``out`` loads with transformers at the new depth and runs a forward pass; with ``expected``,
    its logits equal those of the same architecture holding exactly those weights."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.config.num_hidden_layers == depth
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, 5, model.config.vocab_size) and torch.isfinite(logits).all()
    if expected is not None:
        ref = type(model)(model.config).eval()  # no dropout
        missing, unexpected = ref.load_state_dict({k: v.float() for k, v in expected.items()}, strict=False)
        assert not unexpected and all("lm_head" in m for m in missing)  # a tied head is not stored
        ref.tie_weights()
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, logits)


def same(got: State, expected: State) -> None:
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# -- passthrough -------------------------------------------------------------------------------------

DUS = """merge_method: passthrough
dtype: bfloat16
slices:
  - sources:
      - model: {m}
        layer_range: [0, 3]
  - sources:
      - model: {m}
        layer_range: [1, 4]
"""


@pytest.mark.parametrize(("model", "key"), [("a", "layers"), ("g", "h")])
def test_depth_up_scaling(root: Path, model: str, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = run(root, f"dus_{model}", DUS.format(m=model))
    assert cli.main(["plan", str(root / f"dus_{model}.yml")]) == 0
    shown = capsys.readouterr().out
    assert "layer map (6 layers):" in shown and f"0–2       ← in0 {model} 0–2" in shown, shown
    expected = restack(state(root / model), [0, 1, 2, 1, 2, 3], key)
    same(state(out), expected)
    loads_and_runs(out, 6, expected)


def test_passthrough_scale_zeroes_a_module_in_the_repeated_layers(root: Path) -> None:
    yml = (
        DUS.format(m="a")
        + "        parameters:\n          scale:\n            - filter: o_proj\n"
        + ("              value: 0\n            - value: 1\n")
    )
    out = run(root, "dus_scaled", yml)
    expected = restack(state(root / "a"), [0, 1, 2, 1, 2, 3])
    for name in expected:
        if "o_proj" in name and int(name.split(".")[2]) >= 3:
            expected[name] = torch.zeros_like(expected[name])
    same(state(out), expected)
    loads_and_runs(out, 6, expected)


def test_passthrough_of_a_model_plus_lora(root: Path) -> None:
    yml = """merge_method: passthrough
models:
  - model: a+ad
    parameters:
      scale:
        - filter: down_proj
          value: 0
        - value: 1
"""
    out = run(root, "pt_lora", yml)
    a, got = state(root / "a"), state(out)
    for name, t in a.items():
        delta = lora_delta(root, name)
        if "down_proj" in name:
            assert not got[name].any(), name
        elif delta is None:
            assert torch.equal(got[name], t), name
        else:
            torch.testing.assert_close(got[name].double(), t.double() + delta, rtol=1 / 128, atol=1e-6)
    loads_and_runs(out, 4)


# -- slices merged with a method ----------------------------------------------------------------------


def test_slices_with_slerp_and_a_gradient_per_slice(root: Path) -> None:
    yml = """merge_method: slerp
base_model: a
parameters:
  t:
    - filter: self_attn
      value: [0, 1]
    - value: 0.5
slices:
  - sources:
      - {model: a, layer_range: [0, 2]}
      - {model: b, layer_range: [0, 2]}
  - sources:
      - {model: a, layer_range: [1, 4]}
      - {model: b, layer_range: [1, 4]}
"""
    out = run(root, "slerp_slices", yml)
    a, b, got = state(root / "a"), state(root / "b"), state(out)
    # output layer → (source layer, the gradient's t over its own slice: 0..1 over 2 layers, then over 3)
    plan = {0: (0, 0.0), 1: (1, 1.0), 2: (1, 0.0), 3: (2, 0.5), 4: (3, 1.0)}
    for out_layer, (src, t_attn) in plan.items():
        for proj, t in (("self_attn.q_proj.weight", t_attn), ("mlp.up_proj.weight", 0.5)):
            name = f"model.layers.{src}.{proj}"
            ref = ref_slerp(a[name].double(), b[name].double(), t)
            torch.testing.assert_close(
                got[f"model.layers.{out_layer}.{proj}"].double(), ref, rtol=1 / 128, atol=1e-6
            )
    loads_and_runs(out, 5)


def test_gpt2_slices_with_linear_weights(root: Path) -> None:
    yml = """merge_method: linear
slices:
  - sources:
      - {model: g, layer_range: [0, 2], parameters: {weight: 0.25}}
      - {model: g2, layer_range: [0, 2], parameters: {weight: 0.75}}
  - sources:
      - {model: g2, layer_range: [2, 4], parameters: {weight: 1}}
      - {model: g, layer_range: [1, 3], parameters: {weight: 1}}
"""
    out = run(root, "gpt2_linear", yml)
    g, g2, got = state(root / "g"), state(root / "g2"), state(out)
    for out_layer, (s1, w1, s2, w2) in {0: (0, 0.25, 0, 0.75), 3: (3, 0.5, 2, 0.5)}.items():
        for part in ("attn.c_attn.weight", "mlp.c_fc.bias"):
            ref = (
                w1 * (g if out_layer == 0 else g2)[f"transformer.h.{s1}.{part}"].double()
                + w2 * (g2 if out_layer == 0 else g)[f"transformer.h.{s2}.{part}"].double()
            )
            torch.testing.assert_close(
                got[f"transformer.h.{out_layer}.{part}"].double(), ref, rtol=1 / 128, atol=1e-6
            )
    loads_and_runs(out, 4)


def test_parameters_are_looked_up_source_slice_module_top(root: Path, tmp_path: Path) -> None:
    """A slice's filter list without a catch-all continues with the top level's setting, as mergekit's
    lookup does; the translated program, written and run, gives the config's bits."""
    yml = """merge_method: slerp
base_model: a
parameters:
  t: 0.25
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [0, 4]}
    parameters:
      t:
        - filter: mlp
          value: 1
"""
    out = run(root, "lookup", yml)
    a, b, got = state(root / "a"), state(root / "b"), state(out)
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"])
    q = "model.layers.2.self_attn.q_proj.weight"
    ref = ref_slerp(a[q].double(), b[q].double(), 0.25)
    torch.testing.assert_close(got[q].double(), ref, rtol=1 / 128, atol=1e-6)
    tv = tmp_path / "lookup.tv"
    assert cli.main(["import-mergekit", str(root / "lookup.yml"), "-o", str(tv)]) == 0
    assert 'where(matches("*mlp*"), 1, 0.25)' in tv.read_text()
    assert cli.main(["run", str(tv), "-o", str(tmp_path / "from_tv"), "-q"]) == 0
    same(state(tmp_path / "from_tv"), got)


# -- modules and model+lora ---------------------------------------------------------------------------


def test_a_module_with_a_model_plus_lora_source(root: Path) -> None:
    yml = """merge_method: linear
modules:
  decoder:
    parameters:
      weight: 0.5
    slices:
      - sources:
          - {model: a, layer_range: [0, 4]}
          - {model: b+ad, layer_range: [0, 4]}
"""
    out = run(root, "modules_lora", yml)
    a, b, got = state(root / "a"), state(root / "b"), state(out)
    for name, t in a.items():
        delta = lora_delta(root, name)
        ref = 0.5 * t.double() + 0.5 * (b[name].double() + (delta if delta is not None else 0.0))
        torch.testing.assert_close(got[name].double(), ref, rtol=1 / 128, atol=1e-6)
    loads_and_runs(out, 4)


def test_a_module_of_whole_models_with_module_parameters(root: Path) -> None:
    yml = """merge_method: task_arithmetic
base_model: a
modules:
  decoder:
    parameters:
      weight: [0.2, 0.8]
    models:
      - model: b
      - model: a
"""
    out = run(root, "modules_models", yml)
    a, b, got = state(root / "a"), state(root / "b"), state(out)
    for layer in range(4):
        name = f"model.layers.{layer}.mlp.up_proj.weight"
        w = 0.2 + 0.6 * layer / 3
        ref = a[name].double() + w * (b[name].double() - a[name].double())
        torch.testing.assert_close(got[name].double(), ref, rtol=1 / 128, atol=1e-6)
    loads_and_runs(out, 4)


# -- errors, at the config's line ---------------------------------------------------------------------

BAD: list[tuple[str, str, Callable[[str], bool]]] = [
    ("merge_method: passthrough\nmodels:\n  - model: a+nope\n", "E300", lambda e: "bad.yml:3:12" in e),
    (
        DUS.format(m="a").replace("[1, 4]", "[1, 9]"),
        "E313",
        lambda e: "which has 4 layers" in e and ":9:" in e,
    ),
    (
        DUS.format(m="a").replace(
            "      - model: a\n        layer_range: [1, 4]\n",
            "      - {model: a, layer_range: [1, 4]}\n      - {model: b, layer_range: [0, 3]}\n",
        ),
        "E407",
        lambda e: "exactly one model" in e,
    ),
    (
        DUS.format(m="a").replace("[0, 3]", "[3, 1]"),
        "E407",
        lambda e: "0 <= start < stop" in e and ":6:" in e,
    ),
    (
        "merge_method: slerp\nbase_model: a\nparameters: {t: 0.5}\nslices:\n"
        "  - sources: [{model: a, layer_range: [0, 2]}, {model: b, layer_range: [0, 3]}]\n",
        "E407",
        lambda e: "same number of layers" in e,
    ),
    (
        "merge_method: linear\nmodules: {x: {models: [{model: a}]}, y: {models: [{model: b}]}}\n",
        "E407",
        lambda e: "2 modules" in e,
    ),
]


@pytest.mark.parametrize(("yml", "code", "check"), BAD)
def test_errors_point_at_the_config(
    root: Path, capsys: pytest.CaptureFixture[str], yml: str, code: str, check: Callable[[str], bool]
) -> None:
    (root / "bad.yml").write_text(yml)
    assert cli.main(["run", str(root / "bad.yml"), "-o", str(root / "bad_out"), "-q"]) == 1
    err = capsys.readouterr().err
    assert f"error[{code}]" in err and "bad.yml:" in err and check(err) and "Traceback" not in err, err
