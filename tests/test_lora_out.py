"""LoRA out (``--as-lora R``, ``Options(as_lora=R)``) and model cards.

Tiny Llama- and GPT-2-shaped models are built with ``transformers`` (nothing is downloaded); the
fine-tunes differ from their base by rank-2 updates of every linear weight and by dense changes
to embeddings, norms and biases.  An adapter of rank ≥ 2 must then recover the fine-tune exactly
(to float32 rounding of its factors): PEFT loads it onto the base and its forward pass is
compared with the fine-tune's.  The SVD's truncation is checked against numpy's singular values.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tvlang
from tvlang import cli
from tvlang.errors import TvError
from tvlang.io.lora_out import ERRORS_KEY, factorize

transformers = pytest.importorskip(
    "transformers", reason="adapters are checked by loading them (`test` extra)"
)
peft = pytest.importorskip("peft", reason="adapters are checked by loading them with PEFT (`test` extra)")
yaml = pytest.importorskip("yaml", reason="the model card's front matter is YAML")

VOCAB = 64


def _finetune(model: Any, seed: int) -> dict[str, torch.Tensor]:
    """Rank-2 updates of every linear weight, dense changes to everything else."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            out[name] = t
        elif t.dim() == 2 and not any(e in name for e in ("embed", "wte", "wpe", "lm_head")):
            out[name] = t + 0.05 * torch.randn(t.shape[0], 2, generator=g) @ torch.randn(
                2, t.shape[1], generator=g
            )
        else:
            out[name] = t + 0.02 * torch.randn(t.shape, generator=g)
    return out


def _family(root: Path, kind: str) -> dict[str, Path]:
    torch.manual_seed(0)
    if kind == "llama":
        cfg: Any = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
        cls: Any = transformers.LlamaForCausalLM
    else:
        cfg = transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        cls = transformers.GPT2LMHeadModel
    base = cls(cfg)
    paths = {"base": root / f"{kind}-base", "ft": root / f"{kind}-ft"}
    base.save_pretrained(paths["base"])
    ft = cls(cfg)
    ft.load_state_dict(_finetune(base, 1), strict=False)
    ft.save_pretrained(paths["ft"])
    return paths


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _family(tmp_path_factory.mktemp("lora-out"), "llama")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _family(tmp_path_factory.mktemp("lora-out"), "gpt2")


def _logits(model: Any) -> torch.Tensor:
    ids = torch.arange(20).reshape(2, 10) % VOCAB
    with torch.no_grad():
        return model(ids).logits


