"""Vocabulary surgery: mergekit's ``tokenizer_source`` / ``tokenizer:`` and tvlang's ``vocab`` and
``token`` statements, run through the CLI on tiny Llama checkpoints with word-level tokenizers that
share some tokens and not others (added special tokens included, and a tokenizer with tokens past
its model's rows).  Each output's embedding and head rows are checked, token by token, against a
float64 reference written here from mergekit's rules (tokenizer/embed.py: a model's own row; else
a configured source; else the base's row; else the one model's that has it; else the mean), and
each output loads with transformers and runs a forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import tvlang
from tvlang import cli
from tvlang.synth import llama_shapes, make_lora_adapter, make_state, save_checkpoint, write_tokenizer

tokenizers = pytest.importorskip("tokenizers", reason="matching rows by token needs the `vocab` extra")
yaml = pytest.importorskip("yaml", reason="mergekit configs are YAML (the `config` extra)")

WORDS = ["<unk>", "<s>"] + [f"w{i}" for i in range(10)]
SPECIAL = ("<unk>", "<s>", "<|im_start|>", "<|im_end|>")
MODELS: dict[str, tuple[list[str], list[str], int]] = {  # model tokens, added tokens, embedding rows
    "base": (WORDS, [], 12),
    "chat": ([*WORDS, "x0", "x1"], ["<|im_start|>", "<|im_end|>"], 16),
    "other": (
        ["<unk>", "<s>"] + [f"w{i}" for i in range(5, 10)] + ["x0", "x1", "y0", "y1"],
        ["<|im_end|>"],
        12,
    ),
    "padded": (WORDS, ["<UNUSED_0>", "<UNUSED_1>"], 12),  # two tokens past its rows: mergekit drops them
    "rev": (["<unk>", *reversed(WORDS[1:]), "z0"], [], 13),  # every row elsewhere: read row by row
}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("vocab")
    for seed, (name, (words, added, rows)) in enumerate(MODELS.items()):
        state = make_state(llama_shapes(hidden=32, layers=1, vocab=rows), seed, torch.float32)
        save_checkpoint(state, str(d / "m" / name))
        write_tokenizer(str(d / "m" / name), words, added=added, special=SPECIAL)
    save_checkpoint(
        make_state(llama_shapes(hidden=32, layers=1, vocab=12), 9, torch.float32),
        str(d / "m" / "bare.safetensors"),
    )
    return d


# -- the reference ----------------------------------------------------------------------------------


def vocab_of(path: Path, rows: int | None = None) -> dict[str, int]:
    v = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
    return {t: i for t, i in v.items() if rows is None or i < rows}


def reindexed(
    root: Path,
    models: list[str],
    base: str | None,
    out: dict[str, int],
    rows: int,
    tensor: str,
    tokens: dict[str, dict[str, Any]] | None = None,
) -> dict[str, torch.Tensor]:
    """Each model's ``tensor`` re-indexed into the output vocabulary ``out``, in float64 (rows a model
    takes from a mean are rounded to float32, its dtype, as mergekit's are)."""
    tokens = tokens or {}
    weights = {m: load_file(str(root / "m" / m / "model.safetensors"))[tensor].double() for m in models}
    vocabs = {m: vocab_of(root / "m" / m, MODELS[m][2]) for m in models}
    hidden = next(iter(weights.values())).shape[1]

    def default(t: str) -> torch.Tensor:
        cfg = tokens.get(t)
        if cfg is not None:
            src = cfg["source"]
            if src == "zero":
                return torch.zeros(hidden, dtype=torch.float64)
            if isinstance(src, tuple):  # (model, token or row id)
                m, which = src
                row = which if isinstance(which, int) else vocab_of(root / "m" / m)[which]
                return weights[m][row]
            return weights[src][vocabs[src][t]]
        present = [m for m in models if t in vocabs[m]]
        if len(present) == 1:
            return weights[present[0]][vocabs[present[0]][t]]
        if base is not None and base in present:
            return weights[base][vocabs[base][t]]
        if not present:
            return torch.zeros(hidden, dtype=torch.float64)
        mean = sum(weights[m][vocabs[m][t]] for m in present) / len(present)
        return mean.float().double()

    result = {}
    n = max(out.values()) + 1
    for m in models:
        p = torch.zeros((rows, hidden), dtype=torch.float64)
        for t, j in out.items():
            forced = tokens.get(t, {}).get("force", False)
            p[j] = weights[m][vocabs[m][t]] if t in vocabs[m] and not forced else default(t)
        p[n:] = p[:n].mean(dim=0).float().double()
        result[m] = p
    return result


