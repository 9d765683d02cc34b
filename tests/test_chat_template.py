"""The chat template an output's tokenizer files carry (``--chat-template``, mergekit's
``chat_template:``): auto, chatml and a template's text, where the template model keeps its own
(``tokenizer_config.json``, ``chat_template.jinja``); outputs loaded with transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import tvlang
from tvlang import cli
from tvlang.errors import TvInputError, TvParamError
from tvlang.io.chat_template import CHATML, choose, model_template
from tvlang.synth import llama_shapes, make_state, save_checkpoint, write_tokenizer

transformers = pytest.importorskip(
    "transformers", reason="outputs are loaded with transformers (the `test` extra)"
)
yaml = pytest.importorskip("yaml", reason="mergekit configs are YAML (the `config` extra)")

WORDS = ["<unk>", "<s>", "system", "user", "assistant"] + [f"w{i}" for i in range(7)]
SPECIAL = ("<unk>", "<s>", "<|im_start|>", "<|im_end|>")
ZEPHYR = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
CHAT = [{"role": "system", "content": "w0"}, {"role": "user", "content": "w1 w2"}]


def model(root: Path, name: str, seed: int, template: str | None, *, jinja: bool = False) -> Path:
    """A tiny Llama checkpoint directory with a word-level tokenizer, carrying ``template`` in its
    ``tokenizer_config.json`` (or, with ``jinja``, in ``chat_template.jinja``)."""
    path = root / name
    save_checkpoint(make_state(llama_shapes(hidden=32, layers=1, vocab=14), seed, torch.float32), str(path))
    write_tokenizer(str(path), WORDS, added=["<|im_start|>", "<|im_end|>"], special=SPECIAL)
    if template is not None and jinja:
        (path / "chat_template.jinja").write_text(template)
    elif template is not None:
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("chat")
    model(d, "base", 0, PLAIN)
    model(d, "m1", 1, ZEPHYR)
    model(d, "m2", 2, ZEPHYR)
    model(d, "bare", 3, None)
    model(d, "bare2", 5, None)
    model(d, "jinja", 4, PLAIN, jinja=True)
    return d


def config(root: Path, template: str, base: str = "base", models: tuple[str, ...] = ("m1", "m2")) -> Path:
    entries = "".join(f"  - model: {m}\n    parameters: {{weight: 0.5}}\n" for m in models)
    path = root / f"merge-{len(list(root.glob('merge-*')))}.yml"
    path.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{entries}"
        f"chat_template: {json.dumps(template)}\ndtype: float32\n"
    )
    return path


def test_chatml_from_a_mergekit_config_loads_renders_and_runs(root: Path) -> None:
    out = root / "chatml"
    assert cli.main(["run", str(config(root, "chatml")), "-o", str(out), "--force"]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == CHATML
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nw0<|im_end|>\n<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok(text, return_tensors="pt")["input_ids"]
    vocab = tok.get_vocab()
    assert ids[0, 0] == vocab["<|im_start|>"] and ids[0, -1] == vocab["assistant"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        logits = merged(ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    # only the template changed: every other tokenizer setting is the base's
    before = json.loads((root / "base" / "tokenizer_config.json").read_text())
    after = json.loads((out / "tokenizer_config.json").read_text())
    assert {**before, "chat_template": CHATML} == after
    for name in ("tokenizer.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (root / "base" / name).read_bytes()


def test_auto_takes_the_template_most_inputs_carry(root: Path) -> None:
    out = root / "auto"
    assert cli.main(["run", str(config(root, "auto")), "-o", str(out), "--force"]) == 0
    assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == ZEPHYR  # m1, m2 against base
    # none carries one: the base's tokenizer files as they are
    plain = root / "auto-none"
    assert cli.main(["run", str(config(root, "auto", "bare", ("bare2",))), "-o", str(plain), "--force"]) == 0
    assert (plain / "tokenizer_config.json").read_bytes() == (
        root / "bare" / "tokenizer_config.json"
    ).read_bytes()
    # counted once per directory, a tie to the input read first, templates compared stripped
    dirs = [str(root / n) for n in ("base", "m1", "base")]
    assert choose("auto", dirs) == PLAIN
    assert choose("auto", [str(root / "bare")]) is None
    assert choose("chatml", dirs) == CHATML and choose(ZEPHYR, dirs) == ZEPHYR


def test_a_list_of_named_templates_gives_its_default(tmp_path: Path) -> None:
    """tokenizer_config.json may hold several templates by name (transformers' older format): the
    one named `default` is the model's; without one, or with an empty one, the model has none."""
    config = tmp_path / "tokenizer_config.json"
    for value, want in [
        ([{"name": "tool_use", "template": PLAIN}, {"name": "default", "template": ZEPHYR}], ZEPHYR),
        ([{"name": "tool_use", "template": PLAIN}], None),
        ("  ", None),
        (ZEPHYR, ZEPHYR),
    ]:
        config.write_text(json.dumps({"chat_template": value}))
        assert model_template(str(tmp_path)) == want
    (tmp_path / "chat_template.jinja").write_text("\n")  # read first, and empty: no template
    assert model_template(str(tmp_path)) is None


def test_the_named_templates_are_the_ones_options_accept() -> None:
    from tvlang.io.chat_template import NAMED
    from tvlang.options import CHAT_TEMPLATES, FAMILY_TEMPLATES

    assert {"auto", *NAMED} == set(CHAT_TEMPLATES) and not set(NAMED) & set(FAMILY_TEMPLATES)


def test_a_template_kept_in_chat_template_jinja_is_replaced_there(root: Path) -> None:
    """transformers reads chat_template.jinja before tokenizer_config.json: the new text goes there,
    and the config (which held no template) is copied as it is."""
    out = root / "jinja-out"
    program = tvlang.compile(
        "base + 0.5*(m1 - base)", bindings={"base": str(root / "jinja"), "m1": str(root / "m1")}
    )
    program.run(str(out), options=tvlang.Options(chat_template=ZEPHYR, overwrite=True))
    assert (out / "chat_template.jinja").read_text() == ZEPHYR
    assert (out / "tokenizer_config.json").read_bytes() == (
        root / "jinja" / "tokenizer_config.json"
    ).read_bytes()
    assert model_template(str(out)) == ZEPHYR
    assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == ZEPHYR


def test_a_model_keeping_its_template_in_both_files_gets_it_in_both(root: Path, tmp_path: Path) -> None:
    from tvlang.io.chat_template import carry

    both = tmp_path / "both"
    shutil.copytree(root / "base", both)  # tokenizer_config.json holds PLAIN
    (both / "chat_template.jinja").write_text(PLAIN)
    sidecars = sorted(str(p) for p in both.iterdir() if not p.name.endswith(".safetensors"))
    folder = tmp_path / "edited"
    folder.mkdir()
    edited = carry(sidecars, ZEPHYR, "out", str(folder))
    assert [Path(p).name for p in edited] == [Path(p).name for p in sidecars]
    changed = {Path(p).name for p in edited if Path(p).parent == folder}
    assert changed == {"chat_template.jinja", "tokenizer_config.json"}
    assert (folder / "chat_template.jinja").read_text() == ZEPHYR
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == ZEPHYR
    assert (both / "chat_template.jinja").read_text() == PLAIN  # the input is never touched


def test_outputs_without_tokenizer_files_are_refused_before_writing(root: Path, tmp_path: Path) -> None:
    program = tvlang.compile(
        "base + 0.5*(m1 - base)", bindings={"base": str(root / "base"), "m1": str(root / "m1")}
    )
    single = tmp_path / "out.safetensors"
    with pytest.raises(TvParamError, match=r"one \.safetensors file") as e:
        program.run(str(single), options=tvlang.Options(chat_template="chatml"))
    assert e.value.code == "E402" and not single.exists()
    bare = tmp_path / "bare"
    shutil.copytree(root / "bare", bare)
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json"):
        (bare / name).unlink()
    lone = tvlang.compile("base + 0.5*(m1 - base)", bindings={"base": str(bare), "m1": str(root / "m1")})
    with pytest.raises(TvParamError, match=r"no tokenizer_config\.json to carry the chat template") as e:
        lone.run(str(tmp_path / "lone"), options=tvlang.Options(chat_template="chatml"))
    assert e.value.code == "E402" and not (tmp_path / "lone").exists()
    with pytest.raises(TvParamError, match="is a LoRA adapter") as e:
        program.run(str(tmp_path / "adapter"), options=tvlang.Options(chat_template="chatml", as_lora=2))
    assert e.value.code == "E402" and not (tmp_path / "adapter").exists()
    # a result in memory has no tokenizer files: the option changes nothing there
    result = program.run(options=tvlang.Options(chat_template="chatml"))
    assert "model.embed_tokens.weight" in result


def test_auto_names_an_input_whose_tokenizer_config_is_not_json(root: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(root / "m1", broken)
    (broken / "tokenizer_config.json").write_text('{"chat_template": ')
    program = tvlang.compile(
        "base + 0.5*(m1 - base)", bindings={"base": str(root / "base"), "m1": str(broken)}
    )
    with pytest.raises(TvInputError, match="not valid JSON") as e:
        program.run(str(tmp_path / "out"), options=tvlang.Options(chat_template="auto"))
    assert str(broken / "tokenizer_config.json") in e.value.message and e.value.code == "E301"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("llama3", "tvlang has no `llama3` chat template"),
        ("mistral", "tvlang has no `mistral` chat template"),
        ("hello", "'hello' is not a chat template"),
        ("{{ x }}", "is not a chat template"),  # mergekit's test: at least 20 characters
    ],
)
def test_bad_values_are_e402_on_every_front_end(
    root: Path, value: str, phrase: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(TvParamError, match=phrase) as e:
        tvlang.Options(chat_template=value)
    assert e.value.code == "E402"
    args = [
        "eval",
        "base + 0.5*(m1 - base)",
        "--bind",
        f"base={root / 'base'}",
        "--bind",
        f"m1={root / 'm1'}",
    ]
    assert cli.main([*args, "-o", str(root / "never"), "--chat-template", value]) == 1
    assert phrase in capsys.readouterr().err and not (root / "never").exists()
    job = root / f"job-{value.strip('{} ')}.yaml"
    job.write_text(
        yaml.safe_dump({"expression": "base", "bindings": {"base": "base"}, "chat_template": value})
    )
    assert cli.main(["run", str(job), "-o", str(root / "never")]) == 1
    err = capsys.readouterr().err
    assert phrase in err and f"{job.name}:" in err  # at the job file's field


def test_plan_says_which_template_the_outputs_get(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", str(config(root, "chatml")), "--stage", "plan"]) == 0
    assert "chat template: chatml, into the tokenizer files" in capsys.readouterr().out
    args = ["plan", "-e", "base", "--bind", f"base={root / 'base'}"]
    assert cli.main(args) == 0
    assert "chat template" not in capsys.readouterr().out


def test_the_translated_program_says_which_flag_to_run_it_with(root: Path) -> None:
    from tvlang.mergekit import load_config

    translation = load_config(config(root, "chatml"))
    assert translation.chat_template == "chatml"
    assert "run this program with `--chat-template chatml`" in translation.program
    assert translation.job().options.chat_template == "chatml"
