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
from runtime_py.export import MARKER, SHARD_NAME, export_site, import_map_files
from runtime_py.server import WEB_DIR

ROOT = Path(__file__).resolve().parents[2]
SHARDS = [bytes(range(256)) * 8, b"\x07" * 1000]


@pytest.fixture
def art(tmp_path) -> Path:
    a = tmp_path / "artifacts" / "tiny-0123"
    (a / "shaders").mkdir(parents=True)
    (a / "shaders" / "argmax.wgsl").write_text("@compute @workgroup_size(1) fn main() {}\n")
    (a / "tokenizer.json").write_text('{"model": {}}')
    shards = []
    for i, data in enumerate(SHARDS):
        (a / f"shard-{i:03d}.bin").write_bytes(data)
        shards.append({"file": f"shard-{i:03d}.bin", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"format": "kiln", "version": 1, "model": {"name": "Tiny", "arch": "llama"}, "shards": shards,
                "tokenizer": {"file": "tokenizer.json"},
                "kernels": {"argmax": {"file": "shaders/argmax.wgsl", "params": [], "bindings": []}},
                "weights": {"w": {"parts": [{"shard": 1, "offset": 0, "bytes": 1000}]}}, "selftest": {"top5": []}}
    (a / "manifest.json").write_text(json.dumps(manifest))
    return a


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
    shard_files = {f for f in got if f.startswith("models/tiny/shard-")}
    assert got == ({"index.html", "models.json", MARKER, "models/tiny/manifest.json", "models/tiny/tokenizer.json",
                    "models/tiny/shaders/argmax.wgsl"} | web_files | {f"web/{f}" for f in npm} | licenses | shard_files)
    # only the import-mapped files of node_modules, not the packages' other builds and sources
    assert not any(f.endswith((".cjs", ".ts")) for f in got)

    m = json.loads((out / "models/tiny/manifest.json").read_text())
    orig = json.loads((art / "manifest.json").read_text())
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in orig["shards"]]
    for s, data in zip(m["shards"], SHARDS):
        assert SHARD_NAME.match(s["file"]) and s["sha256"].startswith(s["file"].split(".")[1])
        assert (out / "models/tiny" / s["file"]).read_bytes() == data
    # everything but the shard names is the compiled manifest
    assert {k: v for k, v in m.items() if k != "shards"} == {k: v for k, v in orig.items() if k != "shards"}
    assert json.loads((out / "models.json").read_text()) == [
        {"id": "tiny", "name": "Tiny", "arch": "llama", "url": "models/tiny/", "bytes": sum(map(len, SHARDS)),
         "selftest": True}]


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
