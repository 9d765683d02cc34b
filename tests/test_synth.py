"""tvlang.synth: Llama specs, configs consistent with the shapes, sharded streaming families."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open

import tvlang
from tvlang.synth import (
    LlamaSpec,
    llama_shapes,
    llama_spec,
    make_family,
    spec_for_bytes,
    write_family,
)

NAMES = ("base", "a", "b")


def tensors(path: str) -> dict[str, torch.Tensor]:
    files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    out = {}
    for p in files:
        with safe_open(p, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a mapping)
    return out


def digest(path: str) -> str:
    h = hashlib.sha256()
    for f in sorted(os.listdir(path)):
        with open(os.path.join(path, f), "rb") as fh:
            h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_config_matches_shapes() -> None:
    spec = llama_spec(512, 3, vocab=1000)
    shapes, cfg = spec.shapes(), spec.config("fp16")
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (
        shapes["model.embed_tokens.weight"]
        == shapes["lm_head.weight"]
        == (cfg["vocab_size"], cfg["hidden_size"])
    )
    assert sum(k.endswith("input_layernorm.weight") for k in shapes) == cfg["num_hidden_layers"] == 3
    assert shapes["model.layers.2.mlp.up_proj.weight"] == (cfg["intermediate_size"], cfg["hidden_size"])
    assert cfg["num_attention_heads"] * cfg["head_dim"] == cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (kv, cfg["hidden_size"])
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0 and kv < cfg["hidden_size"]
    assert cfg["torch_dtype"] == "float16" and cfg["tie_word_embeddings"] is False
    assert LlamaSpec.from_shapes(shapes) == spec
    assert len(llama_spec(256, 33).shapes()) == 300


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("target", [100 * 2**20, 2**30, 4 * 2**30, 8 * 2**30])
def test_spec_for_bytes_is_close_below(target: int, dtype: str) -> None:
    spec = spec_for_bytes(target, dtype)
    size = spec.nbytes(dtype)
    assert size <= target
    assert 0.9 * target < size
    assert spec.heads % spec.kv_heads == 0 and spec.hidden % 256 == 0


def test_spec_for_bytes_too_small() -> None:
    with pytest.raises(ValueError, match="too small"):
        spec_for_bytes(2**16)


def test_sharded_family(tmp_path: object) -> None:
    spec = llama_spec(128, 2, vocab=300)
    root = str(tmp_path)
    paths = write_family(os.path.join(root, "s3"), NAMES, spec, dtype="bf16", shards=3, seed=7)
    base = paths["base"]
    files = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with open(os.path.join(base, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(spec.shapes())
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == spec.nbytes("bf16")
    with open(os.path.join(base, "config.json")) as f:
        assert json.load(f) == json.loads(json.dumps(spec.config("bf16")))

    sd = {n: tensors(p) for n, p in paths.items()}
    for name, shape in spec.shapes().items():
        assert sd["base"][name].shape == shape and sd["base"][name].dtype == torch.bfloat16
        b, a = sd["base"][name].float(), sd["a"][name].float()
        if len(shape) == 1:
            assert 0.5 < b.mean().item() < 1.5  # norm gains around 1
        rel = (a - b).abs().mean() / b.abs().mean() if len(shape) > 1 else (a - b).abs().mean()
        assert 0 < rel < 0.2, name  # a small, non-zero delta
    assert not torch.equal(sd["a"]["lm_head.weight"], sd["b"]["lm_head.weight"])

    # the bytes depend on the seed and the spec only: not on the shard count or the family's size
    one = write_family(os.path.join(root, "s1"), NAMES[:2], spec, dtype="bf16", shards=1, seed=7)
    assert os.listdir(one["a"]).count("model.safetensors") == 1
    assert all(torch.equal(sd["a"][k], v) for k, v in tensors(one["a"]).items())
    again = write_family(os.path.join(root, "s3"), NAMES, spec, dtype="bf16", shards=3, seed=7)
    assert digest(again["b"]) == digest(paths["b"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dtypes_and_file_layout(tmp_path: object, dtype: torch.dtype) -> None:
    spec = llama_spec(64, 1, vocab=100)
    paths = write_family(str(tmp_path), NAMES[:2], spec, dtype=dtype, layout="file")
    assert paths["a"].endswith("a.safetensors")
    with safe_open(paths["a"], "pt") as f:
        t = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert t.dtype == dtype and t.shape == (64, spec.intermediate)


def test_tvlang_reads_a_family(tmp_path: object) -> None:
    spec = llama_spec(128, 1, vocab=200)
    paths = write_family(str(tmp_path), NAMES, spec, shards=2)
    out = tvlang.evaluate("base + 0.5*(a - base)", bindings={"base": paths["base"], "a": paths["a"]})
    sd = {n: tensors(paths[n]) for n in ("base", "a")}
    for k, v in out.items():
        ref = (sd["base"][k].double() + 0.5 * (sd["a"][k].double() - sd["base"][k].double())).to(
            torch.bfloat16
        )
        assert (v.float() - ref.float()).abs().max() <= 2 * torch.finfo(torch.bfloat16).eps * ref.abs().max()


def test_make_family_writes_a_complete_config(tmp_path: object) -> None:
    paths = make_family(str(tmp_path), ["base"], llama_shapes(64, 2, 256), layout="dir")
    with open(os.path.join(paths["base"], "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (64, 2, 256)
    assert cfg["intermediate_size"] == 64 * 8 // 3 and cfg["torch_dtype"] == "bfloat16"
