"""tvlang.tune: search a program's parameters by merging into a live model and scoring it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tvlang
from tvlang.errors import TvError

# base + lam*tau + mu*sigma with tau, sigma unit vectors: the merged weights are (lam, mu)
SOURCE = "param lam = 0\nparam mu = 0\noutput merged = base + lam*tau + mu*sigma"
OPT = (0.3, 0.7)


def _bindings() -> dict[str, object]:
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    return {
        "base": base,
        "tau": tvlang.task_vector({"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}),
        "sigma": tvlang.task_vector({"w": torch.tensor([0.0, 1.0], dtype=torch.float64)}),
    }


def quadratic(model: dict[str, torch.Tensor]) -> float:
    lam, mu = model["w"].tolist()
    return -((lam - OPT[0]) ** 2) - (mu - OPT[1]) ** 2


def test_grid_finds_the_optimum_of_a_quadratic() -> None:
    res = tvlang.tune(SOURCE, {"lam": (0, 1), "mu": (0, 1)}, quadratic, bindings=_bindings(), progress=False)
    assert len(res.trials) == 121  # 11 x 11 points
    assert res.best_params == {"lam": 0.3, "mu": 0.7}
    assert res.best_score == pytest.approx(0.0, abs=1e-20)
    # a budget shrinks the grid to what fits: 3 x 3
    small = tvlang.tune(SOURCE, {"lam": (0, 1), "mu": [0.7]}, quadratic, bindings=_bindings(),
                        trials=3, progress=False)  # fmt: skip
    assert [t.params["lam"] for t in small.trials] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize("sampler", ["tpe", "cmaes"])
def test_optuna_sampler_finds_the_optimum_reproducibly(sampler: str) -> None:
    pytest.importorskip("optuna", reason="Optuna samplers need the tvlang[tune] extra")
    if sampler == "cmaes":
        pytest.importorskip("cmaes", reason="Optuna's CMA-ES sampler needs the cmaes package")
    space = {"lam": (0.0, 1.0), "mu": (0.0, 1.0)}
    runs = [
        tvlang.tune(
            SOURCE, space, quadratic, bindings=_bindings(), trials=40, sampler=sampler, seed=3, progress=False
        )
        for _ in range(2)
    ]
    assert [t.params for t in runs[0].trials] == [t.params for t in runs[1].trials]  # same seed, same trials
    best = runs[0].best_params
    assert math.dist((best["lam"], best["mu"]), OPT) < 0.12
    other = tvlang.tune(SOURCE, space, quadratic, bindings=_bindings(), trials=5, sampler=sampler, seed=4,
                        progress=False)  # fmt: skip
    assert [t.params for t in other.trials] != [t.params for t in runs[0].trials[:5]]


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((2,), 9.0, dtype=torch.float64))


def test_tune_into_a_module_keeps_its_storage_and_ends_at_the_best(tmp_path: Path) -> None:
    model = Two()
    ptr = model.w.data_ptr()
    seen: list[list[float]] = []

    def score(m: Two) -> float:
        assert m is model
        seen.append(m.w.tolist())
        return -((m.w[0].item() - 0.4) ** 2)

    res = tvlang.tune(SOURCE, {"lam": [0.2, 0.4, 0.6], "mu": [0.5]}, score, bindings=_bindings(), into=model,
                      progress=False)  # fmt: skip
    assert seen == [[0.2, 0.5], [0.4, 0.5], [0.6, 0.5]]
    assert res.best_params == {"lam": 0.4, "mu": 0.5}
    assert model.w.tolist() == [0.4, 0.5] and model.w.data_ptr() == ptr  # the best merge, in place
    assert [t.number for t in res.trials] == [0, 1, 2] and all(t.seconds > 0 for t in res.trials)


def test_study_is_saved_and_resumed(tmp_path: Path) -> None:
    study = tmp_path / "study.json"
    space = {"lam": (0.0, 1.0), "mu": [0.7]}
    calls = 0

    def counted(model: dict[str, torch.Tensor]) -> float:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise KeyboardInterrupt  # Ctrl-C during the fourth trial
        return quadratic(model)

    first = tvlang.tune(SOURCE, space, counted, bindings=_bindings(), study=study, progress=False)
    assert first.interrupted and len(first.trials) == 3
    assert len(json.loads(study.read_text())["trials"]) == 3
    again = tvlang.tune(SOURCE, space, counted, bindings=_bindings(), study=study, progress=False)
    assert not again.interrupted and len(again.trials) == 11 and calls == 4 + 8  # the rest of the grid only
    assert again.best_params == {"lam": 0.3, "mu": 0.7}
    assert tvlang.TuneResult.load(study).trials == again.trials
    with pytest.raises(TvError, match="another space") as err:
        tvlang.tune(SOURCE, {"lam": (0.0, 2.0), "mu": [0.7]}, quadratic, bindings=_bindings(), study=study,
                    progress=False)  # fmt: skip
    assert err.value.code == "E420"


def test_optuna_study_resumes_from_json(tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="Optuna samplers need the tvlang[tune] extra")
    study = tmp_path / "tpe.json"
    space = {"lam": (0.0, 1.0), "mu": (0.0, 1.0)}
    part = tvlang.tune(SOURCE, space, quadratic, bindings=_bindings(), trials=6, sampler="tpe", study=study,
                       progress=False)  # fmt: skip
    whole = tvlang.tune(SOURCE, space, quadratic, bindings=_bindings(), trials=9, sampler="tpe", study=study,
                        progress=False)  # fmt: skip
    assert whole.trials[:6] == part.trials and len(whole.trials) == 9


def test_outputs_table_plot_and_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    res = tvlang.tune(SOURCE, {"lam": (0.0, 1.0), "mu": [0.7]}, quadratic, bindings=_bindings(), trials=5)
    err = capsys.readouterr().err  # not a terminal: one summary line at the end
    assert (
        err.count("\n") == 1
        and "tune [####" in err
        and "5/5" in err
        and "best -0.0025 at lam=0.25, mu=0.7" in err
    )
    res.to_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0] == "trial,lam,mu,score,seconds" and len(lines) == 6
    pytest.importorskip("pandas", reason="to_dataframe needs pandas")
    df = res.to_dataframe()
    assert list(df.columns) == ["trial", "lam", "mu", "score", "seconds"] and len(df) == 5
    pytest.importorskip("matplotlib", reason="plot needs matplotlib")
    res.plot(tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 5_000


def test_errors_come_before_any_trial() -> None:
    calls: list[object] = []
    cases = [
        ({"lam": (1.0, 0.0)}, {}, "E420"),  # empty range
        ({"lam": "wide"}, {}, "E420"),
        ({"nope": (0.0, 1.0)}, {}, "E401"),  # not a param of the program
        ({"lam": (0.0, 1.0)}, {"sampler": "annealing"}, "E420"),
        ({"lam": tvlang.log_range(0.0, 1.0)}, {}, "E420"),
    ]
    for space, kwargs, code in cases:
        with pytest.raises(TvError) as err:
            tvlang.tune(SOURCE, space, calls.append, bindings=_bindings(), progress=False, **kwargs)  # type: ignore[arg-type]
        assert err.value.code == code, (space, kwargs)
    assert calls == []
    with pytest.raises(TvError, match="not a number"):
        tvlang.tune(SOURCE, {"lam": [0.5]}, lambda m: "good", bindings=_bindings(), progress=False)
    bindings = _bindings()
    with pytest.raises(TvError, match="also the program's input `base`"):
        tvlang.tune(
            SOURCE, {"lam": [0.5]}, quadratic, bindings=bindings, into=bindings["base"], progress=False
        )


def test_log_range_grid() -> None:
    assert tvlang.log_range(0.01, 1).grid(3) == [0.01, 0.1, 1.0]


def test_optuna_sqlite_storage_resumes(tmp_path: Path) -> None:
    pytest.importorskip("optuna", reason="Optuna samplers need the tvlang[tune] extra")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    space = {"lam": (0.0, 1.0), "mu": (0.0, 1.0)}
    first = tvlang.tune(SOURCE, space, quadratic, bindings=_bindings(), trials=4, sampler="random", study=url,
                        progress=False)  # fmt: skip
    more = tvlang.tune(SOURCE, space, quadratic, bindings=_bindings(), trials=6, sampler="random", study=url,
                       progress=False)  # fmt: skip
    assert len(first.trials) == 4 and more.trials[:4] == [  # the storage held the first four
        tvlang.Trial(t.number, t.params, t.score, more.trials[t.number].seconds) for t in first.trials
    ]
    assert len(more.trials) == 6
    import optuna

    assert len(optuna.load_study(study_name="tvlang-random-0", storage=url).trials) == 6
    with pytest.raises(TvError, match="Optuna sampler"):
        tvlang.tune(SOURCE, space, quadratic, bindings=_bindings(), study=url, progress=False)


def test_fixed_params_hold_in_every_trial() -> None:
    res = tvlang.tune(SOURCE, {"lam": [0.2, 0.3]}, quadratic, bindings=_bindings(), params={"mu": 0.7},
                      progress=False)  # fmt: skip
    assert res.best_params == {"lam": 0.3} and res.best_score == pytest.approx(0.0, abs=1e-20)
    with pytest.raises(TvError, match="both searched and fixed"):
        tvlang.tune(
            SOURCE, {"lam": [0.2]}, quadratic, bindings=_bindings(), params={"lam": 0.1}, progress=False
        )
