"""The artifact cache as users meet it (runtime_py/artifacts.py), through `kiln run` on the tiny GGUF with KILN_CACHE
in a temporary directory: concurrent first runs, a GGUF edited in place, damaged entries rebuilt (saying so, with the
path), `kiln compile --force` and `--verify`. Issue 9.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from compiler.manifest import read_manifest, write_manifest
from tests.unit.test_errors import CLI_TIMEOUT, ROOT, assert_cli_error, flip_byte, kiln, kiln_cmd, write_tiny_gguf

RUN = ["-n", "2", "--temperature", "0", "--prompt", "ab"]    # not --json: that keeps stderr quiet, and the log is tested


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "artifacts").iterdir() if p.is_dir()) if (cache / "artifacts").exists() else []


def run(gguf, cache: Path, *extra, args=RUN):
    return kiln("run", gguf, *extra, *args, env={"KILN_CACHE": str(cache)})


def ok(p) -> str:
    """The generated text of a successful run."""
    assert p.returncode == 0 and "Traceback" not in p.stderr, f"rc={p.returncode}\n{p.stderr[-3000:]}"
    assert "generated" in p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("cache-gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def warm(tmp_path_factory, gguf) -> tuple[Path, dict]:
    """A cache holding the tiny model's entry (first run done), and what that run printed."""
    cache = tmp_path_factory.mktemp("warm-cache")
    return cache, ok(run(gguf, cache))


@pytest.fixture
def cache(tmp_path, warm) -> Path:
    """A private copy of the warm cache (entries are content-addressed, so the copy serves the same GGUF)."""
    dst = tmp_path / "cache"
    shutil.copytree(warm[0], dst, symlinks=True)
    return dst


def test_two_concurrent_first_runs_both_succeed_5_times(tmp_path, gguf, warm):
    env = {**os.environ, "XDG_RUNTIME_DIR": os.environ.get("XDG_RUNTIME_DIR", "/tmp")}
    for i in range(5):
        cache = tmp_path / f"cache{i}"
        procs = [subprocess.Popen(kiln_cmd() + ["run", str(gguf), *RUN], cwd=ROOT, text=True,
                                  env={**env, "KILN_CACHE": str(cache)}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(2)]
        outs = [p.communicate(timeout=CLI_TIMEOUT) for p in procs]
        for p, (out, err) in zip(procs, outs):
            assert p.returncode == 0 and "Traceback" not in err, f"round {i}: rc={p.returncode}\n{err[-3000:]}"
            assert out == warm[1]
        compiled = sum("compiling tiny.gguf" in err for _, err in outs)
        assert compiled == 1, [err for _, err in outs]        # the second waited for the first, then used its entry
        (entry,) = entries(cache)
        assert "selftest" in read_manifest(entry)
        assert sorted(p.name for p in (cache / "artifacts").iterdir()) == [entry.name, entry.name + ".lock"]


def test_second_run_uses_the_entry(gguf, cache, warm):
    p = run(gguf, cache)
    assert ok(p) == warm[1] and "compiling" not in p.stderr and "rebuilding" not in p.stderr


def test_gguf_edited_in_place_is_recompiled(tmp_path, cache):
    """Same path, size, inode and mtime, different bytes: a new entry, not the stale artifact."""
    g = write_tiny_gguf(tmp_path / "tiny.gguf")     # the same bytes as the warm cache's GGUF
    p = run(g, cache)
    ok(p)
    assert "compiling" not in p.stderr
    (old,) = entries(cache)
    st = g.stat()
    data = bytearray(g.read_bytes())
    emb = len(data) - 4 * 32 * 64 * 3            # well inside the tensor data (the last tensors are the FFN)
    for j in range(0, 4096, 4):
        data[emb + j] ^= 0x40
    with open(g, "r+b") as f:
        f.write(bytes(data))
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (g.stat().st_size, g.stat().st_mtime_ns, g.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    p = run(g, cache)
    ok(p)
    assert "compiling tiny.gguf" in p.stderr
    new = [e for e in entries(cache) if e != old]
    assert len(new) == 1
    import hashlib
    assert read_manifest(new[0])["model"]["source"]["sha256"] == hashlib.sha256(bytes(data)).hexdigest()

    # broken magic, same size and mtime: an error, not the cached artifact
    data[:4] = b"XXXX"
    with open(g, "r+b") as f:
        f.write(bytes(data))
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert_cli_error(run(g, cache), "not a GGUF file", first_line=False)


def _drop_selftest(e: Path):
    m = read_manifest(e)
    m.pop("selftest")
    write_manifest(e, m)


DAMAGE = {   # what happened to the entry -> (how, phrase in the message)
    "missing-shard": (lambda e: (e / "shard-000.bin").unlink(), "shard shard-000.bin is missing"),
    "truncated-shard": (lambda e: os.truncate(e / "shard-000.bin", 100), "has 100 bytes"),
    "flipped-shard-byte": (lambda e: flip_byte(e / "shard-000.bin", 1000), "shard is corrupt"),
    "no-selftest": (_drop_selftest, "no self-test record"),
    "manifest-garbage": (lambda e: (e / "manifest.json").write_text("{\"format"), "corrupt manifest"),
    "manifest-edited": (lambda e: (e / "manifest.json").write_text(
        (e / "manifest.json").read_text().replace('"n_layer": 1', '"n_layer": 2')), "modified after kiln wrote it"),
    "edited-shader": (lambda e: next((e / "shaders").iterdir()).write_text("// edited\n"), "shader does not match"),
    "edited-tokenizer": (lambda e: (e / "tokenizer.json").write_text("{}"), "tokenizer does not match"),
    "no-marker": (lambda e: (e / ".kiln-artifact").unlink(), "no .kiln-artifact marker"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_entry_is_rebuilt(gguf, cache, warm, damage):
    how, phrase = DAMAGE[damage]
    (entry,) = entries(cache)
    how(entry)
    p = run(gguf, cache)
    assert ok(p) == warm[1]
    assert str(entry) in p.stderr and phrase in p.stderr and "rebuilding" in p.stderr, p.stderr
    assert entries(cache) == [entry] and "selftest" in read_manifest(entry)
    p = run(gguf, cache)                                   # whole again: no second rebuild
    assert ok(p) and "rebuilding" not in p.stderr


def test_verify_finds_a_flipped_byte_before_loading(gguf, cache):
    (entry,) = entries(cache)
    flip_byte(entry / "shard-000.bin", 1000)
    p = run(gguf, cache, "--verify")
    ok(p)
    assert f"cache entry {entry} is damaged" in p.stderr and "sha256" in p.stderr


def test_compile_force_rebuilds_the_entry(gguf, cache):
    (entry,) = entries(cache)
    before = (entry / "manifest.json").stat().st_ino
    p = kiln("compile", "--force", gguf, env={"KILN_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr
    assert f"rebuilding {entry}" in p.stderr and p.stdout.startswith(f"wrote {entry}:")
    assert (entry / "manifest.json").stat().st_ino != before and "selftest" in read_manifest(entry)
    p = kiln("compile", gguf, env={"KILN_CACHE": str(cache)})       # whole: nothing to do
    assert p.returncode == 0 and "rebuilding" not in p.stderr and p.stdout.startswith(f"wrote {entry}:")