def _load(path: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def _with_adapter(base: Path, adapter: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on tied embeddings saved whole
        return peft.PeftModel.from_pretrained(_load(base), adapter)


def _errors(adapter: Path) -> dict[str, float]:
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        meta = f.metadata()
    return {k: float(v) for k, v in json.loads(meta[ERRORS_KEY]).items()}


def _front_matter(card: str) -> dict[str, Any]:
    assert card.startswith("---\n")
    data = yaml.safe_load(card.split("---\n")[1])
    assert isinstance(data, dict)
    return data


# -- adapters load with PEFT and recover the task vector -----------------------------------------


def test_cli_extracts_a_llama_adapter_that_peft_loads(
    llama: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "adapter"
    args = ["eval", "ft - base", "--bind", f"base={llama['base']}", "--bind", f"ft={llama['ft']}"]
    assert cli.main([*args, "-o", str(out), "--as-lora", "4"]) == 0
    err = capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(llama["base"])
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert {"model.embed_tokens", "lm_head", "model.norm"} <= set(config["modules_to_save"])
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")
    assert a.shape == (4, 32) and b.shape == (48, 4) and a.dtype == torch.float32

    errors = _errors(out)
    assert len(errors) == 14 and max(errors.values()) < 1e-6  # rank-2 deltas: exact up to float32 factors
    for name in errors:  # the run summary names every factored tensor with its error
        assert f"{name}: rank 4, relative error" in err

    adapted, ft, base = (
        _logits(_with_adapter(llama["base"], out)),
        _logits(_load(llama["ft"])),
        _logits(_load(llama["base"])),
    )
    assert (base - ft).abs().max() > 0.05
    torch.testing.assert_close(adapted, ft, atol=2e-5, rtol=0)

    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front["base_model"] == [str(llama["base"])] and front["library_name"] == "peft"
    assert {"merge", "tvlang"} <= set(front["tags"])
    assert "ft - base" in card and "| `model.layers.0.self_attn.q_proj.weight` | 4 |" in card


def test_python_adapter_of_a_merged_gpt2(gpt2: dict[str, Path], tmp_path: Path) -> None:
    """A model output M is written as M - base: Conv1D weights (fan_in_fan_out), biases (lora_bias)
    and a head tied to the embeddings all come out right."""
    prog = tvlang.compile(
        "base + 0.5*(ft - base)", bindings={"base": str(gpt2["base"]), "ft": str(gpt2["ft"])}
    )
    merged = prog.run(tmp_path / "merged", options=tvlang.Options(dtype="fp32"))
    adapter = prog.run(tmp_path / "adapter", options=tvlang.Options(as_lora=2))
    assert adapter == str(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["lora_bias"] and "lm_head" in config["modules_to_save"]
    assert max(_errors(tmp_path / "adapter").values()) < 1e-6
    torch.testing.assert_close(
        _logits(_with_adapter(gpt2["base"], tmp_path / "adapter")),
        _logits(_load(Path(merged))),
        atol=2e-5,
        rtol=0,
    )


def test_truncated_error_is_the_svds_and_is_reported(llama: dict[str, Path], tmp_path: Path) -> None:
    """Rank 1 < the true rank 2: each reported error is the optimal one, √(Σ_{i>1} σᵢ²)/‖D‖."""
    bindings = {"base": str(llama["base"]), "ft": str(llama["ft"])}
    tvlang.evaluate("ft - base", bindings, out=tmp_path / "r1", as_lora=1, lora_svd="exact")
    errors = _errors(tmp_path / "r1")
    name = "model.layers.1.mlp.down_proj.weight"
    with (
        safe_open(llama["base"] / "model.safetensors", "pt") as b,
        safe_open(llama["ft"] / "model.safetensors", "pt") as f,
    ):
        d = (f.get_tensor(name).double() - b.get_tensor(name).double()).numpy()
    s = np.linalg.svd(d, compute_uv=False)
    assert errors[name] == pytest.approx(math.sqrt((s[1:] ** 2).sum() / (s**2).sum()), rel=1e-6)
    assert all(0.01 < e < 1 for e in errors.values())


def test_factorize_exact_and_randomized() -> None:
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64)).Q
    s = 0.8 ** torch.arange(200, dtype=torch.float64)  # a decaying spectrum
    d = (u[:, :200] * s) @ v.T
    optimal = float(torch.sqrt((s[8:] ** 2).sum()) / torch.sqrt((s**2).sum()))
    for method in ("exact", "randomized", "auto"):
        a, b = factorize(d, 8, method=method, seed=1)
        err = float(torch.linalg.norm(d - b @ a) / torch.linalg.norm(d))
        assert optimal <= err * (1 + 1e-9) and err <= optimal * 1.01, method
    low = d[:, :5] @ torch.randn(5, 200, generator=g, dtype=torch.float64)  # rank 5 ≤ 8: exact
    a, b = factorize(low, 8, method="randomized", seed=2)
    torch.testing.assert_close(b @ a, low, atol=1e-12 * float(low.abs().max()), rtol=0)
    a2, b2 = factorize(low, 8, method="randomized", seed=2)
    assert torch.equal(a, a2) and torch.equal(b, b2)  # the sketch is seeded: same bits every run


def test_mergekit_config_as_adapter(llama: dict[str, Path], tmp_path: Path) -> None:
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(llama["base"]),
        "models": [{"model": str(llama["ft"]), "parameters": {"weight": 0.5}}],
        "dtype": "float32",
    }
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / "adapter"
    assert cli.main(["run", str(path), "-o", str(out), "--as-lora", "2", "-q"]) == 0
    merged = tmp_path / "merged"
    assert cli.main(["run", str(path), "-o", str(merged), "-q"]) == 0
    torch.testing.assert_close(
        _logits(_with_adapter(llama["base"], out)), _logits(_load(merged)), atol=2e-5, rtol=0
    )
    assert "merge_method: task_arithmetic" in (out / "README.md").read_text()


# -- errors ---------------------------------------------------------------------------------------


def test_adapter_errors(llama: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["eval", "a + 0.5*(b - a)", "--bind", f"a={llama['base']}", "--bind", f"b={llama['ft']}"]
    assert cli.main([*args, "-o", str(tmp_path / "x"), "--as-lora", "4"]) == 1
    err = capsys.readouterr().err
    assert "error[E408]" in err and "no model is named `base`" in err and "--lora-base" in err
    assert cli.main([*args, "-o", str(tmp_path / "x"), "--as-lora", "4", "--lora-base", "a", "-q"]) == 0

    assert cli.main([*args, "-o", str(tmp_path / "x.safetensors"), "--as-lora", "4", "--lora-base", "a"]) == 1
    assert "error[E505]" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()

    bindings = {"base": str(llama["base"]), "ft": str(llama["ft"])}
    with pytest.raises(TvError) as e:
        tvlang.evaluate("ft - base", bindings, out=tmp_path / "y", as_lora=0)
    assert e.value.code == "E402"
    with pytest.raises(TvError) as e:
        tvlang.compile("mid = 0.5*base + 0.5*ft\nmid - base").run(
            tmp_path / "y", bindings=bindings, options=tvlang.Options(as_lora=2, lora_base="mid")
        )
    assert e.value.code == "E408" and "not a checkpoint" in e.value.message
    with pytest.raises(TvError) as e:
        tvlang.evaluate("ft - base", bindings, as_lora=2)
    assert e.value.code == "E408"
    assert not (tmp_path / "y").exists()


# -- model cards ----------------------------------------------------------------------------------


def test_merge_writes_a_model_card_replacing_the_templates(llama: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    for f in os.listdir(llama["base"]):
        (base / f).write_bytes((llama["base"] / f).read_bytes())
    (base / "README.md").write_text("# the base model's own card\n")
    prog = tmp_path / "merge.tv"
    prog.write_text(
        f'base = load("{base}")\nft = load("{llama["ft"]}")\nparam lam = 0.3\noutput merged = base + lam*(ft - base)\n'
    )
    out = tmp_path / "out"
    assert cli.main(["run", str(prog), "-o", str(out), "--set", "lam=0.25", "-q"]) == 0
    card = (out / "README.md").read_text()
    front = _front_matter(card)
    assert front["base_model"] == [str(base), str(llama["ft"])]
    assert front["tags"] == ["merge", "tvlang"] and front["library_name"] == "transformers"
    assert "the base model's own card" not in card
    assert "output merged = base + lam*(ft - base)" in card and "`lam` = 0.25" in card
    assert f"tvlang]({'https://pypi.org/project/tvlang/'}) {tvlang.__version__}" in card
    _logits(_load(out))  # the directory is still a model transformers loads

    single = tmp_path / "single.safetensors"
    assert cli.main(["run", str(prog), "-o", str(single), "-q"]) == 0  # a file has no card beside it
    assert not (tmp_path / "README.md").exists()


def test_mergekit_card_carries_the_config(llama: dict[str, Path], tmp_path: Path) -> None:
    text = (
        "# my merge\n"
        "merge_method: linear\n"
        f"models:\n  - model: {llama['base']}\n    parameters: {{weight: 0.7}}\n"
        f"  - model: {llama['ft']}\n    parameters: {{weight: 0.3}}\n"
    )
    path = tmp_path / "linear.yml"
    path.write_text(text)
    assert cli.main(["run", str(path), "-o", str(tmp_path / "out"), "-q"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert text.strip() in card
    assert _front_matter(card)["base_model"] == [str(llama["base"]), str(llama["ft"])]


# -- the language form: output NAME = as_lora(expr, rank=R) ---------------------------------------


def test_as_lora_outputs_in_a_program_with_a_sweep(llama: dict[str, Path], tmp_path: Path) -> None:
    prog = tmp_path / "adapters.tv"
    prog.write_text(
        f'base = load("{llama["base"]}")\nft = load("{llama["ft"]}")\nparam lam = [0.25, 1]\n'
        'output adapter = as_lora(base + lam*(ft - base), rank=3, svd="exact")\n'
    )
    assert cli.main(["run", str(prog), "-o", str(tmp_path / "out"), "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter.lam=0.25", "adapter.lam=1"]
    full = tmp_path / "out" / "adapter.lam=1"
    assert json.loads((full / "adapter_config.json").read_text())["r"] == 3
    assert "as_lora(base + lam*(ft - base), rank=3" in (full / "README.md").read_text()
    torch.testing.assert_close(
        _logits(_with_adapter(llama["base"], full)), _logits(_load(llama["ft"])), atol=2e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("program", "message", "marked"),
    [
        (
            "output a = 2 * as_lora(ft - base, rank=4)",
            "whole value of an `output` line",
            "as_lora(ft - base, rank=4)",
        ),
        ("output a = as_lora(ft - base)", "needs the adapter's rank", "as_lora(ft - base)"),
        ("output a = as_lora(ft - base, rank=1.5)", "whole number", "1.5"),
        ("output a = as_lora(ft - base, rank=4, sdv='exact')", "no argument `sdv`", "sdv"),
        (
            "output a = as_lora(ft - base, rank=4)\noutput m = ft",
            "other outputs are adapters",
            "as_lora(ft - base, rank=4)",
        ),
        (
            "mid = 0.5*ft + 0.5*base\noutput a = as_lora(ft - mid, rank=4, base=mid)",
            "is a model, not a checkpoint",
            "as_lora(ft - mid, rank=4, base=mid)",
        ),
    ],
)
def test_as_lora_errors_point_at_the_call(
    llama: dict[str, Path], tmp_path: Path, program: str, message: str, marked: str
) -> None:
    bindings = {"base": str(llama["base"]), "ft": str(llama["ft"])}
    with pytest.raises(TvError) as e:
        tvlang.compile(program, bindings=bindings).run(tmp_path / "a")
    assert e.value.code == "E408" and message in e.value.message
    assert e.value.span is not None and e.value.span.text == marked
    assert not (tmp_path / "a").exists()


def test_job_file_field_and_filtered_task_vector(llama: dict[str, Path], tmp_path: Path) -> None:
    """``as_lora:`` in a job; mergekit's --exclude-regex as a per-tensor factor: zero factors there."""
    from tvlang.config import run_job

    job = {
        "expression": '(1 - matches("*mlp*")) * (ft - base)',
        "bindings": {"base": str(llama["base"]), "ft": str(llama["ft"])},
        "output": str(tmp_path / "adapter"),
        "as_lora": 2,
    }
    assert run_job(job) == str(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        mlp = f.get_tensor("base_model.model.model.layers.0.mlp.up_proj.lora_B.weight")
        attn = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    assert not mlp.any() and attn.any()


def test_in_memory_inputs_and_nonfinite_task_vectors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    base = {"m.proj.weight": torch.randn(8, 6, generator=g), "m.norm.weight": torch.ones(6)}
    low = torch.randn(8, 1, generator=g) @ torch.randn(1, 6, generator=g)
    ft = {"m.proj.weight": base["m.proj.weight"] + low, "m.norm.weight": torch.full((6,), 2.0)}
    out = tvlang.evaluate("ft - base", {"base": base, "ft": ft}, out=tmp_path / "ad", as_lora=1)
    config = json.loads((Path(out) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] is None and config["modules_to_save"] == ["m.norm"]
    with safe_open(Path(out) / "adapter_model.safetensors", "pt") as f:
        a, b = (
            f.get_tensor("base_model.model.m.proj.lora_A.weight"),
            f.get_tensor("base_model.model.m.proj.lora_B.weight"),
        )
        torch.testing.assert_close(f.get_tensor("base_model.model.m.norm.weight"), ft["m.norm.weight"])
    torch.testing.assert_close(b @ a, low, atol=1e-6, rtol=0)
    assert _errors(Path(out))["m.proj.weight"] < 1e-6

    ft["m.proj.weight"][2, 3] = float("nan")
    with pytest.raises(TvError) as e:
        tvlang.evaluate(
            "ft - base", {"base": base, "ft": ft}, out=tmp_path / "nan", as_lora=1, nonfinite="propagate"
        )
    assert e.value.code == "E308" and "m.proj.weight" in e.value.message
    assert not (tmp_path / "nan").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason='triton is not installed (pip install "tvlang[gpu]")'
)
def test_gpu_backend_writes_the_same_adapter(gpt2: dict[str, Path], tmp_path: Path) -> None:
    """--device cuda in Triton's interpreter (a subprocess: TRITON_INTERPRET=1 must precede the import)."""
    args = ["eval", "base + 0.5*(ft - base)", "--bind", f"base={gpt2['base']}", "--bind", f"ft={gpt2['ft']}"]
    assert cli.main([*args, "-o", str(tmp_path / "cpu"), "--as-lora", "4", "-q"]) == 0
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(tvlang.__file__).parent.parent)}
    cmd = [
        sys.executable,
        "-m",
        "tvlang",
        *args,
        "-o",
        str(tmp_path / "gpu"),
        "--as-lora",
        "4",
        "-q",
        "--device",
        "cuda",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cpu, gpu = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("cpu", "gpu"))
    assert cpu.keys() == gpu.keys() and all(torch.equal(cpu[k], gpu[k]) for k in cpu)
