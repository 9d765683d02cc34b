"""Per-tensor context: name patterns, layer indices and gradients resolved at plan time."""

from __future__ import annotations

import pytest
import torch

import tvlang
from tvlang.context import TensorContext, count_layers, gradient, layer_of
from tvlang.plan import WeightedSum
from tvlang.synth import llama_shapes, make_state


@pytest.fixture(scope="module")
def pair() -> dict[str, dict[str, torch.Tensor]]:
    shapes = llama_shapes(16, 4, 32)
    base = make_state(shapes, 0, torch.float32)
    return {"base": base, "ft": make_state(shapes, 1, torch.float32, base=base)}


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("model.layers.12.mlp.up_proj.weight", 12),
        ("transformer.h.3.attn.c_attn.weight", 3),
        ("encoder.layer.7.attention.self.query.weight", 7),
        ("blocks.0.norm1.weight", 0),
        ("model.embed_tokens.weight", -1),
        ("lm_head.weight", -1),
    ],
)
def test_layer_index_from_common_names(name: str, layer: int) -> None:
    assert layer_of(name) == layer


def test_gradient_follows_mergekits_interpolation() -> None:
    assert gradient((0.2, 0.8), 0.5) == pytest.approx(0.5)
    assert gradient((0.0, 1.0, 0.0), 0.25) == pytest.approx(0.5)
    assert gradient((0.3,), 0.7) == 0.3
    n = count_layers(["model.layers.0.x", "model.layers.9.y"])
    assert n == 10
    assert TensorContext("model.embed_tokens.weight", n).t == 0.0  # before the layers
    assert TensorContext("lm_head.weight", n).t == 0.0  # after them too (mergekit 0.1.5's plan.py)
    assert TensorContext("model.layers.9.y", n).t == 1.0
    assert TensorContext("model.layers.0.y", 1).t == 1.0  # one layer: mergekit's t = 1


def _weights(prog: tvlang.Program, output: int, tensor: str) -> dict[str, float]:
    """Each input's weight in the (anchored) weighted sum an output tensor is."""
    plan = prog.plan()
    task = next(t for t in plan.tasks if t.name == tensor)
    kernel = next(w.kernel for w in task.writes if w.output == output)
    assert isinstance(kernel, WeightedSum)  # still the plain weighted sum: no per-element cost
    flat: dict[str, float] = {}
    for w, slot, minus in kernel.terms:
        label = plan.inputs[slot].ref.label
        flat[label] = flat.get(label, 0.0) + w
        if minus is not None:
            label = plan.inputs[minus].ref.label
            flat[label] = flat.get(label, 0.0) - w
    return flat


def test_the_one_liners(pair: dict[str, dict[str, torch.Tensor]]) -> None:
    prog = tvlang.compile(
        """
        # embeddings and lm_head stay at base
        output keep = base + (1 - matches("*embed*") - matches("lm_head*")) * 0.5*(ft - base)
        # attention gets 0.3, MLP 0.5
        output split = base + (0.3*matches("*self_attn*") + 0.5*matches("*mlp*")) * (ft - base)
        # lambda ramps from 0.2 to 0.8 across the layers
        output ramp = base + gradient([0.2, 0.8]) * (ft - base)
        # per-module method choice: TIES-trimmed for the MLP, plain elsewhere
        output mixed = base + matches("*mlp*")*magnitude_prune(ft - base, 0.5) + (1 - matches("*mlp*"))*(ft - base)
        """.replace("\n        ", "\n"),
        bindings=pair,
    )
    assert _weights(prog, 0, "model.embed_tokens.weight") == {"base": 1.0}  # only the base is read
    assert _weights(prog, 0, "model.layers.1.mlp.up_proj.weight") == {"base": 0.5, "ft": 0.5}
    assert _weights(prog, 1, "model.layers.2.self_attn.q_proj.weight") == pytest.approx(
        {"base": 0.7, "ft": 0.3}
    )
    assert _weights(prog, 1, "model.layers.2.mlp.down_proj.weight") == pytest.approx({"base": 0.5, "ft": 0.5})
    assert _weights(prog, 2, "model.layers.0.mlp.up_proj.weight") == pytest.approx({"base": 0.8, "ft": 0.2})
    assert _weights(prog, 2, "model.layers.3.mlp.up_proj.weight") == pytest.approx({"base": 0.2, "ft": 0.8})
    out = prog.run()
    base, ft = pair["base"], pair["ft"]
    n = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(out["ramp"][n], base[n] + 0.4 * (ft[n] - base[n]))
    attn = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(out["mixed"][attn], ft[attn])
    assert torch.equal(out["keep"]["lm_head.weight"], base["lm_head.weight"])
    d = ft[n] - base[n]
    pruned = torch.where(d.abs() >= d.abs().flatten().kthvalue(d.numel() - d.numel() // 2 + 1).values, d, 0.0)
    torch.testing.assert_close(out["mixed"][n], base[n] + pruned)
    plan_text = prog.explain()
    assert "matches('*self_attn*')" in plan_text and "gradient((0.2, 0.8))" in plan_text


def test_regex_patterns_and_errors(pair: dict[str, dict[str, torch.Tensor]]) -> None:
    prog = tvlang.compile('base + matches("re:layers\\\\.[02]\\\\.")*(ft - base)', bindings=pair)
    assert _weights(prog, 0, "model.layers.2.mlp.up_proj.weight") == {"ft": 1.0}  # ft only
    assert _weights(prog, 0, "model.layers.1.mlp.up_proj.weight") == {"base": 1.0}  # base only
    with pytest.raises(tvlang.TvTypeError) as info:
        tvlang.compile("gradient([0.2, 0.8]) * base + ft - ft", bindings=pair).graph()
    assert "known before any data is read" in info.value.message and info.value.span is not None
    with pytest.raises(tvlang.TvTypeError, match="must be a string"):
        tvlang.compile("base + matches(1)*(ft - base)", bindings=pair).graph()
