"""runtime_py/export.py (`kiln export`): the static site's layout, content-hashed shards, only the import-mapped npm
files, hard links instead of copies, and an output directory that is never something else's.

No browser, no GPU: a fake artifact (manifest + shader + tokenizer + two shards) and the real web/ directory. The
browser side (nginx, http.server, CORS) is tests/e2e/test_export.py (a unique basename: pytest imports both).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.errors import KilnError
from compiler.manifest import read_manifest
from runtime_py.export import MARKER, SHARD_NAME, export_site, import_map_files
from runtime_py.server import WEB_DIR

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def art(tmp_path) -> Path:
    """A real compiled artifact of the tiny GGUF (its manifest validated and sealed like any other)."""
    from compiler.pipeline import compile_model
    from tests.unit.test_errors import write_tiny_gguf
    return compile_model(write_tiny_gguf(tmp_path / "tiny.gguf"), tmp_path / "artifacts" / "tiny-0123")


needs_web = pytest.mark.skipif(not (WEB_DIR / "node_modules").exists(), reason="web/node_modules missing: make web")


def files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}


@needs_web
def test_layout_and_manifest(art, tmp_path):
    out = export_site(tmp_path / "site", WEB_DIR, {"tiny": art})
    got = files(out)
    npm = import_map_files((WEB_DIR / "index.html").read_text())
    assert npm and all(f.startswith("node_modules/") for f in npm)
    web_files = {f"web/{p.name}" for p in WEB_DIR.iterdir() if p.suffix in (".js", ".css")} | {"web/example.html"}
    licenses = {f"web/node_modules/{'/'.join(Path(f).parts[1:3])}/LICENSE" for f in npm}
    licenses = {f for f in licenses if (WEB_DIR / f[len("web/"):]).exists()}   # web-xgrammar ships none (Apache-2.0)
    shard_files = {f for f in got if f.startswith("models/tiny/shard-")}
    orig = json.loads((art / "manifest.json").read_text())
    shaders = {f"models/tiny/{k['file']}" for k in orig["kernels"].values()}
    assert got == ({"index.html", "models.json", MARKER, "models/tiny/manifest.json", "models/tiny/tokenizer.json"}
                   | shaders | web_files | {f"web/{f}" for f in npm} | licenses | shard_files)
    # only the import-mapped files of node_modules, not the packages' other builds and sources
    assert not any(f.endswith((".cjs", ".ts")) for f in got)

    m = read_manifest(out / "models/tiny")        # re-sealed: valid, its checksum covers the new shard names
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in orig["shards"]]
    for s, o in zip(m["shards"], orig["shards"]):
        assert SHARD_NAME.match(s["file"]) and s["sha256"].startswith(s["file"].split(".")[1])
        assert (out / "models/tiny" / s["file"]).read_bytes() == (art / o["file"]).read_bytes()
    # everything but the shard names (and the checksum over them) is the compiled manifest
    same = lambda d: {k: v for k, v in d.items() if k not in ("shards", "manifest_sha256")}  # noqa: E731
    assert same(m) == same(orig)
    assert json.loads((out / "models.json").read_text()) == [
        {"id": "tiny", "name": orig["model"]["name"], "arch": "llama", "url": "models/tiny/",
         "bytes": sum(s["bytes"] for s in orig["shards"]), "selftest": "selftest" in orig}]


@needs_web
def test_shards_are_hard_links(art, tmp_path):
    out = export_site(tmp_path / "site", WEB_DIR, {"tiny": art})
    m = json.loads((out / "models/tiny/manifest.json").read_text())
    for i, s in enumerate(m["shards"]):
        assert os.stat(out / "models/tiny" / s["file"]).st_ino == os.stat(art / f"shard-{i:03d}.bin").st_ino


@needs_web
def test_index_urls_are_relative():
    html = (WEB_DIR / "index.html").read_text()
    assert 'href="/' not in html and 'src="/' not in html and '"/web/' not in html


@needs_web
def test_models_url_and_reexport(art, tmp_path):
    out = export_site(tmp_path / "site", WEB_DIR, {"tiny": art}, models_url="https://cdn.example.com/kiln/models/")
    assert json.loads((out / "models.json").read_text())[0]["url"] == "https://cdn.example.com/kiln/models/tiny/"
    (out / "stale.txt").write_text("from an earlier export")
    export_site(out, WEB_DIR, {"tiny": art})           # an earlier export is replaced as a whole
    assert not (out / "stale.txt").exists() and (out / "models.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".site")] == []   # no temp dirs left behind


@needs_web
@pytest.mark.parametrize("bad", ["ftp://x/models/", "https://cdn.example.com/models", "javascript:alert(1)/"])
def test_bad_models_url_is_refused(art, tmp_path, bad):
    with pytest.raises(KilnError, match="--models-url"):
        export_site(tmp_path / "site", WEB_DIR, {"tiny": art}, models_url=bad)
    assert not (tmp_path / "site").exists()


@needs_web
def test_never_overwrites_a_foreign_directory(art, tmp_path):
    d = tmp_path / "home"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    with pytest.raises(KilnError, match="not an earlier `kiln export`"):
        export_site(d, WEB_DIR, {"tiny": art})
    assert (d / "thesis.tex").read_text() == "precious"


def test_missing_npm_files_are_a_clear_error(art, tmp_path):
    web = tmp_path / "web"
    web.mkdir()
    (web / "index.html").write_text((WEB_DIR / "index.html").read_text())
    with pytest.raises(KilnError, match="make web"):
        export_site(tmp_path / "site", web, {"tiny": art})


@needs_web
def test_cli_export(art, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "runtime_py.cli", "export", str(tmp_path / "site"), str(art)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and (tmp_path / "site" / "models" / "tiny-0123" / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "runtime_py.cli", "export", str(tmp_path / "site"), str(art), str(art)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("kiln: error: two models export as models/tiny-0123/")
    assert "Traceback" not in r.stderr
