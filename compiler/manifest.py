"""Stage 7 — the manifest: everything a runtime needs to run the model, as versioned JSON.

manifest.json (format "kiln", version MANIFEST_VERSION), pure ASCII, written by `write_manifest` only (atomically:
a temp file in the same directory, then a rename), read by `read_manifest` only, which checks its checksum here and
every field against the schema in compiler/manifest_schema.py (`validate`); the browser's web/loader.js
`fetchManifest` applies the same rules.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path

from .errors import ArtifactError, KilnError
from .manifest_schema import validate

MANIFEST_VERSION = 2          # 2: manifest_sha256, sha256 of every shader and of tokenizer.json
MANIFEST_FILE = "manifest.json"
CHECKSUM_KEY = "manifest_sha256"
_ZERO_SUM = "0" * 64
_CHECKSUM_RE = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')   # first match: the third key of the file


def kernel_entry(kernel) -> dict:
    return {"file": f"shaders/{kernel.name}.wgsl", "params": [list(p) for p in kernel.params],
            "bindings": [list(b) for b in kernel.bindings()]}


def program_json(program) -> list[dict]:
    return program.json()


def program_dispatches(programs) -> dict[str, int]:
    """{program: dispatches per forward}: one per step."""
    return {n: len(p.steps) for n, p in programs.items()}


def kernel_features(kernels) -> list[str]:
    """The optional WebGPU features any kernel needs, sorted (what web/device.js and runtime_py/device.py request)."""
    return sorted({f for k in kernels for f in k.features})


def bytes_by_quant(weights: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in weights.values():
        out[w["quant"]] = out.get(w["quant"], 0) + sum(p["bytes"] for p in w["parts"])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# -- writing ------------------------------------------------------------------------------------------------------
def manifest_bytes(manifest: dict, *, check: bool = True) -> bytes:
    """The file's bytes: format, version, manifest_sha256 first, then `manifest` (minus those keys), checksummed.
    check: validate against the schema first, so kiln never seals a manifest it would refuse to read (the browser
    relies on that: it checks the checksum and the file hashes, not the schema). Tests pass False to forge one."""
    body = {k: v for k, v in manifest.items() if k not in ("format", "version", CHECKSUM_KEY)}
    if check:
        validate(body, MANIFEST_FILE, hint="refusing to write it: the GGUF's metadata is out of range, or kiln has a "
                                           "bug (please report it)")
    try:
        text = json.dumps({"format": "kiln", "version": MANIFEST_VERSION, CHECKSUM_KEY: _ZERO_SUM, **body}, indent=1,
                          allow_nan=False)
    except ValueError as e:    # a NaN / inf from the model's metadata: never write a manifest no browser can parse
        raise KilnError(f"cannot write {MANIFEST_FILE}: {e} (a hyperparameter of the model is NaN or infinite)") \
            from None
    raw = text.encode("ascii")
    digest = hashlib.sha256(raw).hexdigest()
    return raw.replace(f'"{CHECKSUM_KEY}": "{_ZERO_SUM}"'.encode(), f'"{CHECKSUM_KEY}": "{digest}"'.encode(), 1)


def atomic_write(path: Path, data: bytes):
    """path gets `data` whole or not at all: a unique temp file beside it, fsync, rename over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    """Writes out_dir/manifest.json atomically. Shaders and tokenizer.json, already written to out_dir, get their
    sha256 recorded here (shards come with theirs from compiler/shards.py), so no file goes unhashed."""
    out_dir = Path(out_dir)
    for entry in [*manifest.get("kernels", {}).values(), manifest.get("tokenizer", {})]:
        if "file" in entry and "sha256" not in entry:
            entry["sha256"] = file_sha256(out_dir / entry["file"])
    path = out_dir / MANIFEST_FILE
    atomic_write(path, manifest_bytes(manifest))
    return path


def update_manifest(art_dir: Path, **fields) -> dict:
    """Read (validated), set `fields`, write back atomically (re-checksummed). Returns the new manifest."""
    m = read_manifest(art_dir)
    m.update(fields)
    write_manifest(art_dir, m)
    return m


# -- reading ------------------------------------------------------------------------------------------------------
def _finite(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s} is out of range")
    return v


def _no_constant(s: str):
    raise ValueError(f"{s} is not a JSON number")


def read_manifest(art_dir: Path) -> dict:
    path = Path(art_dir) / MANIFEST_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{art_dir}: no {MANIFEST_FILE} (not a compiled kiln artifact)") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the manifest ({e.strerror or e})") from None
    try:
        m = json.loads(raw.decode("utf-8"), parse_float=_finite, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:   # JSONDecodeError is a ValueError
        raise ArtifactError(f"{path}: corrupt manifest ({str(e)[:200]}); recompile the model") from None
    if not isinstance(m, dict):
        raise ArtifactError(f"{path}: corrupt manifest (a JSON {type(m).__name__}, not an object); recompile the model")
    if m.get("format") != "kiln" or m.get("version") != MANIFEST_VERSION:
        raise ArtifactError(f"{path}: manifest format {str(m.get('format'))[:40]!r} v{str(m.get('version'))[:20]} "
                            f"(this kiln reads kiln v{MANIFEST_VERSION}; recompile the model)")
    check_checksum(raw, m, path)
    validate(m, path)
    return m


def check_checksum(raw: bytes, m: dict, path) -> None:
    found = _CHECKSUM_RE.search(raw)
    if found is None or m.get(CHECKSUM_KEY) != found.group(1).decode():
        raise ArtifactError(f"{path}: no valid {CHECKSUM_KEY} (not written by this kiln); recompile the model")
    zeroed = raw[:found.start(1)] + _ZERO_SUM.encode() + raw[found.end(1):]
    if hashlib.sha256(zeroed).hexdigest() != found.group(1).decode():
        raise ArtifactError(f"{path}: the manifest was modified after kiln wrote it (its {CHECKSUM_KEY} does not "
                            f"match its contents); recompile the model")


def check_file(art_dir: Path, file: str, sha256: str, what: str) -> bytes:
    """The bytes of artifact file `file`, refused unless they hash to the manifest's `sha256`."""
    path = Path(art_dir) / file
    try:
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise ArtifactError(f"{path}: {what} missing from the artifact; recompile the model") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(f"{path}: {what} does not match the manifest's sha256 (edited or damaged after "
                            f"compiling); recompile the model")
    return data
