"""Issue 9, outputs: `kiln compile -o` writes only into a new, empty or kiln-made directory and never deletes anything
else (compiler/output.py); the cache's hash index (runtime_py/artifacts.py); CLI and server arguments refused with one
`kiln: error:` line before any model is loaded. No GPU needed: the GPU half is tests/gpu/test_cache.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from compiler.errors import KilnError
from compiler.manifest import read_manifest
from compiler.output import MARKER_FILE, check_target, staging_dir
from compiler.pipeline import compile_model
from tests.unit.test_errors import ROOT, assert_cli_error, kiln, kiln_cmd, write_tiny_gguf


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (and root's siblings) with its bytes (None for directories / links' targets)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() and not p.is_symlink() else \
            f"link:{os.readlink(p)}" if p.is_symlink() else None
    return out


def _user_dirs(base: Path) -> dict[str, Path]:
    """Directories kiln must refuse to replace, each with files of the user's."""
    d = {}
    d["user-files"] = base / "precious"
    d["user-files"].mkdir()
    (d["user-files"] / "thesis.txt").write_text("years of work")
    d["web-manifest"] = base / "webapp"              # a PWA's manifest.json is not a kiln artifact
    d["web-manifest"].mkdir()
    (d["web-manifest"] / "manifest.json").write_text('{"name": "my app", "start_url": "/"}')
    (d["web-manifest"] / "index.html").write_text("<html></html>")
    d["old-kiln"] = base / "oldkiln"                 # a kiln-format manifest without the marker
    d["old-kiln"].mkdir()
    (d["old-kiln"] / "manifest.json").write_text('{"format": "kiln", "version": 1}')
    (d["old-kiln"] / "shard-000.bin").write_bytes(b"\0" * 64)
    d["file"] = base / "afile"
    d["file"].write_text("x")
    target = base / "linked-target"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    d["symlink"] = base / "link"
    d["symlink"].symlink_to(target)
    return d


@pytest.fixture
def kiln_artifact_plus_notes(tmp_path, gguf) -> Path:
    """A real kiln artifact in which the user put a file of their own."""
    art = compile_model(gguf, tmp_path / "art")
    (art / "notes.txt").write_text("my notes on this model")
    (art / "shaders" / "mine.txt").write_text("x")
    return art


@pytest.mark.parametrize("kind", ["user-files", "web-manifest", "old-kiln", "file", "symlink"])
def test_compile_refuses_a_directory_kiln_did_not_make(tmp_path, gguf, kind):
    target = _user_dirs(tmp_path)[kind]
    before = snapshot(tmp_path)
    with pytest.raises(KilnError, match="not a kiln artifact directory|symbolic link") as e:
        compile_model(gguf, target)
    assert str(target) in str(e.value) and "nothing was changed" in str(e.value)
    assert snapshot(tmp_path) == before                       # every file left, no staging directory either


def test_compile_refuses_an_artifact_holding_files_of_the_users(tmp_path, gguf, kiln_artifact_plus_notes):
    art = kiln_artifact_plus_notes
    before = snapshot(tmp_path)
    with pytest.raises(KilnError, match="holds notes.txt, which kiln did not write"):
        compile_model(gguf, art)
    (art / "notes.txt").unlink()
    with pytest.raises(KilnError, match="holds shaders/mine.txt"):
        compile_model(gguf, art)
    (art / "notes.txt").write_text("my notes on this model")
    assert snapshot(tmp_path) == before


def test_compile_cli_refuses_and_leaves_every_file(tmp_path, gguf):
    dirs = _user_dirs(tmp_path)
    before = snapshot(tmp_path)
    for kind in ("user-files", "web-manifest", "old-kiln"):
        assert_cli_error(kiln("compile", gguf, "-o", dirs[kind], "--no-selftest"), str(dirs[kind]),
                         "not a kiln artifact directory")
    assert snapshot(tmp_path) == before


def test_sibling_tmp_directory_is_not_touched(tmp_path, gguf):
    """The old compile deleted DIR.tmp whatever it held."""
    sibling = tmp_path / "out.tmp"
    sibling.mkdir()
    (sibling / "data.csv").write_text("1,2,3")
    out = compile_model(gguf, tmp_path / "out")
    assert (sibling / "data.csv").read_text() == "1,2,3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp"]      # no staging left behind
    assert (out / MARKER_FILE).is_file() and read_manifest(out)["format"] == "kiln"


