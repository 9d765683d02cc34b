"""`tvlang tune` end to end on generated Llama-shaped checkpoints (transformers models with a
config.json), with a score function from a test module and with lm-evaluation-harness offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tvlang.cli import main
from tvlang.synth import LlamaSpec, write_family

pytest.importorskip("transformers", reason="tvlang tune loads the template model with transformers")

SPEC = LlamaSpec(hidden=64, layers=2, vocab=64, intermediate=128, heads=4, kv_heads=2)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tune-cli")
    write_family(str(root / "ckpt"), ["base", "ft"], SPEC, seed=1, delta_scale=0.2)
    (root / "merge.tv").write_text(
        'base = load("ckpt/base")\nparam lam = 0.5\noutput merged = base + lam*(load("ckpt/ft") - base)\n'
    )
    return root


def test_tune_cli_end_to_end(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    monkeypatch.setenv("TVLANG_TUNE_CKPT", str(ckpt / "ckpt"))
    out = tmp_path / "best"
    args = [
        str(ckpt / "merge.tv"),
        "--param",
        "lam=0:1",
        "--score",
        "tests.tune_scores:closeness",
        "-o",
        str(out),
    ]
    assert main(["tune", *args, "-q"]) == 0
    assert re.fullmatch(r"best score -[0-9.e-]+ at lam=0\.3\n", capsys.readouterr().out)
    study = json.loads((tmp_path / "best.trials.json").read_text())
    assert [t["params"]["lam"] for t in study["trials"]] == [round(i / 10, 12) for i in range(11)]
    assert max(study["trials"], key=lambda t: t["score"])["params"] == {"lam": 0.3}
    assert (tmp_path / "best.trials.csv").read_text().count("\n") == 12
    assert (tmp_path / "best.png").stat().st_size > 5_000
    assert (out / "config.json").exists()  # a normal output directory, side files carried over
    assert main(["run", str(ckpt / "merge.tv"), "--set", "lam=0.3", "-o", str(tmp_path / "ref"), "-q"]) == 0
    got, ref = (
        load_file(str(out / "model.safetensors")),
        load_file(str(tmp_path / "ref" / "model.safetensors")),
    )
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    # an existing output is refused before any trial runs
    assert main(["tune", *args, "-q"]) == 1
    assert "E500" in capsys.readouterr().err


def test_tune_cli_interrupted_then_resumed(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TVLANG_TUNE_CKPT", str(ckpt / "ckpt"))
    out = tmp_path / "best"
    args = ["tune", str(ckpt / "merge.tv"), "--param", "lam=0:1", "-o", str(out), "-q"]
    assert main([*args, "--score", "tests.tune_scores:interrupting"]) == 130
    study = tmp_path / "best.trials.json"
    assert len(json.loads(study.read_text())["trials"]) == 2 and not out.exists()
    assert (
        main([*args, "--score", "tests.tune_scores:closeness"]) == 1
    )  # the trials file exists: not silently
    assert main([*args, "--score", "tests.tune_scores:closeness", "--resume"]) == 0
    trials = json.loads(study.read_text())["trials"]
    assert len(trials) == 11 and max(trials, key=lambda t: t["score"])["params"] == {"lam": 0.3}
    assert (out / "model.safetensors").exists()


def test_tune_cli_set_fixes_another_param(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--set gives a param the same value in every trial and in the written output."""
    monkeypatch.setenv("TVLANG_TUNE_CKPT", str(ckpt / "ckpt"))
    prog = tmp_path / "two.tv"
    prog.write_text(
        f'base = load("{ckpt}/ckpt/base")\nparam lam = 0.5\nparam mu = 1\n'
        f'output merged = base + mu*lam*(load("{ckpt}/ckpt/ft") - base)\n'
    )
    out = tmp_path / "best.safetensors"
    args = ["tune", str(prog), "--param", "lam=0.3,0.6", "--set", "mu=0.5", "-o", str(out), "-q"]
    assert main([*args, "--score", "tests.tune_scores:closeness"]) == 0
    trials = json.loads((tmp_path / "best.trials.json").read_text())["trials"]
    assert max(trials, key=lambda t: t["score"])["params"] == {"lam": 0.6}  # 0.5 * 0.6 = 0.3
    assert (tmp_path / "best.png").exists() and out.exists()


def test_tune_cli_errors(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [str(ckpt / "merge.tv"), "-o", str(tmp_path / "o"), "-q"]
    for extra, code in (
        (["--param", "mu=0:1", "--score", "tests.tune_scores:closeness"], "E401"),
        (["--param", "lam=1:0", "--score", "tests.tune_scores:closeness"], "E420"),
        (["--param", "lam=0:1", "--score", "tests.tune_scores:missing"], "E420"),
        (["--param", "lam=0:1", "--score", "no_such_module_here:f"], "E420"),
        (["--param", "lam=0:1", "--score", "lm-eval:"], "E420"),
    ):
        assert main(["tune", *base, *extra]) == 1, extra
        assert code in capsys.readouterr().err, extra


def _tokenizer(directory: Path) -> None:
    """A word-level tokenizer of SPEC.vocab entries, saved beside the template model."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [
        "[UNK]",
        "[PAD]",
        "<s>",
        "</s>",
        *["the", "cat", "sat", "on", "mat", "sky", "is", "blue", "a", "dog", "animal", "color"],
    ]
    words += [f"w{i}" for i in range(SPEC.vocab - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(str(directory))


def test_tune_cli_with_lm_eval_offline(ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval", reason="--score lm-eval needs the tvlang[lm-eval] extra")
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    _tokenizer(ckpt / "ckpt" / "base")
    docs = [
        ("the cat sat on the", ["mat", "sky"]),
        ("the sky is", ["blue", "dog"]),
        ("a dog is a", ["animal", "color"]),
    ]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": 0}) + "\n" for q, c in docs))
    task = tmp_path / "toy.yaml"
    task.write_text(
        f"task: tvlang_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = tmp_path / "best"
    code = main(["tune", str(ckpt / "merge.tv"), "--param", "lam=0,1", "--score", f"lm-eval:{task}",
                 "--limit", "3", "-o", str(out), "-q"])  # fmt: skip
    assert code == 0
    trials = json.loads((tmp_path / "best.trials.json").read_text())["trials"]
    assert len(trials) == 2 and all(0.0 <= t["score"] <= 1.0 for t in trials)
    assert (out / "tokenizer.json").exists()
