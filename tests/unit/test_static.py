"""runtime_py/static.py: routes, MIME types, HTTP Range, ETag revalidation, and no file served from outside its root.

No browser and no GPU: a tiny fake web/ directory and artifact, FastAPI's TestClient, and a raw ASGI call for paths an
HTTP client would normalise before sending (`../`).
"""
from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from runtime_py.static import mount_static

SHARD = bytes(range(256)) * 16          # 4096 bytes with a position-dependent pattern
SECRET = "top secret, outside every served root"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("static")
    web = root / "web"
    (web / "node_modules" / "pkg").mkdir(parents=True)
    (web / "index.html").write_text("<!doctype html><title>kiln</title>")
    (web / "api.js").write_text("export const x = 1;\n")
    (web / "demo.css").write_text("body {}\n")
    (web / "node_modules" / "pkg" / "index.mjs").write_text("export default 1;\n")
    art = root / "artifacts" / "tiny-0123"
    (art / "shaders").mkdir(parents=True)
    manifest = {"format": "kiln", "version": 1, "model": {"name": "Tiny", "arch": "llama"},
                "shards": [{"file": "shard-000.bin", "bytes": len(SHARD), "sha256": "0" * 64}]}
    (art / "manifest.json").write_text(json.dumps(manifest))
    (art / "shaders" / "argmax.wgsl").write_text("@compute @workgroup_size(1) fn main() {}\n")
    (art / "shard-000.bin").write_bytes(SHARD)
    (root / "secret.txt").write_text(SECRET)
    # symlinks that point out of their root must not be followed
    os.symlink(root / "secret.txt", web / "leak.txt")
    os.symlink(root / "secret.txt", art / "leak.bin")
    os.symlink(root, web / "up")
    return {"root": root, "web": web, "art": art}


@pytest.fixture(scope="module")
def app(tree) -> FastAPI:
    app = FastAPI()
    mount_static(app, tree["web"], {"tiny": tree["art"]})
    return app


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app)


def raw_get(app, raw_path: str) -> tuple[int, bytes]:
    """GET exactly `raw_path` (no client-side normalisation), decoded into scope["path"] as uvicorn does."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": unquote(raw_path), "raw_path": raw_path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
    out = {"status": None, "body": b""}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        if msg["type"] == "http.response.start":
            out["status"] = msg["status"]
        elif msg["type"] == "http.response.body":
            out["body"] += msg.get("body", b"")

    # in a thread of its own: the caller's thread may already run an event loop (Playwright's, in a full test run)
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, app(scope, receive, send)).result()
    return out["status"], out["body"]


# -- routes and MIME types -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, mime", [
    ("/", "text/html"),
    ("/web/api.js", "text/javascript"),
    ("/web/demo.css", "text/css"),
    ("/web/node_modules/pkg/index.mjs", "text/javascript"),
    ("/models.json", "application/json"),
    ("/models/tiny/manifest.json", "application/json"),
    ("/models/tiny/shaders/argmax.wgsl", "text/wgsl"),
    ("/models/tiny/shard-000.bin", "application/octet-stream"),
])
def test_mime_types(client, path, mime):
    r = client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].split(";")[0] == mime
    assert r.headers["cache-control"] == "no-cache"


def test_models_json_lists_artifacts(client):
    assert client.get("/models.json").json() == [
        {"id": "tiny", "name": "Tiny", "arch": "llama", "url": "models/tiny/", "bytes": len(SHARD), "selftest": False}]


def test_missing_file_is_404(client):
    assert client.get("/models/tiny/shard-999.bin").status_code == 404
    assert client.get("/models/nope/manifest.json").status_code == 404
    assert client.post("/web/api.js").status_code == 405


# -- Range and ETag --------------------------------------------------------------------------------------------------

def test_range_request(client):
    r = client.get("/models/tiny/shard-000.bin", headers={"Range": "bytes=100-355"})
    assert r.status_code == 206
    assert r.content == SHARD[100:356]
    assert r.headers["content-range"] == f"bytes 100-355/{len(SHARD)}"
    assert r.headers["accept-ranges"] == "bytes"


def test_suffix_range_and_unsatisfiable(client):
    r = client.get("/models/tiny/shard-000.bin", headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == SHARD[-10:]
    r = client.get("/models/tiny/shard-000.bin", headers={"Range": f"bytes={len(SHARD) + 10}-"})
    assert r.status_code == 416


def test_etag_revalidation(client):
    r = client.get("/models/tiny/manifest.json")
    etag = r.headers["etag"]
    r2 = client.get("/models/tiny/manifest.json", headers={"If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b""
    assert r2.headers["etag"] == etag and r2.headers["cache-control"] == "no-cache"
    assert client.get("/models/tiny/manifest.json", headers={"If-None-Match": '"other"'}).status_code == 200


# -- nothing outside the roots ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    "/web/../secret.txt",
    "/web/%2e%2e/secret.txt",
    "/web/%2E%2E/%2E%2E/secret.txt",
    "/web/..%2fsecret.txt",
    "/web/node_modules/../../secret.txt",
    "/web//etc/passwd",
    "/web/%2fetc/passwd",
    "/models/tiny/../../secret.txt",
    "/models/tiny/%2e%2e/%2e%2e/secret.txt",
    "/models/tiny/..%2f..%2fsecret.txt",
    "/models/tiny//etc/passwd",
    "/models/..%2f..%2fsecret.txt/x",
])
def test_traversal_is_refused(app, raw):
    status, body = raw_get(app, raw)
    assert status == 404, (raw, status)
    assert SECRET.encode() not in body and b"root:" not in body


@pytest.mark.parametrize("path", ["/web/leak.txt", "/models/tiny/leak.bin", "/web/up/secret.txt"])
def test_symlinks_out_of_root_are_refused(client, path):
    r = client.get(path)
    assert r.status_code == 404
    assert SECRET not in r.text
