"""`kiln serve`: the FastAPI app behind the web demo and the OpenAI-compatible API.

Endpoints
    GET  /                         the demo page (web/index.html)
    GET  /web/...                  the browser runtime (ES modules, import-mapped npm packages under /web/node_modules)
    GET  /models.json              compiled models the demo can load: [{id, name, arch, url, bytes}]
    GET  /models/{id}/...          artifact files (manifest.json, tokenizer.json, shaders/*.wgsl, shard-*.bin)
    /v1/...  /health               OpenAI-compatible API on the native runtime (runtime_py/api.py)

Binds 127.0.0.1 unless told otherwise. Static files are served only from their roots (no path traversal).
Environment: KILN_SLOTS (concurrent sequences, >= 1), KILN_QUEUE (requests waiting beyond those, >= 0); a value that
is not such an integer is refused at startup with one line, like a bad flag.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from fastapi import FastAPI

from compiler.errors import KilnError

from .artifacts import DEFAULT_MODEL, check_artifact_files, ensure_artifact

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


def env_int(name: str, minimum: int) -> int | None:
    """$name as an integer >= minimum (None when unset or empty); anything else is a KilnError naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise KilnError(f"{name}={raw[:40]!r}: must be an integer >= {minimum}")
    return value


def create_app(models: list[str] | None = None, *, api_key: str | None = None, ctx: int | None = None,
               native: bool = True, log=print, verify: bool = False, speculate: str | None = None,
               kv_memory: str | None = None) -> FastAPI:
    """models: model names / GGUF paths / artifact dirs; each is compiled on first start if needed. kv_memory: the
    paged KV pool's size, MiB or "<n>tokens" (else $KILN_KV_MEMORY, else runtime_py/pages.py's default)."""
    slots, queue = env_int("KILN_SLOTS", 1), env_int("KILN_QUEUE", 0)    # refused before anything is compiled
    from .pages import parse_kv_memory
    kv_memory = kv_memory or os.environ.get("KILN_KV_MEMORY") or None
    parse_kv_memory(kv_memory)                                           # a bad value: refused before compiling
    artifacts: dict[str, Path] = {}
    for spec in models or [DEFAULT_MODEL]:
        art = ensure_artifact(spec, log=log, verify=verify)
        check_artifact_files(art, shards=verify)     # an edited shader / tokenizer.json: refused before serving
        artifacts[_model_id(spec, art)] = art
    app = FastAPI(title="kiln", docs_url=None, redoc_url=None)
    app.state.artifacts = artifacts
    from .static import mount_static
    mount_static(app, WEB_DIR, artifacts)
    if native:
        from .api import install_error_handlers, make_router
        install_error_handlers(app)   # OpenAI-shaped errors for every route, not only /v1
        app.include_router(make_router(artifacts, api_key=api_key, ctx=ctx, slots=slots, max_queue=queue,
                                       speculate=speculate, kv_memory=kv_memory))
    return app


def _model_id(spec: str, art: Path) -> str:
    """Stable short id: the known name if one was given, else the artifact directory's name."""
    from .artifacts import KNOWN_MODELS
    return spec if spec in KNOWN_MODELS else art.name


def serve(args):
    import uvicorn
    app = create_app(args.model, api_key=args.api_key, ctx=args.ctx, verify=getattr(args, "verify", False),
                     log=lambda *x: print(*x, file=sys.stderr), speculate=getattr(args, "speculate", None),
                     kv_memory=getattr(args, "kv_memory", None))
    print(f"kiln: serving on http://{args.host}:{args.port}/", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
