"""Hugging Face references (``hf://org/name[@rev]``, bare ``org/name``) through a local cache fixture.

The cache is built by hand with huggingface_hub's on-disk layout, and every test runs with
sockets refused: nothing here may touch the network.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tvlang
from tvlang import cli
from tvlang.errors import TvInputError
from tvlang.hub import HubRef, download_command, parse_reference
from tvlang.synth import llama_shapes, make_family

needs_hub = pytest.mark.skipif(
    find_spec("huggingface_hub") is None,
    reason="huggingface_hub is not installed (pip install 'tvlang[hub]'; the test extra includes it)",
)

ROOT = Path(__file__).resolve().parent.parent
REPO = "acme/tiny-llama"
MAIN = hashlib.sha1(b"main").hexdigest()
V1 = hashlib.sha1(b"v1.0").hexdigest()


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tvlang tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """base (a local file), ft_main (cached as REPO@main) and ft_v1 (cached as REPO@v1.0)."""
    d = tmp_path_factory.mktemp("hub-family")
    return make_family(str(d), ("base", "ft_main", "ft_v1"), llama_shapes(32, 2, 96), layout="dir")


def add_snapshot(cache: Path, repo_id: str, commit: str, src: str, refs: tuple[str, ...] = ()) -> Path:
    """Put the files of directory ``src`` into ``cache`` the way huggingface_hub does:
    ``models--org--name/blobs/<hash>``, ``snapshots/<commit>/<file>`` → ``../../blobs/<hash>``,
    and ``refs/<branch or tag>`` holding the commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in sorted(os.listdir(src)):
        data = Path(src, name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


@dataclass
class Cache:
    path: Path
    main: Path  # snapshot directories
    v1: Path


@pytest.fixture
def cache(tmp_path: Path, family: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Cache:
    pytest.importorskip(
        "huggingface_hub", reason="huggingface_hub is not installed: pip install 'tvlang[hub]'"
    )
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    hub = home / "hub"
    main = add_snapshot(hub, REPO, MAIN, family["ft_main"], refs=("main",))
    v1 = add_snapshot(hub, REPO, V1, family["ft_v1"], refs=("v1.0",))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    # huggingface_hub reads these once, at import
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    return Cache(hub, main, v1)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


def inputs(program: str, work: Path, **options: object) -> list[str]:
    """The checkpoint paths a program's load()s resolve to."""
    prog = tvlang.compile(program, filename=str(work / "p.tv"))
    return [ref.key for ref in prog.lower(options=tvlang.Options(**options)).graph.inputs()]  # type: ignore[arg-type]


# -- which strings are references ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hf://acme/tiny", HubRef("acme/tiny")),
        ("hf://acme/tiny@v1.0", HubRef("acme/tiny", "v1.0")),
        ("hf://gpt2", HubRef("gpt2")),
        ("hf://acme/tiny@refs/pr/1", HubRef("acme/tiny", "refs/pr/1")),
        ("acme/tiny", HubRef("acme/tiny", explicit=False)),
        ("acme/Tiny_Llama-1.1B", HubRef("acme/Tiny_Llama-1.1B", explicit=False)),
        ("tiny", None),
        ("ckpt/base.safetensors", None),
        ("./acme/tiny", None),
        ("/abs/acme", None),
        ("a/b/c", None),
        ("acme/tiny@v1", None),  # a revision needs hf://
        ("acme/-tiny", None),
        ("acme/ti--ny", None),
    ],
)
def test_which_strings_are_references(text: str, expected: HubRef | None) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize(
    "text", ["hf://", "hf://a/b/c", "hf://acme/tiny@", "hf://acme/tiny@../x", "hf://a b"]
)
def test_malformed_reference(text: str) -> None:
    with pytest.raises(TvInputError) as e:
        parse_reference(text)
    assert e.value.code == "E300"


# -- resolution ---------------------------------------------------------------------------------
@needs_hub
def test_hf_reference_is_the_main_snapshot(cache: Cache, work: Path) -> None:
    assert inputs(f'load("hf://{REPO}")', work) == [str(cache.main.resolve())]


@needs_hub
def test_revision_tag_and_commit(cache: Cache, work: Path) -> None:
    assert inputs(f'load("hf://{REPO}@v1.0")', work) == [str(cache.v1.resolve())]
    assert inputs(f'load("hf://{REPO}@{V1}")', work) == [str(cache.v1.resolve())]


@needs_hub
def test_bare_name_resolves_through_the_cache(cache: Cache, work: Path) -> None:
    assert inputs(f'load("{REPO}")', work) == [str(cache.main.resolve())]


