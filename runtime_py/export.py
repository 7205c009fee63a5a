"""`kiln export DIR [MODEL ...]`: the web demo and its models as plain static files, for any static host or CDN.

DIR after an export (every URL inside is relative, so DIR may be served from any base path, e.g. /apps/kiln/):

    index.html                     the demo page (web/index.html)
    models.json                    [{id, name, arch, url, bytes, selftest}] (what `kiln serve` generates at run time)
    web/*.js, web/*.css            the runtime modules and the demo's CSS, as they are in web/
    web/example.html               a dozen-line page using the runtime as a library (createEngine from web/api.js)
    web/node_modules/<pkg>/...     only the npm files the page's import map names, plus each package's LICENSE
    models/<id>/manifest.json      the artifact's manifest with each shard renamed as below
    models/<id>/tokenizer.json, shaders/*.wgsl
    models/<id>/shard-NNN.<sha256[:16]>.bin
                                   the compiled shards, byte for byte (hard links when DIR is on the same file system),
                                   named by content: a host may cache them forever (`Cache-Control: immutable`)
    .kiln-export                   marks DIR as an export, so a later export may replace it

Only the shard file names differ from the compiled artifact; kernels, programs and hashes are the same, so the
browser runs exactly the artifact the native runtime runs. Headers a host should send (see web/deploy/nginx.conf):
MIME types of HEADERS below; `immutable` caching for shards only (manifest.json, models.json and the rest change when
a model is recompiled or kiln is updated, so they are revalidated); CORS on models/ when the page is on another
origin; COOP/COEP optional.

`models_url` puts another origin (a CDN, a bucket) in models.json: the page then loads each model from
`<models_url><id>/`, and DIR/models/ is what to upload there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from compiler.errors import KilnError
from compiler.manifest import MANIFEST_FILE, read_manifest, write_manifest

from .static import MIME_TYPES, model_entry

MARKER = ".kiln-export"
# The Content-Type a host must send per suffix (browsers refuse module scripts served as anything but JavaScript).
HEADERS = {s: MIME_TYPES[s] for s in (".html", ".js", ".mjs", ".css", ".json", ".wgsl", ".bin")}
IMMUTABLE = "public, max-age=31536000, immutable"     # content-hashed shards
REVALIDATE = "no-cache"                               # everything else: revalidate (ETag / Last-Modified)
SHARD_NAME = re.compile(r"^shard-\d+\.[0-9a-f]{16}\.bin$")
IMPORT_MAP = re.compile(r'<script type="importmap">(.*?)</script>', re.S)
WEB_SUFFIXES = (".js", ".css")
EXAMPLE = "example.html"


def import_map_files(index_html: str) -> list[str]:
    """Relative paths (under web/) of the files the page's import map points at."""
    m = IMPORT_MAP.search(index_html)
    if not m:
        return []
    out = []
    for url in json.loads(m.group(1))["imports"].values():
        if not url.startswith("./web/node_modules/"):    # relative, so that the site works under any base path
            raise KilnError(f"web/index.html: import map entry {url!r} is not under ./web/node_modules/")
        out.append(url[len("./web/"):])
    return out


def hashed_name(shard: dict) -> str:
    """shard-000.bin -> shard-000.<first 16 hex digits of its sha256>.bin"""
    stem = Path(shard["file"]).stem
    return f"{stem}.{shard['sha256'][:16]}.bin"


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)       # no second copy of the weights when DIR is on the artifact's file system
    except OSError:
        shutil.copy2(src, dst)


def export_model(art: Path, out: Path) -> None:
    """One artifact directory -> out/ with content-hashed shard names and the manifest rewritten to match."""
    m = read_manifest(art)          # validated: a damaged artifact is not exported
    for shard in m["shards"]:
        name = hashed_name(shard)
        _link_or_copy(art / shard["file"], out / name)
        shard["file"] = name
    for kernel in m["kernels"].values():
        _link_or_copy(art / kernel["file"], out / kernel["file"])
    _link_or_copy(art / m["tokenizer"]["file"], out / m["tokenizer"]["file"])
    write_manifest(out, m)          # re-sealed: its manifest_sha256 covers the renamed shards


def export_site(out_dir: Path, web_dir: Path, artifacts: dict[str, Path], models_url: str | None = None,
                log=lambda *a: None) -> Path:
    """Writes the static site (layout in the module docstring) to out_dir, replacing an earlier export there.
    artifacts: model id -> compiled artifact directory. Built in a sibling temp dir, then renamed into place, so an
    interrupted export never leaves a half-written site behind."""
    out_dir, web_dir = Path(out_dir), Path(web_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER).exists())):
        raise KilnError(f"{out_dir}: exists and is not an earlier `kiln export`; choose a new or empty directory")
    if models_url is not None and not (models_url.endswith("/") and
                                       (re.match(r"^https?://[^/]+/", models_url) or ":" not in models_url)):
        raise KilnError(f"--models-url {models_url!r}: expected an http(s) URL or a path, ending in '/'")
    index = (web_dir / "index.html").read_text()
    npm = import_map_files(index)
    missing = [f for f in npm if not (web_dir / f).exists()]
    if missing:
        raise KilnError(f"{web_dir}: {', '.join(missing)} missing: run `make web` (npm ci in web/) first")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        shutil.copy2(web_dir / "index.html", tmp / "index.html")
        for f in sorted(web_dir.iterdir()):
            if f.is_file() and (f.suffix in WEB_SUFFIXES or f.name == EXAMPLE):
                _link_or_copy(f, tmp / "web" / f.name)
        packages = sorted({Path(*Path(f).parts[:3]) for f in npm})     # node_modules/@scope/name
        for f in npm + [str(p / "LICENSE") for p in packages if (web_dir / p / "LICENSE").exists()]:
            _link_or_copy(web_dir / f, tmp / "web" / f)
        models = []
        for model_id, art in artifacts.items():
            log(f"exporting {model_id} from {art}")
            export_model(Path(art), tmp / "models" / model_id)
            entry = model_entry(model_id, Path(art))
            entry["url"] = f"{models_url or 'models/'}{model_id}/"
            models.append(entry)
        (tmp / "models.json").write_text(json.dumps(models, indent=1))
        (tmp / MARKER).write_text("written by `kiln export`; the directory is replaced by the next export\n")
        os.chmod(tmp, 0o755)      # mkdtemp makes it 0700: a web server's user must read it
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