def test_empty_directory_and_recompiling_over_an_artifact(tmp_path, gguf):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = compile_model(gguf, empty)
    first = read_manifest(out)
    inode = (out / "manifest.json").stat().st_ino
    again = compile_model(gguf, out, prefill_chunk=16)        # a kiln artifact is replaced, whole
    m = read_manifest(again)
    assert m["limits"]["prefill_chunk"] == 16 and first["limits"]["prefill_chunk"] == 128
    assert (out / "manifest.json").stat().st_ino != inode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


@pytest.mark.parametrize("target", [".", "..", "./", ""])
def test_output_is_the_current_directory(tmp_path, gguf, target):
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "file.txt").write_text("mine")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp")}
    p = subprocess.run(kiln_cmd() + ["compile", str(gguf), "-o", target, "--no-selftest"], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300)
    assert_cli_error(p, "current directory or one above it", "-o ./my-model")
    assert sorted(os.listdir(cwd)) == ["file.txt"] and sorted(os.listdir(tmp_path)) == ["work"]
    old = Path.cwd()
    try:
        os.chdir(cwd)
        with pytest.raises(KilnError, match="current directory"):
            check_target(Path(target))
    finally:
        os.chdir(old)


def test_stale_staging_of_a_dead_compile_is_removed_and_nothing_else(tmp_path, gguf):
    out = tmp_path / "m"
    dead = subprocess.Popen(["true"])
    dead.wait()
    marker = json.dumps({"kiln": "x", "pid": dead.pid, "host": __import__("socket").gethostname()})
    stale = tmp_path / f".m.kiln-tmp-{dead.pid}-00aa11bb"     # a compile killed with SIGKILL
    (stale / "shaders").mkdir(parents=True)
    (stale / MARKER_FILE).write_text(marker)
    (stale / "shard-000.bin").write_bytes(b"\0" * 16)
    (stale / "shaders" / "a.wgsl").write_text("fn main() {}")
    lookalike = tmp_path / f".m.kiln-tmp-{dead.pid}-00cc22dd"  # same name pattern, no marker: not ours
    lookalike.mkdir()
    (lookalike / "shard-000.bin").write_bytes(b"1")
    mixed = tmp_path / f".m.kiln-tmp-{dead.pid}-00ee33ff"      # ours, but the user put a file in it
    mixed.mkdir()
    (mixed / MARKER_FILE).write_text(marker)
    (mixed / "mine.txt").write_text("keep")
    alive = tmp_path / f".m.kiln-tmp-{os.getppid()}-00ff44aa"  # a compile that still runs
    alive.mkdir()
    (alive / MARKER_FILE).write_text(marker.replace(str(dead.pid), str(os.getppid())))
    compile_model(gguf, out)
    assert not stale.exists()
    assert (lookalike / "shard-000.bin").read_bytes() == b"1"
    assert (mixed / "mine.txt").read_text() == "keep" and not (mixed / MARKER_FILE).exists()
    assert (alive / MARKER_FILE).exists()


