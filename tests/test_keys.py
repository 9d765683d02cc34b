"""Key-set policy: inputs that hold different tensor names (tied heads, extra buffers)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tvlang
from tvlang import cli


@pytest.fixture
def models() -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = {"embed": torch.randn(6, 3, generator=g), "head": torch.randn(6, 3, generator=g),
            "step": torch.tensor([7])}  # fmt: skip
    tied = {"embed": base["embed"] + 1.0, "extra": torch.ones(2)}  # no head (tied to embed), one extra buffer
    return {"base": base, "ft": tied}


def test_exact_is_the_default_and_says_what_differs(models) -> None:
    with pytest.raises(tvlang.TvInputError) as info:
        tvlang.evaluate("base + 0.5*(ft - base)", models)
    assert info.value.code == "E303" and "`head`" in info.value.message


def test_intersection_keeps_shared_tensors(models) -> None:
    out = tvlang.evaluate("base + 0.5*(ft - base)", models, keys="intersection")
    assert sorted(out) == ["embed"]
    torch.testing.assert_close(out["embed"], models["base"]["embed"] + 0.5)


def test_union_treats_a_missing_tensor_as_unchanged(models) -> None:
    out = tvlang.evaluate("base + 0.5*(ft - base)", models, keys="union")
    assert sorted(out) == ["embed", "extra", "head", "step"]
    torch.testing.assert_close(out["head"], models["base"]["head"])  # ft lacks it: its task vector is zero
    torch.testing.assert_close(out["extra"], models["ft"]["extra"])  # base lacks it: counts as ft there
    assert torch.equal(out["step"], models["base"]["step"])
    plan = tvlang.compile("base + 0.5*(ft - base)", bindings=models).plan(
        options=tvlang.Options(keys="union")
    )
    head = next(t for t in plan.tasks if t.name == "head")
    assert head.reads == (0,)  # only the base is read for it


def test_union_from_the_command_line(models, tmp_path) -> None:
    for name, sd in models.items():
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    args = ["eval", "base + 0.5*(ft - base)", "--bind", f"base={tmp_path}/base.safetensors",
            "--bind", f"ft={tmp_path}/ft.safetensors", "-o", str(tmp_path / "out.safetensors"), "-q"]  # fmt: skip
    assert cli.main(args) == 1
    assert cli.main([*args, "--keys", "union"]) == 0
    with pytest.raises(tvlang.TvParamError):
        tvlang.evaluate("base", models, keys="some")


def test_resized_vocabulary_merges_the_common_rows(tmp_path) -> None:
    g = torch.Generator().manual_seed(1)
    base = {"embed": torch.randn(10, 4, generator=g), "w": torch.randn(4, 4, generator=g)}
    ft = {"embed": torch.randn(12, 4, generator=g), "w": torch.randn(4, 4, generator=g)}  # two added tokens
    with pytest.raises(tvlang.TvInputError) as info:
        tvlang.evaluate("base + 0.5*(ft - base)", {"base": base, "ft": ft})
    assert info.value.code == "E304" and "--rows common" in str(info.value)
    out = tvlang.evaluate("base + 0.5*(ft - base)", {"base": base, "ft": ft}, rows="common")
    assert out["embed"].shape == (10, 4)
    torch.testing.assert_close(out["embed"], 0.5 * base["embed"] + 0.5 * ft["embed"][:10])
    for name, sd in (("base", base), ("ft", ft)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
    args = ["eval", "base + 0.5*(ft - base)", "--bind", f"base={tmp_path}/base.safetensors",
            "--bind", f"ft={tmp_path}/ft.safetensors", "-o", str(tmp_path / "o.safetensors"), "-q", "--rows", "common"]  # fmt: skip
    assert cli.main(args) == 0
    with pytest.raises(tvlang.TvInputError):  # other dimensions must still agree
        tvlang.evaluate(
            "0.5*a + 0.5*b", {"a": {"x": torch.zeros(3, 4)}, "b": {"x": torch.zeros(3, 5)}}, rows="common"
        )


def test_the_union_example_job(models, tmp_path) -> None:
    import shutil

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "keys", "tied_head.yaml")
    (tmp_path / "ckpt").mkdir()
    save_file(models["base"], str(tmp_path / "ckpt" / "base.safetensors"))
    save_file(models["ft"], str(tmp_path / "ckpt" / "ft_tied.safetensors"))
    shutil.copy(example, tmp_path / "job.yaml")
    assert cli.main(["run", str(tmp_path / "job.yaml"), "-q"]) == 0
    out = load_file(str(tmp_path / "merged.safetensors"))
    assert sorted(out) == ["embed", "extra", "head", "step"]
    torch.testing.assert_close(out["head"], models["base"]["head"])