@needs_hub
@pytest.mark.parametrize("local", ["dir", "file"])
def test_local_path_shadows_a_bare_name(cache: Cache, work: Path, family: dict[str, str], local: str) -> None:
    org, name = REPO.split("/")
    (work / org).mkdir()
    if local == "dir":
        os.symlink(family["base"], work / org / name)
        expected = work / org / name
    else:
        expected = work / org / (name + ".safetensors")
        os.symlink(os.path.join(family["base"], "model.safetensors"), expected)
    assert inputs(f'load("{REPO}")', work) == [str(expected.resolve())]
    assert inputs(f'load("hf://{REPO}")', work) == [str(cache.main.resolve())]  # hf:// always means the Hub


@needs_hub
def test_offline_mode_changes_nothing(cache: Cache, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert inputs(f'load("hf://{REPO}@v1.0")', work) == [str(cache.v1.resolve())]


@needs_hub
def test_missing_model_error(cache: Cache, work: Path) -> None:
    program = 'base = load("hf://acme/nothing-here")\nbase\n'
    with pytest.raises(TvInputError) as e:
        inputs(program, work)
    err = e.value
    assert err.code == "E300"
    assert err.span is not None and err.span.text == '"hf://acme/nothing-here"'
    text = str(err)
    assert "acme/nothing-here" in text and "revision main" in text and str(cache.path) in text
    assert f"`{download_command(HubRef('acme/nothing-here'))}`" in text
    assert "download acme/nothing-here --revision main" in text
    assert "p.tv:1:13" in text


@needs_hub
def test_missing_revision_lists_the_cached_ones(cache: Cache, work: Path) -> None:
    with pytest.raises(TvInputError) as e:
        inputs(f'load("hf://{REPO}@v2")', work)
    text = str(e.value)
    assert f"{REPO} is cached, but not at revision v2" in text
    assert "main, v1.0" in text and MAIN in text
    assert f"download {REPO} --revision v2" in text


@needs_hub
def test_bare_missing_name_explains_both_readings(cache: Cache, work: Path) -> None:
    with pytest.raises(TvInputError) as e:
        inputs('load("acme/nothing-here")', work)
    text = str(e.value)
    assert e.value.code == "E300" and "no such checkpoint: acme/nothing-here" in text
    assert str(work / "acme" / "nothing-here.safetensors") in text  # where it looked locally
    assert str(cache.path) in text and "download acme/nothing-here --revision main" in text


@needs_hub
def test_download_command_matches_the_installed_cli() -> None:
    from importlib.metadata import distribution

    scripts = {e.name for e in distribution("huggingface_hub").entry_points if e.group == "console_scripts"}
    command = download_command(HubRef("acme/tiny", "v1.0"))
    assert command.split()[0] in scripts
    assert command.endswith("download acme/tiny --revision v1.0")


@needs_hub
def test_pickle_only_snapshot_is_refused(cache: Cache, work: Path, tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    (src / "config.json").write_text("{}")
    add_snapshot(cache.path, "acme/old", hashlib.sha1(b"old").hexdigest(), str(src), refs=("main",))
    with pytest.raises(TvInputError) as e:
        tvlang.compile('load("hf://acme/old")', filename=str(work / "p.tv")).plan()
    assert "pickle" in str(e.value) and "never unpickles" in str(e.value)


@needs_hub
def test_roots_cover_the_cache(cache: Cache, work: Path) -> None:
    with pytest.raises(TvInputError) as e:
        inputs(f'load("hf://{REPO}")', work, roots=(str(work),))
    assert e.value.code == "E305"
    # With the cache inside a root, every file (the snapshot's links resolve into blobs/) is readable.
    prog = tvlang.compile(f'load("hf://{REPO}")', filename=str(work / "p.tv"))
    assert prog.plan(options=tvlang.Options(roots=(str(work), str(cache.path))))


# -- without huggingface_hub ----------------------------------------------------------------------
def test_without_huggingface_hub(work: Path, family: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails
    with pytest.raises(TvInputError) as e:
        inputs(f'load("hf://{REPO}")', work)
    assert e.value.code == "E300" and "pip install 'tvlang[hub]'" in str(e.value)
    with pytest.raises(TvInputError) as e:
        inputs(f'load("{REPO}")', work)
    assert "no such checkpoint" in str(e.value) and "pip install 'tvlang[hub]'" in str(e.value)
    org, name = REPO.split("/")
    (work / org).mkdir()
    os.symlink(family["base"], work / org / name)
    assert inputs(f'load("{REPO}")', work) == [str((work / org / name).resolve())]  # local paths need no hub


# -- end to end ---------------------------------------------------------------------------------
def _expected(base: str, ft: str, lam: float) -> dict[str, torch.Tensor]:
    b = load_file(os.path.join(base, "model.safetensors"))
    f = load_file(os.path.join(ft, "model.safetensors"))
    return {k: b[k].double() + lam * (f[k].double() - b[k].double()) for k in b}


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, w in want.items():
        assert got[k].dtype == torch.bfloat16
        # one rounding to bf16 of a float32 accumulation: within half a bf16 ulp (2^-9 relative) or so
        assert torch.allclose(got[k].double(), w, rtol=2**-8, atol=1e-6), k


@needs_hub
def test_cli_eval_through_the_cache(cache: Cache, work: Path, family: dict[str, str]) -> None:
    """``tvlang eval`` in a fresh process, offline, finding the cache as huggingface_hub does: $HF_HOME/hub."""
    out = work / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(cache.path.parent), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    args = [sys.executable, "-m", "tvlang", "eval", "base + 0.5*(hf_model - base)", "-q"]
    args += ["--bind", f"base={family['base']}", "--bind", f"hf_model=hf://{REPO}@v1.0", "-o", str(out)]
    proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _assert_close(load_file(str(out / "model.safetensors")), _expected(family["base"], family["ft_v1"], 0.5))
    assert (out / "config.json").is_file() and not (out / "config.json").is_symlink()


@needs_hub
def test_cli_bare_bind_and_missing(
    cache: Cache,
    work: Path,
    family: dict[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(work)
    out = work / "o.safetensors"
    argv = ["eval", "base + 0.5*(hf_model - base)", "-q", "--bind", f"base={family['base']}"]
    assert cli.main([*argv, "--bind", f"hf_model={REPO}", "-o", str(out)]) == 0, capsys.readouterr().err
    _assert_close(load_file(str(out)), _expected(family["base"], family["ft_main"], 0.5))
    assert (
        cli.main([*argv, "--bind", "hf_model=hf://acme/missing@v3", "-o", str(work / "x.safetensors")]) == 1
    )
    err = capsys.readouterr().err
    assert "error[E300]" in err and "download acme/missing --revision v3" in err and "Traceback" not in err


@needs_hub
def test_python_program_mixes_hub_and_local(cache: Cache, work: Path, family: dict[str, str]) -> None:
    (work / "merge.tv").write_text(
        f'base = load("{family["base"]}")\n'
        f'a = load("hf://{REPO}") - base\n'
        f'b = load("hf://{REPO}@v1.0") - base\n'
        "output merged = base + 0.5*(a + b)\n"
    )
    got = tvlang.compile_file(work / "merge.tv").run()
    b = load_file(os.path.join(family["base"], "model.safetensors"))
    m = load_file(os.path.join(family["ft_main"], "model.safetensors"))
    v = load_file(os.path.join(family["ft_v1"], "model.safetensors"))
    want = {
        k: b[k].double() + 0.5 * ((m[k].double() - b[k].double()) + (v[k].double() - b[k].double()))
        for k in b
    }
    _assert_close(got, want)


@needs_hub
def test_incomplete_snapshot(cache: Cache, work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    errors = pytest.importorskip("huggingface_hub.errors")
    if not hasattr(errors, "IncompleteSnapshotError"):
        pytest.skip("this huggingface_hub does not check snapshots for completeness")
    import huggingface_hub

    def incomplete(repo_id: str, **kwargs: object) -> str:
        raise errors.IncompleteSnapshotError("1 file(s) are missing (model.safetensors)", snapshot_path="x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", incomplete)
    with pytest.raises(TvInputError) as e:
        inputs(f'load("hf://{REPO}")', work)
    text = str(e.value)
    assert "snapshot of acme/tiny-llama (revision main) is incomplete" in text and "model.safetensors" in text
    assert f"download {REPO} --revision main" in text


def test_the_hub_example_runs_from_the_cache(
    tmp_path: Path, family: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/hub/chat_half.tv against a cache holding its two repositories."""
    pytest.importorskip(
        "huggingface_hub", reason="huggingface_hub is not installed: pip install 'tvlang[hub]'"
    )
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    hub = home / "hub"
    add_snapshot(hub, "Qwen/Qwen2.5-0.5B", "a" * 40, family["base"], refs=("main",))
    add_snapshot(hub, "Qwen/Qwen2.5-0.5B-Instruct", "b" * 40, family["ft_main"], refs=("main",))
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    example = Path(__file__).resolve().parents[1] / "examples" / "hub" / "chat_half.tv"
    program = tmp_path / "chat_half.tv"
    program.write_text(example.read_text())
    out = tmp_path / "merged"
    assert cli.main(["run", str(program), "-o", str(out), "-q", "--set", "lam=0.3"]) == 0
    _assert_close(
        load_file(str(out / "model.safetensors")), _expected(family["base"], family["ft_main"], 0.3)
    )


@needs_hub
def test_job_file_bindings_take_hub_references(cache: Cache, work: Path, family: dict[str, str]) -> None:
    job = work / "job.yaml"
    job.write_text(
        f"expression: base + 0.5*(ft - base)\nbindings:\n  base: {family['base']}\n  ft: hf://{REPO}@v1.0\n"
        "output: merged\n"
    )
    assert cli.main(["run", str(job), "-q"]) == 0
    _assert_close(
        load_file(str(work / "merged" / "model.safetensors")), _expected(family["base"], family["ft_v1"], 0.5)
    )
