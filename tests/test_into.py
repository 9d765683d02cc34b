"""Merging into a live model: ``Program.run(into=module)`` writes the output into the module's own
tensors, in place, and gives exactly the bits of writing a file and loading it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import tvlang
import tvlang.api
import tvlang.driver
from tvlang.errors import TvError


class Tiny(nn.Module):
    """Parameters, a persistent integer buffer and a non-persistent one (not in the state dict)."""

    def __init__(self, hidden: int = 24, vocab: int = 40) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(2), persistent=False)


def _states(dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(v.shape, generator=g) * 0.02) for k, v in Tiny().state_dict().items()}
    base["steps"] = torch.tensor([1, 2, 3])
    out = {"base": {k: v.to(dtype) if v.is_floating_point() else v for k, v in base.items()}}
    for i, name in enumerate(("a", "b"), 1):
        out[name] = {
            k: (v + torch.randn(v.shape, generator=g) * 0.005 * i).to(dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("into")
    paths = {}
    for name, state in _states(torch.bfloat16).items():
        paths[name] = d / f"{name}.safetensors"
        save_file(state, str(paths[name]))
    return paths


PROGRAMS = {
    "linear": "base + lam*(a - base) + 0.5*(b - base)",
    "ties": "base + ties(a - base, b - base, weights=[lam, 0.4], density=0.5)",
    "dare": "base + lam*dare(a - base, 0.3, seed=7) + dare(b - base, 0.5, seed=8, rescale='l1')",
}


def _bindings(ckpts: dict[str, Path]) -> dict[str, object]:
    return {k: str(v) for k, v in ckpts.items()}


@pytest.mark.parametrize("kind", sorted(PROGRAMS))
def test_into_is_bit_identical_to_file_then_load(ckpts: dict[str, Path], tmp_path: Path, kind: str) -> None:
    prog = tvlang.compile(f"param lam = 0.5\n{PROGRAMS[kind]}", bindings=_bindings(ckpts))
    model = Tiny().to(torch.bfloat16)
    params = {name: p for name, p in model.named_parameters()}
    ptrs = {name: t.data_ptr() for name, t in model.state_dict().items()}
    for lam in (0.3, 0.7):  # a second run into the same model: the same plan shape, new numbers
        out = tmp_path / f"{kind}-{lam}.safetensors"
        prog.run(out, params={"lam": lam})
        assert prog.run(into=model, params={"lam": lam}) is model
        expected = Tiny().to(torch.bfloat16)
        expected.load_state_dict(load_file(str(out)))
        for name, t in model.state_dict().items():
            assert torch.equal(
                t.view(-1).view(torch.uint8), expected.state_dict()[name].view(-1).view(torch.uint8)
            )
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == ptrs  # written in place
    assert all(params[n] is p for n, p in model.named_parameters())
    assert model.steps.tolist() == [1, 2, 3]  # integer buffers pass through from the template


def test_evaluate_into_a_state_dict_of_another_dtype(ckpts: dict[str, Path], tmp_path: Path) -> None:
    """A float32 target gets the float32 result (rounded once, from the wide accumulator)."""
    target = {k: torch.empty_like(v, dtype=torch.float32) if v.is_floating_point() else torch.empty_like(v)
              for k, v in load_file(str(ckpts["base"])).items()}  # fmt: skip
    expr = PROGRAMS["linear"].replace("lam", "0.25")
    tvlang.evaluate(expr, _bindings(ckpts), into=target)
    ref = tvlang.evaluate(expr, _bindings(ckpts), dtype="fp32")
    assert all(torch.equal(target[k], ref[k]) for k in ref)
    assert target["proj.weight"].dtype == torch.float32


def test_tied_weights_are_written_once(ckpts: dict[str, Path]) -> None:
    """A state dict name that shares storage with a written one (a tied head) is not an extra tensor."""
    model = Tiny().to(torch.bfloat16)
    model.head = nn.Linear(24, 40, bias=False).to(torch.bfloat16)
    model.head.weight = model.embed.weight
    tvlang.evaluate("base + 0.5*(a - base)", _bindings(ckpts), into=model)
    ref = tvlang.evaluate("base + 0.5*(a - base)", _bindings(ckpts))
    assert torch.equal(model.head.weight, ref["embed.weight"])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("shape", "tensor `proj.weight` is [24, 24] in the output but [24, 12] in the model"),
        ("missing", "the model has no tensor `norm.bias`"),
        ("extra", "the model has 1 tensor that the output lacks: `extra`"),
        ("int", "tensor `steps` is I64 in the output but torch.int32 in the model"),
    ],
)
def test_mismatched_model_is_refused_and_left_unchanged(
    ckpts: dict[str, Path], change: str, message: str
) -> None:
    model = Tiny().to(torch.bfloat16)
    if change == "shape":
        model.proj = nn.Linear(12, 24).to(torch.bfloat16)
    elif change == "missing":
        model.norm = nn.LayerNorm(24, bias=False).to(torch.bfloat16)
    elif change == "extra":
        model.register_buffer("extra", torch.ones(2))
    else:
        model.steps = torch.zeros(3, dtype=torch.int32)
    before = _snapshot(model)
    prog = tvlang.compile("output merged = base + 0.5*(a - base)", bindings=_bindings(ckpts))
    with pytest.raises(TvError) as err:
        prog.run(into=model)
    assert err.value.code == "E510"
    assert message in err.value.message
    assert "output merged = base" in str(err.value)  # positioned at the output statement
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_into_refuses_a_path_as_well_and_several_outputs(ckpts: dict[str, Path], tmp_path: Path) -> None:
    model = Tiny().to(torch.bfloat16)
    with pytest.raises(TvError, match="not both"):
        tvlang.evaluate("base", _bindings(ckpts), into=model, out=tmp_path / "x.safetensors")
    prog = tvlang.compile("output x = base\noutput y = a", bindings=_bindings(ckpts))
    with pytest.raises(TvError, match="into= takes one output") as err:
        prog.run(into=model)
    assert err.value.code == "E405"
    with pytest.raises(TvError) as err:
        tvlang.evaluate("base", _bindings(ckpts), into=[1, 2])
    assert err.value.code == "E510"


def test_a_second_run_builds_no_kernel(ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights are kernel arguments: a run with new numbers compiles nothing (its kernels' source
    is the one already built)."""
    from tvlang.codegen import c

    if c.compiler() is None:
        pytest.skip("no C compiler: the eager path builds no kernels")
    prog = tvlang.compile(f"param lam = 0.5\n{PROGRAMS['ties']}", bindings=_bindings(ckpts))
    model = Tiny().to(torch.bfloat16)
    prog.run(into=model, params={"lam": 0.2}, options=tvlang.Options(kernels="compiled"))

    def no_build(*args: object) -> None:
        raise AssertionError("a kernel was compiled again")

    monkeypatch.setattr(c, "_compile", no_build)
    prog.run(into=model, params={"lam": 0.9}, options=tvlang.Options(kernels="compiled"))
    ref = prog.run(params={"lam": 0.9}, options=tvlang.Options(kernels="compiled"))
    assert all(torch.equal(model.state_dict()[k], ref[k]) for k in ref)


