"""Layer structure in the language: layers(), stack() and scale(), from the layer-map logic up to
.tv programs that write deeper models (each output tensor read from the input tensor it maps to)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tvlang
from tvlang.api import Options
from tvlang.errors import TvInputError, TvTypeError
from tvlang.layermap import LayerView, edit_config, layer_ranges, output_order, renumber
from tvlang.plan import WeightedSum
from tvlang.synth import llama_shapes, make_state, save_checkpoint

from .test_methods import ref_slerp

LAYERS = 4


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("layers")
    shapes = llama_shapes(16, LAYERS, 32)
    a = make_state(shapes, 0)
    save_checkpoint(a, str(d / "a"))
    save_checkpoint(make_state(shapes, 1, base=a), str(d / "b"))
    config = json.loads((d / "a" / "config.json").read_text())
    config["layer_types"] = [f"kind{i}" for i in range(LAYERS)]  # a per-layer list
    (d / "a" / "config.json").write_text(json.dumps(config))
    return d


def states(d: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {n: load_file(str(d / n / "model.safetensors")) for n in ("a", "b")}


def program(d: Path, text: str) -> tvlang.Program:
    path = d / "prog.tv"
    path.write_text('a = load("a")\nb = load("b")\n' + text + "\n")
    return tvlang.compile_file(path)


# -- the layer map, unit by unit -------------------------------------------------------------------


def test_a_view_maps_output_names_to_checkpoint_names() -> None:
    first = LayerView(0, 24, 0, pre=True, post=False)
    second = LayerView(8, 32, 24, pre=False, post=True)
    assert first.source_of("model.layers.23.mlp.up_proj.weight") == "model.layers.23.mlp.up_proj.weight"
    assert first.source_of("model.layers.24.mlp.up_proj.weight") is None
    assert second.source_of("model.layers.24.mlp.up_proj.weight") == "model.layers.8.mlp.up_proj.weight"
    assert (
        second.source_of("model.layers.47.self_attn.q_proj.weight")
        == "model.layers.31.self_attn.q_proj.weight"
    )
    assert first.source_of("model.embed_tokens.weight") == "model.embed_tokens.weight"
    assert second.source_of("model.embed_tokens.weight") is None
    assert (first.source_of("lm_head.weight"), second.source_of("lm_head.weight")) == (None, "lm_head.weight")
    assert second.source_of("transformer.h.30.attn.c_attn.weight") == "transformer.h.14.attn.c_attn.weight"
    assert (
        renumber("encoder.layer.7.attention.self.query.weight", 12)
        == "encoder.layer.12.attention.self.query.weight"
    )
    tensors = {
        "model.embed_tokens.weight": 0,
        "model.layers.8.x": 1,
        "model.layers.9.x": 2,
        "model.norm.weight": 3,
    }
    assert LayerView(9, 10, 5, pre=False, post=True).present(tensors) == {
        "model.layers.5.x": ("model.layers.9.x", 2),
        "model.norm.weight": ("model.norm.weight", 3),
    }


def test_model_order_and_layer_runs() -> None:
    names = [
        "lm_head.weight",
        "model.layers.10.a",
        "model.layers.2.a",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ]
    assert output_order(names) == [
        "model.embed_tokens.weight",
        "model.layers.2.a",
        "model.layers.10.a",
        "lm_head.weight",
        "model.norm.weight",
    ]
    layers = [((0, i),) for i in range(24)] + [((1, 8 + i),) for i in range(24)]
    assert layer_ranges(layers) == [(0, 23, ((0, 0),)), (24, 47, ((1, 8),))]
    mixed = [((0, 8), (1, 8)), ((0, 9), (1, 9)), ((0, 3),)]
    assert layer_ranges(mixed) == [(0, 1, ((0, 8), (1, 8))), (2, 2, ((0, 3),))]


def test_config_says_the_new_depth_and_per_layer_lists_follow() -> None:
    config = {"num_hidden_layers": 4, "layer_types": ["s", "f", "s", "f"], "architectures": ["X"], "n": 4}
    layers = [((0, 0),), ((0, 1),), ((0, 2),), ((0, 1),), ((0, 2),), ((0, 3),)]
    edited = edit_config(config, layers)
    assert edited["num_hidden_layers"] == 6 and edited["n"] == 4
    assert edited["layer_types"] == ["s", "f", "s", "f", "s", "f"]
    assert edited["architectures"] == ["X"]
    assert edit_config({"n_layer": 12}, layers) == {"n_layer": 6}  # GPT-2's name for the depth


# -- programs ----------------------------------------------------------------------------------------


def test_depth_up_scaling_copies_each_tensor_from_the_layer_it_maps_to(ckpts: Path) -> None:
    prog = program(ckpts, "output deep = stack(layers(a, 0, 3), layers(a, 1, 4))")
    explained = prog.explain()
    assert "layer map (6 layers):" in explained
    assert "0–2       ← in0 a 0–2" in explained and "3–5       ← in1 a 1–3" in explained
    out = Path(prog.run(str(ckpts / "deep")))
    got, a = load_file(str(out / "model.safetensors")), states(ckpts)["a"]
    source = [0, 1, 2, 1, 2, 3]
    assert len(got) == 2 + 1 + 6 * 9  # embeddings, norm, head and six layers of nine tensors
    for name, tensor in got.items():
        parts = name.split(".")
        if "layers" in parts:
            k = parts.index("layers") + 1
            parts[k] = str(source[int(parts[k])])
        assert torch.equal(tensor, a[".".join(parts)]), name  # bit for bit
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == [f"kind{i}" for i in source]


def test_non_layer_tensors_come_from_the_first_and_last_slice(ckpts: Path) -> None:
    s = states(ckpts)
    got = program(ckpts, "output f = stack(layers(a, 0, 2), layers(b, 2, 4))").run()
    assert torch.equal(got["model.embed_tokens.weight"], s["a"]["model.embed_tokens.weight"])
    assert torch.equal(
        got["lm_head.weight"], s["b"]["lm_head.weight"]
    )  # mergekit: post-weights from the last
    assert torch.equal(got["model.norm.weight"], s["b"]["model.norm.weight"])
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], s["b"]["model.layers.3.mlp.up_proj.weight"])
    truncated = program(ckpts, "output t = layers(b, 1, 3)").run()  # one range: a shallower model
    assert torch.equal(
        truncated["model.layers.0.mlp.up_proj.weight"], s["b"]["model.layers.1.mlp.up_proj.weight"]
    )
    assert "model.layers.2.mlp.up_proj.weight" not in truncated and "lm_head.weight" in truncated


def test_a_slice_is_any_expression_and_its_gradient_counts_its_own_layers(ckpts: Path) -> None:
    s = states(ckpts)
    got = program(
        ckpts,
        "output m = stack(layers(a, 0, 1), slerp(layers(a, 1, 4), layers(b, 1, 4), t=gradient([0, 1])))",
    ).run()
    for out_layer, (src, t) in {1: (1, 0.0), 2: (2, 0.5), 3: (3, 1.0)}.items():
        for proj in ("mlp.up_proj.weight", "self_attn.q_proj.weight"):
            a, b = (s[n][f"model.layers.{src}.{proj}"].double() for n in ("a", "b"))
            got_ = got[f"model.layers.{out_layer}.{proj}"].double()
            torch.testing.assert_close(got_, ref_slerp(a, b, t), rtol=1 / 128, atol=1e-6)
    # outside a stack, gradient() counts the output's layers: 4 here, so t = layer / 3
    weights = _up_proj_weights(
        program(
            ckpts,
            "sa = stack(layers(a, 0, 2), layers(a, 2, 4))\n"
            "output r = sa + gradient([0, 1])*(stack(layers(b, 0, 2), layers(b, 2, 4)) - sa)",
        )
    )
    assert weights[0] == [1.0] and weights[3] == [1.0]
    assert weights[1] == pytest.approx([1 / 3, 2 / 3]) and weights[2] == pytest.approx([1 / 3, 2 / 3])


def _up_proj_weights(prog: tvlang.Program) -> dict[int, list[float]]:
    weights = {}
    for task in prog.plan().tasks:
        if task.name.endswith("mlp.up_proj.weight"):
            kernel = task.writes[0].kernel
            assert isinstance(kernel, WeightedSum)  # resolved before any data is read
            per_input: dict[int, float] = {}  # each input's weight, from the anchored terms w·(in - minus)
            for w, i, minus in kernel.terms:
                per_input[i] = per_input.get(i, 0.0) + w
                if minus is not None:
                    per_input[minus] = per_input.get(minus, 0.0) - w
            weights[int(task.name.split(".")[2])] = sorted(w for w in per_input.values() if w != 0)
    return weights


def test_gradients_inside_slices_restart_at_each_slice(ckpts: Path) -> None:
    prog = program(
        ckpts,
        "def ramp(x, y) = x + gradient([0, 1])*(y - x)\n"
        "output r = stack(ramp(layers(a, 0, 2), layers(b, 0, 2)), ramp(layers(a, 2, 4), layers(b, 2, 4)))",
    )
    # t is 0, then 1, in each two-layer slice: a's layer, then b's, twice over
    assert _up_proj_weights(prog) == {0: [1.0], 1: [1.0], 2: [1.0], 3: [1.0]}
    plan = prog.plan()
    reads = {
        t.name.split(".")[2]: {plan.inputs[i].ref.label for i in t.reads}
        for t in plan.tasks
        if ".up_proj" in t.name
    }
    assert reads == {"0": {"a"}, "1": {"b"}, "2": {"a"}, "3": {"b"}}


def test_printed_ir_and_the_verifier_after_every_pass(ckpts: Path) -> None:
    from tvlang.ir import format_graph, verify
    from tvlang.passes import PIPELINE

    graph = program(
        ckpts, "output m = stack(layers(a, 0, 2), 0.5*layers(a, 1, 3) + 0.5*layers(b, 1, 3))"
    ).graph(optimized=False)
    verify(graph)
    for p in PIPELINE:
        graph = p(graph)
        verify(graph)
    # each range is a view of its checkpoint placed in the output (layers 1:3 of a as output layers
    # 2..3, with the tensors after the layers); a slice's ranges keep their own one-slice stacks,
    # whose layers count from the slice's start
    assert format_graph(graph).splitlines() == [
        "%0 = input a layers 0:2@0+pre : model",
        "%1 = input a layers 1:3@2+post : model",
        "%2 = stack %1 as 0:2 : model",
        "%3 = input b layers 1:3@2+post : model",
        "%4 = stack %3 as 0:2 : model",
        "%5 = wsum 0.5*(%4 - %2) + 1*%2 : model",
        "%6 = stack %0 as 0:2, %5 as 2:4 : model",
        "output m = %6",
    ]


def test_compiled_and_eager_kernels_write_the_same_bits(ckpts: Path) -> None:
    text = (
        "output m = stack(layers(a, 0, 2), slerp(layers(a, 1, 3), layers(b, 1, 3), t=gradient([0.2, 0.7])),"
        ' scale(layers(b, 3, 4), where(matches("*o_proj*"), 0, 0.5)))'
    )
    eager = program(ckpts, text).run(options=Options(kernels="eager"))
    compiled = program(ckpts, text).run(options=Options(kernels="compiled", chunk=4096, threads=2))
    assert eager.keys() == compiled.keys() and len(eager) == 3 + 5 * 9
    assert all(torch.equal(eager[k], compiled[k]) for k in eager)
    assert not eager["model.layers.4.self_attn.o_proj.weight"].any()  # scaled by 0
    s = states(ckpts)
    half = (s["b"]["model.layers.3.mlp.up_proj.weight"].float() * 0.5).to(torch.bfloat16)
    assert torch.equal(eager["model.layers.4.mlp.up_proj.weight"], half)


def test_in_memory_state_dicts_stack_too(ckpts: Path) -> None:
    a = states(ckpts)["a"]
    got = tvlang.evaluate("stack(layers(a, 3, 4), layers(a, 0, 1))", bindings={"a": a})
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])


def test_memory_stays_at_the_budget(ckpts: Path) -> None:
    plan = program(ckpts, "output deep = stack(layers(a, 0, 3), layers(a, 1, 4))").plan(
        options=Options(memory=1 << 20)
    )
    assert plan.peak_memory <= 1 << 20
    assert plan.bytes_read == plan.bytes_written  # each output tensor reads exactly its one source


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "code", "message", "caret"),
    [
        ("output o = layers(a, 2, 9)", "E313", "outside `a`, which has 4 layers", "layers(a, 2, 9)"),
        (
            "output o = stack(layers(a, 0, 4), layers(b, 3, 5))",
            "E313",
            "which has 4 layers",
            "layers(b, 3, 5)",
        ),
        ("output o = layers(a, 3, 3)", "E212", "0 <= start < stop", "layers(a, 3, 3)"),
        (
            "output o = slerp(layers(a, 0, 2), layers(b, 0, 3), 0.5)",
            "E212",
            "3 layers with 2 layers",
            "layers(b",
        ),
        ("output o = layers(a, 0, 2) + (b - a)", "E212", "a whole model with 2 layers", 'load("b")'),
        ("output o = stack(a, layers(a, 0, 2))", "E212", "`stack` takes layer ranges", "a"),
        ("output o = layers(layers(a, 0, 3), 0, 2)", "E212", "not of a range", "layers(a, 0, 3)"),
        (
            "output o = stack(layers(a, 0, 2), layers(a, 0, 2) - layers(b, 0, 2))",
            "E212",
            "cannot stack models and task vectors",
            "layers(a, 0, 2) - ",
        ),
    ],
)
def test_positioned_errors(ckpts: Path, text: str, code: str, message: str, caret: str) -> None:
    with pytest.raises((TvTypeError, TvInputError)) as info:
        program(ckpts, text).plan()
    err = info.value
    assert err.code == code and message in err.message, err.render()
    assert err.span is not None and err.span.text.startswith(caret), err.render()
    assert f"prog.tv:{2 if caret.startswith('load') else 3}:" in err.render()
