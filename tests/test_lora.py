"""PEFT LoRA adapters as task vectors: scale·B@A formed chunk by chunk, mixed with full fine-tunes."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

import tvlang
from tvlang import cli
from tvlang.io.lora import LoraAdapter, LoraSource
from tvlang.synth import llama_shapes, make_state

TARGETS = ("q_proj", "v_proj")


def write_adapter(path: str, base: dict[str, torch.Tensor], *, r: int = 4, alpha: float = 8.0,
                  rslora: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """A PEFT-format adapter on the attention q/v projections; returns the dense deltas (float64)."""
    g = torch.Generator().manual_seed(seed)
    tensors, dense = {}, {}
    scale = alpha / (math.sqrt(r) if rslora else r)
    for name, w in base.items():
        if not any(f"self_attn.{t}.weight" in name for t in TARGETS):
            continue
        module = name[: -len(".weight")]
        a = torch.randn(r, w.shape[1], generator=g) * 0.1
        b = torch.randn(w.shape[0], r, generator=g) * 0.1
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(torch.bfloat16)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(torch.bfloat16)
        dense[name] = scale * (b.to(torch.bfloat16).double() @ a.to(torch.bfloat16).double())
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
              "target_modules": list(TARGETS), "fan_in_fan_out": False}  # fmt: skip
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)
    return dense


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("lora")
    shapes = llama_shapes(48, 2, 64)
    base = make_state(shapes, 0, torch.float32)
    ft = make_state(shapes, 1, torch.float32, base=base)
    save_file(base, str(d / "base.safetensors"))
    save_file(ft, str(d / "ft.safetensors"))
    dense = write_adapter(str(d / "adapter"), base)
    dense_rs = write_adapter(str(d / "adapter_rs"), base, rslora=True, seed=1)
    return {"dir": d, "base": base, "ft": ft, "dense": dense, "dense_rs": dense_rs}


@pytest.mark.parametrize("adapter", ["adapter", "adapter_rs"])
def test_lora_is_scale_B_A_on_its_layers_and_zero_elsewhere(models, adapter: str) -> None:
    d = models["dir"]
    out = tvlang.evaluate(f'base + 0.5*lora("{d}/{adapter}")', {"base": str(d / "base.safetensors")})
    dense = models["dense" if adapter == "adapter" else "dense_rs"]
    for name, b in models["base"].items():
        expect = b.double() + 0.5 * dense.get(name, torch.zeros_like(b, dtype=torch.float64))
        torch.testing.assert_close(out[name].double(), expect, rtol=2e-7, atol=1e-9)


def test_lora_mixes_with_full_fine_tunes_and_methods(models) -> None:
    d = models["dir"]
    binds = {"base": str(d / "base.safetensors"), "ft": tvlang.task_vector(str(d / "ft.safetensors"))}
    out = tvlang.evaluate(f'base + 0.3*ft + lora("{d}/adapter")', binds)
    name = "model.layers.1.self_attn.q_proj.weight"
    b, f = models["base"][name].double(), models["ft"][name].double()
    torch.testing.assert_close(
        out[name].double(), b + 0.3 * (f - b) + models["dense"][name], rtol=2e-7, atol=1e-9
    )
    expr = f'base + ties(ft, lora("{d}/adapter"), density=0.5)'
    tied = tvlang.evaluate(expr, binds)
    assert set(tied) == set(models["base"])
    # In small chunks an adapter gathers no sample (each element is a dot product): its selections
    # bracket from their first chunk, and select the same thresholds as one chunk and the eager path.
    small, eager = tvlang.evaluate(expr, binds, chunk=100), tvlang.evaluate(expr, binds, kernels="eager")
    assert all(torch.equal(tied[k], small[k]) and torch.equal(tied[k], eager[k]) for k in tied)


def test_chunks_are_rows_of_the_product_never_the_whole(models) -> None:
    adapter = LoraAdapter.open(str(models["dir"] / "adapter"))
    source = LoraSource(adapter)
    name = "model.layers.0.self_attn.q_proj.weight"
    full = models["dense"][name].reshape(-1)
    for start, stop in ((0, 7), (5, 100), (47, 49), (48 * 40, 48 * 48)):
        chunk = torch.from_numpy(source.read(name, start, stop))
        assert chunk.numel() == stop - start
        torch.testing.assert_close(chunk.double(), full[start:stop], rtol=1e-6, atol=1e-7)
    same = [tvlang.evaluate(f'base + lora("{models["dir"]}/adapter")', {"base": models["base"]}, chunk=c)
            for c in (None, 100, 4097)]  # fmt: skip
    assert all(torch.equal(same[0][k], s[k]) for s in same[1:] for k in same[0])


def test_bad_adapters_are_clear_errors(models, tmp_path) -> None:
    with pytest.raises(tvlang.TvInputError, match="not a PEFT LoRA adapter"):
        os.makedirs(tmp_path / "empty")
        tvlang.evaluate(f'base + lora("{tmp_path}/empty")', {"base": models["base"]})
    with pytest.raises(tvlang.TvInputError, match="only adapters"):
        tvlang.evaluate(f'lora("{models["dir"]}/adapter")', {"base": models["base"]})
    bad = {k: v for k, v in models["base"].items() if "layers.0.self_attn.q_proj" not in k}
    with pytest.raises(tvlang.TvInputError) as info:
        tvlang.evaluate(f'base + lora("{models["dir"]}/adapter")', {"base": bad})
    assert info.value.code == "E303" and "q_proj" in info.value.message


def test_lora_through_the_cli(models, tmp_path) -> None:
    d = models["dir"]
    out = tmp_path / "merged.safetensors"
    code = cli.main(["eval", f'base + lora("{d}/adapter")', "--bind", f"base={d}/base.safetensors",
                     "-o", str(out), "-q"])  # fmt: skip
    assert code == 0 and out.exists()