def test_a_module_whose_state_dict_copies_is_refused(ckpts: dict[str, Path]) -> None:
    """Writing into copies would leave the module unchanged and say nothing: refused instead."""
    model = Tiny().to(torch.bfloat16)

    def copies(module: nn.Module, state: dict[str, torch.Tensor], prefix: str, local: object) -> None:
        for k in list(state):
            state[k] = state[k].clone()

    model._register_state_dict_hook(copies)
    with pytest.raises(TvError, match=r"state_dict\(\) gives a copy of") as err:
        tvlang.evaluate("base + 0.5*(a - base)", _bindings(ckpts), into=model)
    assert err.value.code == "E510"


def _counting_build_plan(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = tvlang.driver.build_plan

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tvlang.driver, "build_plan", counted)
    return calls


def test_repeated_runs_reuse_the_plan(
    ckpts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same params again: no planning; a new value, or an input file touched: planned again."""
    calls = _counting_build_plan(monkeypatch)
    paths = {k: tmp_path / v.name for k, v in ckpts.items()}
    for k, v in ckpts.items():
        paths[k].write_bytes(v.read_bytes())
    prog = tvlang.compile(f"param lam = 0.5\n{PROGRAMS['ties']}", bindings=_bindings(paths))
    model = Tiny().to(torch.bfloat16)
    prog.run(into=model, params={"lam": 0.3})
    first = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    prog.run(into=model, params={"lam": 0.3})
    assert len(calls) == 1
    assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())  # merged again, same bits
    opened: list[str] = []
    real_open = tvlang.driver.Checkpoint.open.__func__  # type: ignore[attr-defined]

    def counted_open(cls: type, path: str) -> object:
        opened.append(str(path))
        return real_open(cls, path)

    monkeypatch.setattr(tvlang.driver.Checkpoint, "open", classmethod(counted_open))
    prog.run(into=model, params={"lam": 0.4})
    assert len(calls) == 2
    assert opened == []  # a new plan, the same headers: not read again
    prog.run(into=model, params={"lam": 0.4}, options=tvlang.Options(chunk=7))  # other options
    assert len(calls) == 3
    prog.run(into=model, params={"lam": 0.4}, options=tvlang.Options(chunk=7))
    assert len(calls) == 3
    # an edited checkpoint (same size, new contents and mtime) is planned again
    state = load_file(str(paths["a"]))
    state["proj.weight"] = state["proj.weight"].flip(0).contiguous()
    save_file(state, str(paths["a"]))
    prog.run(into=model, params={"lam": 0.4}, options=tvlang.Options(chunk=7))
    assert len(calls) == 4
    assert opened == [str(paths["a"])]  # only the edited checkpoint's header is read again
    expected = prog.run(params={"lam": 0.4}, options=tvlang.Options(chunk=7))  # a new state dict
    assert len(calls) == 5
    assert all(torch.equal(expected[k], v) for k, v in model.state_dict().items())
    prog.run(params={"lam": 0.4}, options=tvlang.Options(chunk=7))
    assert len(calls) == 5
    prog.run(into=Tiny(), params={"lam": 0.4}, options=tvlang.Options(chunk=7))  # float32 targets
    assert len(calls) == 6


def test_plan_reuse_sees_in_memory_inputs_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """An in-memory input whose tensors changed shape or dtype is planned again (and checked again)."""
    calls = _counting_build_plan(monkeypatch)
    state = {"w": torch.ones(4), "b": torch.zeros(2)}
    zero = {"w": torch.zeros(4), "b": torch.zeros(2)}
    prog = tvlang.compile("param lam = 0.5\nz + lam * (m - z)", bindings={"m": state, "z": zero})
    assert prog.run(params={"lam": 2.0})["w"].tolist() == [2.0] * 4
    state["w"].fill_(3.0)  # new values, same layout: the plan still holds
    assert prog.run(params={"lam": 2.0})["w"].tolist() == [6.0] * 4
    assert len(calls) == 1
    state["w"], zero["w"] = torch.ones(5), torch.zeros(5)
    assert prog.run(params={"lam": 2.0})["w"].tolist() == [2.0] * 5
    assert len(calls) == 2
    state["b"] = "not a tensor"  # type: ignore[assignment]
    with pytest.raises(TvError) as e:
        prog.run(params={"lam": 2.0})
    assert e.value.code == "E307"


def test_a_reused_plan_keeps_its_compiled_kernels(
    ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan run again finds its kernels kept with it; a plan pickled (for other processes) leaves them out."""
    import pickle

    from tvlang.backends import compiled

    prog = tvlang.compile(f"param lam = 0.5\n{PROGRAMS['ties']}", bindings=_bindings(ckpts))
    if prog.plan(params={"lam": 0.3}).kernels != "compiled":
        pytest.skip("no C compiler here: the eager kernels have nothing to look up")
    prepared: list[int] = []
    real = compiled.Kernels.prepare

    def counted(self: compiled.Kernels) -> int:
        prepared.append(1)
        return real(self)

    monkeypatch.setattr(compiled.Kernels, "prepare", counted)
    model = Tiny().to(torch.bfloat16)
    prog.run(into=model, params={"lam": 0.3})
    prog.run(into=model, params={"lam": 0.3})
    assert len(prepared) == 1
    prog.run(into=model, params={"lam": 0.6})
    assert len(prepared) == 2
    plan = prog.plan(params={"lam": 0.3})
    compiled.prepare_kernels(plan)
    assert "kernels" not in pickle.loads(pickle.dumps(plan)).memo