def check_loads_and_runs(out: Path, text: str) -> dict[str, int]:
    """The output loads with transformers (model and tokenizer) and runs a forward pass."""
    transformers = pytest.importorskip("transformers", reason="the `test` extra")
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    vocab = tok.get_vocab()
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist()[0] == [vocab[w] for w in text.split()]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and torch.isfinite(logits).all()
    return dict(vocab)


def assert_rounded(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """``got`` (float32) is ``want`` (float64) correctly rounded: equal to its rounding, or (where the
    float64 reference sits on a rounding midpoint, within its own error) the other neighbour."""
    rounded = want.float()
    off = got != rounded
    tie = (got.double() - want).abs() <= (rounded.double() - want).abs() * (1 + 1e-6)
    assert bool((~off | tie).all()), f"{what}: {int(off.sum())} values not correctly rounded"
    assert int(off.sum()) <= max(1, got.numel() // 100), what


def write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.write_text(text)
    return path


def run(root: Path, config: Path, out: str) -> Path:
    dest = root / out
    assert cli.main(["run", str(config), "-o", str(dest), "--force"]) == 0
    return dest


def models_yaml(names: list[str], weight: float = 1.0) -> str:
    return "models:\n" + "".join(f"  - model: m/{n}\n    parameters: {{weight: {weight}}}\n" for n in names)


# -- mergekit configs -------------------------------------------------------------------------------


def test_null_fields_mean_no_vocabulary(root: Path) -> None:
    """`tokenizer_source: null` and `tokenizer: null` are mergekit's defaults: rows stay by index."""
    from tvlang.mergekit import translate

    text = "merge_method: linear\ntokenizer_source: null\ntokenizer: null\n" + models_yaml(["base", "chat"])
    program = translate(text, base_dir=root).program
    assert "\nvocab " not in program and "\noutput merged = linear(" in program


def test_union_linear(root: Path) -> None:
    names = ["base", "chat", "other", "padded", "rev"]
    cfg = write(
        root,
        "union.yml",
        "merge_method: linear\nbase_model: m/base\ndtype: float32\ntokenizer_source: union\n"
        + models_yaml(names),
    )
    out = run(root, cfg, "union")
    vocab = check_loads_and_runs(out, "<|im_start|> w1 y0 x1 <|im_end|>")
    expected = set(WORDS) | {"x0", "x1", "y0", "y1", "z0", "<|im_start|>", "<|im_end|>"}
    assert set(vocab) == expected  # every model's tokens, not the ones past `padded`'s rows
    assert all(vocab[t] == i for t, i in vocab_of(root / "m" / "base").items())  # the base's ids stay
    added = {a["content"]: a for a in json.loads((out / "tokenizer.json").read_text())["added_tokens"]}
    assert added["<|im_start|>"]["special"] and not added["y0"]["special"]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(expected)
    got = load_file(str(out / "model.safetensors"))
    for tensor in VOCAB_TENSORS:
        ref = reindexed(root, names, "base", vocab, len(expected), tensor)
        assert_rounded(got[tensor], sum(ref.values()) / len(names), tensor)
    # a token only `chat` has is `chat`'s row in every model, so the average is chat's row
    chat = load_file(str(root / "m" / "chat" / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(got["model.embed_tokens.weight"][vocab["<|im_start|>"]], chat[14])


@pytest.mark.parametrize("source", ["base", "m/chat", "m/padded"])
def test_source_base_or_a_model_task_arithmetic(root: Path, source: str) -> None:
    names = ["chat", "other"]
    cfg = write(
        root,
        f"ta_{source[-4:]}.yml",
        f"merge_method: task_arithmetic\nbase_model: m/base\ndtype: float32\ntokenizer_source: {source}\n"
        + models_yaml(names, 0.5),
    )
    out = run(root, cfg, f"ta_{source[-4:]}")
    owner = source.removeprefix("m/")
    vocab = check_loads_and_runs(out, "w1 w7 <s>")
    # the source's vocabulary, ids and all (without the tokens past its rows)
    assert vocab == vocab_of(root / "m" / owner, MODELS[owner][2])
    for name in ("tokenizer.json", "tokenizer_config.json"):  # unchanged: its files as they are
        same = (out / name).read_bytes() == (root / "m" / owner / name).read_bytes()
        assert same == (owner != "padded"), name
    got = load_file(str(out / "model.safetensors"))
    for tensor in VOCAB_TENSORS:
        ref = reindexed(root, ["base", *names], "base", vocab, len(vocab), tensor)
        want = ref["base"] + 0.5 * (ref["chat"] - ref["base"]) + 0.5 * (ref["other"] - ref["base"])
        assert_rounded(got[tensor], want, tensor)


def test_tokens_force_zero_model_token_and_padding(root: Path) -> None:
    names = ["chat", "other"]  # no base model: a token two models share and the other lacks is their mean
    cfg = write(
        root,
        "tokens.yml",
        "merge_method: linear\ndtype: float32\n"
        + models_yaml(names)
        + "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n"
        + "    w6: {source: m/chat, force: true}\n"
        + "    w1: {source: {kind: zero}}\n"
        + '    "<new>": {source: {kind: model_token, model: m/chat, token: "<s>"}}\n'
        + "    y1: {source: {kind: model_token, model: m/other, token_id: 2}, force: true}\n",
    )
    out = run(root, cfg, "tokens")
    vocab = check_loads_and_runs(out, "<new> w6 y1 w1")
    assert "<new>" in vocab and len(vocab) == 19
    rows = json.loads((out / "config.json").read_text())["vocab_size"]
    assert rows == 24  # 19 tokens, padded to a multiple of 8
    tokens = {
        "w6": {"source": "chat", "force": True},
        "w1": {"source": "zero"},
        "<new>": {"source": ("chat", "<s>")},
        "y1": {"source": ("other", 2), "force": True},
    }
    got = load_file(str(out / "model.safetensors"))
    for tensor in VOCAB_TENSORS:
        ref = reindexed(root, names, None, vocab, rows, tensor, tokens)
        assert_rounded(got[tensor], (ref["chat"] + ref["other"]) / 2, tensor)
    emb = got["model.embed_tokens.weight"]
    other = load_file(str(root / "m" / "other" / "model.safetensors"))["model.embed_tokens.weight"]
    assert torch.equal(emb[vocab["y1"]], other[2])  # forced for both models
    assert not torch.equal(emb[19], torch.zeros(32)) and torch.equal(emb[19], emb[23])  # padding: the mean


# -- the language -----------------------------------------------------------------------------------

PROGRAM = """\
base = load("m/base")
chat = load("m/chat")
other = load("m/other")
vocab chat, base=base
token "<|im_end|>" = other, force
token "x1" = base["w3"]
output merged = base + 0.6*(chat - base) + 0.4*(other - base)
"""


def test_language_form_and_chunking(root: Path) -> None:
    prog = write(root, "vocab.tv", PROGRAM)
    out = run(root, prog, "lang")
    vocab = check_loads_and_runs(out, "<|im_start|> x1 w2")
    assert vocab == vocab_of(root / "m" / "chat")
    got = load_file(str(out / "model.safetensors"))
    tokens = {"<|im_end|>": {"source": "other", "force": True}, "x1": {"source": ("base", "w3")}}
    for tensor in VOCAB_TENSORS:
        ref = reindexed(root, ["base", "chat", "other"], "base", vocab, len(vocab), tensor, tokens)
        want = ref["base"] + 0.6 * (ref["chat"] - ref["base"]) + 0.4 * (ref["other"] - ref["base"])
        assert_rounded(got[tensor], want, tensor)
    # chunks of 40 elements (a row and a quarter): each reads only the rows it covers; same bits
    small = tvlang.compile_file(prog).run(options=tvlang.Options(chunk=40, threads=2, kernels="eager"))
    assert all(torch.equal(small[k], got[k]) for k in got)
    plan = tvlang.compile_file(prog).explain()
    assert "vocab: the vocabulary of `m/chat`, base `m/base`: 16 tokens, 16 rows" in plan


ERRORS = [  # program lines after the loads, code, a phrase, the text the caret underlines
    ('token "w1" = chat\noutput o = base', "E211", "needs a `vocab` statement", 'token "w1"'),
    ("vocab union, bse=base\noutput o = base", "E211", "has no option `bse`", "bse"),
    ("vocab union, pad_to=0.5\noutput o = base", "E211", "positive whole number", "0.5"),
    ("vocab union\nvocab chat\noutput o = base", "E211", "one `vocab` statement", "vocab chat"),
    ("param p = 1\nvocab p\noutput o = base", "E211", "names a model", "p"),
    ('vocab union\ntoken "w1" = chat, forse\noutput o = base', "E211", "unknown `token` flag", "forse"),
    (
        'vocab union\ntoken "w1" = chat\ntoken "w1" = zero\noutput o = base',
        "E211",
        "two `token`",
        'token "w1" = zero',
    ),
    ('vocab union\ntoken "y0" = base\noutput o = base', "E311", "has no token 'y0'", 'token "y0"'),
    ('vocab union\ntoken "y0" = base[40]\noutput o = base', "E311", "has no row 40", 'token "y0"'),
    (
        'bare = load("m/bare")\nvocab union\noutput o = 0.5*base + 0.5*bare',
        "E310",
        "no tokenizer",
        'load("m/bare")',
    ),
]


@pytest.mark.parametrize(("lines", "code", "phrase", "caret"), ERRORS)
def test_errors_are_positioned(root: Path, lines: str, code: str, phrase: str, caret: str) -> None:
    prog = write(root, "bad.tv", 'base = load("m/base")\nchat = load("m/chat")\n' + lines + "\n")
    with pytest.raises(tvlang.TvError) as info:
        tvlang.compile_file(prog).plan()
    err = info.value
    assert err.code == code and phrase in err.message, err.render()
    assert err.span is not None and err.span.text.startswith(caret), err.render()


def test_adapters_pass_and_stored_task_vectors_with_embeddings_are_refused(root: Path) -> None:
    """A LoRA adapter (no embedding rows) adds to a re-indexed model; a stored task vector that
    holds embedding rows cannot be re-indexed (it has no tokenizer to match by): E310 at it."""
    make_lora_adapter(str(root / "adapter"), llama_shapes(hidden=32, layers=1, vocab=12))
    prog = write(root, "lora.tv", 'base = load("m/base")\nvocab union\noutput o = base + lora("adapter")\n')
    got = tvlang.compile_file(prog).run()
    assert got["model.embed_tokens.weight"].shape == (12, 32)
    prog = write(
        root, "stored.tv", 'base = load("m/base")\nvocab union\noutput o = base + 0.5*delta("m/chat")\n'
    )
    with pytest.raises(tvlang.TvError) as info:
        tvlang.compile_file(prog).plan()
    assert info.value.code == "E310" and info.value.span is not None, info.value.render()
    assert info.value.span.text.startswith('delta("m/chat")'), info.value.render()


def test_cli_error_exit(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prog = write(
        root, "bad_cli.tv", 'base = load("m/base")\nvocab union\ntoken "q" = base\noutput o = base\n'
    )
    assert cli.main(["run", str(prog), "-o", str(root / "never")]) == 1
    assert "error[E311]" in capsys.readouterr().err and not (root / "never").exists()


def test_tokenizer_files_stay_inside_the_roots(root: Path, tmp_path: Path) -> None:
    """A tokenizer.json linked to a file outside the directories a program may read is refused
    before it is read (E305), as any other side file is."""
    model = tmp_path / "inside" / "linked"
    save_checkpoint(make_state(llama_shapes(hidden=32, layers=1, vocab=12), 3, torch.float32), str(model))
    (model / "tokenizer.json").unlink()
    outside = tmp_path / "outside.json"
    outside.write_text("not json")  # were it read, this would be E310
    (model / "tokenizer.json").symlink_to(outside)
    prog = write(tmp_path / "inside", "p.tv", 'a = load("linked")\nvocab union\noutput o = a\n')
    with pytest.raises(tvlang.TvError) as info:
        tvlang.compile_file(prog).plan(options=tvlang.Options(roots=(str(tmp_path / "inside"),)))
    assert info.value.code == "E305", info.value.render()


# -- GPT-2: tied head, byte-pair tokenizers ---------------------------------------------------------


def gpt2(path: Path, seed: int, vocab: dict[str, int], merges: list[tuple[str, str]], rows: int) -> None:
    transformers = pytest.importorskip("transformers", reason="the `test` extra")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=rows, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(path))  # the head is tied: only `wte` is stored
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def test_gpt2_union_with_a_padded_byte_pair_base(root: Path) -> None:
    # the base's tokenizer has two tokens (and a merge) past its 8 rows: they are dropped
    base = {"<unk>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "d": 6, "e": 7, "x": 8, "y": 9, "xy": 10}
    other = {"<unk>": 0, "a": 1, "b": 2, "d": 3, "f": 4, "ab": 5, "df": 6, "e": 7}
    gpt2(root / "g" / "base", 0, base, [("a", "b"), ("ab", "c"), ("x", "y")], 8)
    gpt2(root / "g" / "other", 1, other, [("a", "b"), ("d", "f")], 8)
    cfg = write(
        root,
        "gpt2.yml",
        "merge_method: linear\nbase_model: g/base\ndtype: float32\ntokenizer_source: union\n"
        "models:\n  - model: g/base\n    parameters: {weight: 1}\n  - model: g/other\n    parameters: {weight: 1}\n",
    )
    out = run(root, cfg, "gpt2_union")
    vocab = check_loads_and_runs(out, "abc df e")
    assert set(vocab) == {"<unk>", "a", "b", "c", "ab", "abc", "d", "e", "f", "df"}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 10
    got = load_file(str(out / "model.safetensors"))["transformer.wte.weight"].double()
    w = {
        n: load_file(str(root / "g" / n / "model.safetensors"))["transformer.wte.weight"].double()
        for n in ("base", "other")
    }
    for t, j in vocab.items():
        rows = [w[n][v[t]] for n, v in (("base", base), ("other", other)) if t in v and v[t] < 8]
        want = rows[0] if len(rows) == 1 else (rows[0] + rows[1]) / 2  # one model's row, or the average
        assert_rounded(got[j].float(), want, t)