def test_failed_compile_leaves_no_staging(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(KilnError):
        compile_model(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_finish_runs_on_the_staged_artifact_before_the_rename(tmp_path, gguf):
    """The self-test hook sees a complete artifact that is not yet at its name; if it fails, nothing is installed."""
    seen = {}

    def finish(tmp):
        seen["name"], seen["target_exists"] = tmp.name, (tmp_path / "out").exists()
        seen["manifest"] = read_manifest(tmp)["format"]
    compile_model(gguf, tmp_path / "out", finish=finish)
    assert seen["name"].startswith(".out.kiln-tmp-") and not seen["target_exists"] and seen["manifest"] == "kiln"

    def failing(tmp):
        raise KilnError("self-test failed")
    with pytest.raises(KilnError, match="self-test failed"):
        compile_model(gguf, tmp_path / "other", finish=failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("replace", [False, True])
def test_concurrent_compiles_of_one_target(tmp_path, gguf, replace):
    """Each compile stages on its own; with replace=False (the cache) the first rename wins and the rest keep it."""
    out, results, errors = tmp_path / "out", [], []
    barrier = threading.Barrier(4)

    def one():
        try:
            barrier.wait()
            results.append(compile_model(gguf, out, replace=replace))
        except BaseException as e:       # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results == [out] * 4
    read_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- the cache's hash index ---------------------------------------------------------------------------------------
def test_hash_index_hashes_once_and_again_after_an_in_place_edit(tmp_path, monkeypatch, gguf):
    import runtime_py.artifacts as arts
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "model.gguf"
    f.write_bytes(gguf.read_bytes())
    calls = []
    real = arts.file_sha256
    monkeypatch.setattr(arts, "file_sha256", lambda p: calls.append(p) or real(p))
    first = arts.source_sha256(f)
    assert arts.source_sha256(f) == first and len(calls) == 1          # remembered by path + stat
    assert arts.source_sha256(f, verify=True) == first and len(calls) == 2
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF                                                     # inside the last tensor
    with open(f, "r+b") as fh:                                           # in place: same inode, same size
        fh.write(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))                     # and the mtime put back
    assert (f.stat().st_size, f.stat().st_mtime_ns, f.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    second = arts.source_sha256(f)
    assert second != first and len(calls) == 3                           # the ctime gave it away
    assert arts.entry_dir(f, second) != arts.entry_dir(f, first)
    index = json.loads((tmp_path / "cache" / "sources.json").read_text())
    assert index[str(f.resolve())][-1] == second


def test_hash_index_damaged_is_rebuilt(tmp_path, monkeypatch, gguf):
    import runtime_py.artifacts as arts
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "sources.json").write_text("{not json")
    assert arts.source_sha256(gguf) == arts.file_sha256(gguf)
    assert json.loads((tmp_path / "cache" / "sources.json").read_text())


def test_entry_problems_name_what_is_wrong(tmp_path, gguf):
    from runtime_py.artifacts import entry_problem
    from compiler.manifest import update_manifest
    from tests.unit.test_errors import flip_byte
    art = compile_model(gguf, tmp_path / "e")
    sha = read_manifest(art)["model"]["source"]["sha256"]
    assert entry_problem(art, sha) == "no self-test record (an interrupted first run?)"
    update_manifest(art, selftest={"prompt_ids": [1], "top5": [[1, 0.5]], "tolerance": 0.02})
    assert entry_problem(art, sha) is None and entry_problem(art, sha, verify=True) is None
    assert "source.sha256 differs" in entry_problem(art, "0" * 64)
    m = read_manifest(art)
    shard = art / m["shards"][0]["file"]
    flip_byte(shard, 10)
    assert entry_problem(art, sha) is None                                # same size: found by the load (or --verify)
    assert "shard does not match the manifest's sha256" in entry_problem(art, sha, verify=True)
    with open(shard, "ab") as fh:
        fh.write(b"\0")
    n = m["shards"][0]["bytes"]
    assert entry_problem(art, sha) == f"shard shard-000.bin has {n + 1} bytes, not {n}"
    shard.unlink()
    assert entry_problem(art, sha) == "shard shard-000.bin is missing"
    (art / "manifest.json").write_text("{")
    assert "corrupt manifest" in entry_problem(art, sha)
    (art / MARKER_FILE).unlink()
    assert entry_problem(art, sha) == f"no {MARKER_FILE} marker"


# -- CLI and server arguments (all refused before a model is loaded) ---------------------------------------------
NOT_UTF8 = os.fsdecode(b"caf\xe9 \xff")       # what Python makes of argv bytes that are not UTF-8


@pytest.mark.parametrize("args, fragments", [
    (["run", "--prompt", NOT_UTF8], ["--prompt is not valid UTF-8"]),
    (["run", "--chat", "--system", NOT_UTF8, "--prompt", "hi"], ["--system is not valid UTF-8"]),
    (["run", "--max-tokens", "0", "--prompt", "hi"], ["--max-tokens must be at least 1 (got 0)"]),
    (["run", "-n", "-1", "--prompt", "hi"], ["--max-tokens must be at least 1 (got -1)"]),
    (["run", "", "--prompt", "hi"], ["empty model name ''"]),
    (["run", "  ", "--prompt", "hi"], ["empty model name"]),
    (["compile", "", "-o", "OUT"], ["empty model name"]),
    (["serve", "--model", "", "--port", "8123"], ["empty model name"]),
    (["serve", "--port", "99999"], ["--port must be between 1 and 65535 (got 99999)"]),
    (["serve", "--port", "0"], ["--port must be between 1 and 65535"]),
    (["compile", "smollm2", "--quant", "q8_0"], ["need -o DIR"]),
])
def test_bad_arguments(tmp_path, args, fragments):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    assert_cli_error(kiln(*args, env={"KILN_CACHE": str(tmp_path / "cache")}), *fragments)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("chunk", ["0", "7", "-8", "12", "100000"])
def test_bad_prefill_chunk(tmp_path, gguf, chunk):
    out = tmp_path / "out"
    assert_cli_error(kiln("compile", gguf, "-o", out, "--prefill-chunk", chunk, "--no-selftest"),
                     f"--prefill-chunk must be a multiple of 8 between 8 and 4096 (got {chunk})")
    with pytest.raises(KilnError, match="--prefill-chunk"):
        compile_model(gguf, out, prefill_chunk=int(chunk))
    assert sorted(os.listdir(tmp_path)) == []


def test_good_prefill_chunk_compiles(tmp_path, gguf):
    p = kiln("compile", gguf, "-o", tmp_path / "out", "--prefill-chunk", "8", "--no-selftest")
    assert p.returncode == 0, p.stderr
    assert read_manifest(tmp_path / "out")["limits"]["prefill_chunk"] == 8


def test_non_utf8_stdin(tmp_path):
    p = subprocess.run(kiln_cmd() + ["run", str(tmp_path / "nope.gguf"), "-n", "1"], input=b"caf\xe9\n",
                       capture_output=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp")})
    p = subprocess.CompletedProcess(p.args, p.returncode, p.stdout.decode(), p.stderr.decode())
    assert_cli_error(p, "the prompt on standard input is not valid UTF-8 text (byte 0xe9 at offset 3)")


def test_non_utf8_chat_template_file(tmp_path):
    t = tmp_path / "latin1.jinja"
    t.write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    assert_cli_error(kiln("run", tmp_path / "nope.gguf", "--chat", "--chat-template", t, "--prompt", "hi"),
                     f"--chat-template {t}: not valid UTF-8 text (byte 0xe9")


@pytest.mark.parametrize("name, value, minimum", [
    ("KILN_SLOTS", "abc", 1), ("KILN_SLOTS", "0", 1), ("KILN_QUEUE", "-1", 0), ("KILN_QUEUE", "1.5", 0),
])
def test_bad_server_environment(tmp_path, monkeypatch, name, value, minimum):
    fragment = f"{name}={value!r}: must be an integer >= {minimum}"
    p = kiln("serve", "--model", tmp_path / "nope.gguf", "--port", "8123", env={name: value, "KILN_CACHE": str(tmp_path)})
    assert_cli_error(p, fragment)                   # refused before the model is even looked up
    from runtime_py.server import env_int
    monkeypatch.setenv(name, value)
    with pytest.raises(KilnError) as e:
        env_int(name, minimum)
    assert str(e.value) == fragment
    monkeypatch.setenv(name, "3")
    assert env_int(name, minimum) == 3


def test_staging_dir_is_unique_and_marked(tmp_path):
    a, b = staging_dir(tmp_path / "x"), staging_dir(tmp_path / "x")
    assert a != b and a.parent == b.parent == tmp_path
    assert json.loads((a / MARKER_FILE).read_text())["pid"] == os.getpid()


def test_serve_refuses_an_artifact_with_an_edited_file(tmp_path, gguf):
    art = compile_model(gguf, tmp_path / "art")
    tok = art / "tokenizer.json"
    tok.write_bytes(tok.read_bytes() + b" ")
    assert_cli_error(kiln("serve", "--model", art, "--port", "8123"), f"{tok}: tokenizer does not match")
