"""Static routes of `kiln serve`: the demo page, the browser runtime and the compiled artifacts.

    GET /                        web/index.html
    GET /web/{path}              web/ (ES modules, CSS, and the npm packages under web/node_modules)
    GET /models.json             [{id, name, arch, url, bytes, selftest}] of the artifacts being served; `url` is
                                 relative ("models/{id}/"), so the app also works behind a proxy under a sub-path
    GET /models/{id}/{path}      artifact files: manifest.json, tokenizer.json, shaders/*.wgsl, shard-*.bin

Files come from Starlette's StaticFiles, which resolves every path (symlinks included) and refuses anything outside its
directory, answers HTTP Range requests (206) and ETag / If-Modified-Since revalidation (304). On top of that: explicit
MIME types (.wgsl and .mjs are unknown to many `mimetypes` tables) and a Cache-Control header. Everything is `no-cache`
(always revalidate, cheap with ETags) because an artifact is recompiled in place; the browser runtime keeps verified
shards in the Cache API itself, keyed by their sha256, so revalidation never re-downloads weights.

`kiln export` (runtime_py/export.py) writes the same routes as static files for hosts without Python; MIME_TYPES is
the table both document.
"""
from __future__ import annotations

import json
import mimetypes
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from compiler.manifest import MANIFEST_FILE

MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wgsl": "text/wgsl; charset=utf-8",
    ".bin": "application/octet-stream",
    ".map": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
CACHE_CONTROL = "no-cache"


def mime_type(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    return MIME_TYPES.get(suffix) or mimetypes.guess_type(str(path))[0] or "application/octet-stream"


class Files(StaticFiles):
    """StaticFiles with kiln's MIME types and Cache-Control (traversal checks, Range and ETags are Starlette's)."""

    def file_response(self, full_path, stat_result, scope, status_code: int = 200):
        from starlette.datastructures import Headers
        from starlette.staticfiles import NotModifiedResponse
        response = FileResponse(full_path, status_code=status_code, stat_result=stat_result,
                                media_type=mime_type(full_path), headers={"Cache-Control": CACHE_CONTROL})
        if self.is_not_modified(response.headers, Headers(scope=scope)):
            return NotModifiedResponse(response.headers)
        return response


def model_entry(model_id: str, art: Path) -> dict:
    """The /models.json entry of one artifact directory."""
    m = json.loads((art / MANIFEST_FILE).read_text())
    return {"id": model_id, "name": m["model"]["name"], "arch": m["model"]["arch"], "url": f"models/{model_id}/",
            "bytes": sum(s["bytes"] for s in m["shards"]), "selftest": "selftest" in m}


def mount_static(app: FastAPI, web_dir: Path, artifacts: dict[str, Path]):
    web_dir = Path(web_dir)
    index = web_dir / "index.html"
    models = [model_entry(i, Path(a)) for i, a in artifacts.items()]

    @app.get("/", include_in_schema=False)
    def index_page():
        return FileResponse(index, media_type=MIME_TYPES[".html"], headers={"Cache-Control": CACHE_CONTROL})

    @app.get("/models.json", include_in_schema=False)
    def models_json():
        return JSONResponse(models, headers={"Cache-Control": CACHE_CONTROL})

    app.mount("/web", Files(directory=web_dir), name="web")
    for model_id, art in artifacts.items():
        app.mount(f"/models/{model_id}", Files(directory=Path(art)), name=f"model-{model_id}")
