"""The compiler, top to bottom: GGUF -> config -> packed weights -> schedule -> WGSL -> shards -> manifest.

    compile_model("model.gguf", "out/")   writes out/{manifest.json, tokenizer.json, shaders/*.wgsl, shard-*.bin}

Each stage is one module, in this order. The artifact is built in a staging directory of its own beside the target and
renamed into place at the end (compiler/output.py), so an interrupted compile never leaves a half-written artifact that
looks whole, and never touches a directory kiln did not make.
KILN_DEBUG=1 prints each stage's result (and every rendered shader).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from . import config as config_stage
from .gguf_file import GGUFModel
from .errors import KilnError
from .manifest import kernel_entry, program_json, write_manifest
from .output import check_target, write_artifact
from .pack import SHARD_BYTES, WeightPacker
from .render import render
from .schedule import activation_buffers, build_programs, score_chunk, PREFILL_TILE
from .shards import ShardWriter
from .tokenizer import build_tokenizer_json, tokenizer_info

COMPILER_VERSION = "3"   # 2: the `score` program; 3: manifest v2 (manifest_sha256, shader + tokenizer sha256)
DEFAULT_PREFILL_CHUNK = 128


def _debug(stage: str, obj):
    if os.environ.get("KILN_DEBUG"):
        text = obj if isinstance(obj, str) else json.dumps(obj, indent=1, default=str)
        print(f"== {stage} ==\n{text[:20000]}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _bytes_by_quant(weights: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in weights.values():
        out[w["quant"]] = out.get(w["quant"], 0) + sum(p["bytes"] for p in w["parts"])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def compile_model(gguf_path, out_dir, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, shard_bytes: int = SHARD_BYTES,
                  progress=None, requant: str | None = None, finish=None, replace: bool = True) -> Path:
    """progress: optional callable(done_parts, total_parts) for the shard-writing stage.
    shard_bytes: max bytes per shard file (and per tensor part).
    requant: re-quantize every F32/F16/Q8_0 matrix into this scheme ("q8_0", "q4g32", ...; see compiler/quant.py).
    finish: optional callable(staged_dir) run on the complete artifact before it is moved into place (the self-test).
    replace: replace an existing kiln artifact at out_dir (False: keep whichever finished first; the cache)."""
    check_prefill_chunk(prefill_chunk)
    check_target(out_dir)                                          # refuse a user's directory before any work
    return write_artifact(out_dir, lambda tmp: _compile_into(Path(gguf_path), tmp, prefill_chunk=prefill_chunk,
                                                             shard_bytes=shard_bytes, progress=progress,
                                                             requant=requant),
                          finish=finish, replace=replace)


MAX_PREFILL_CHUNK = 4096


def check_prefill_chunk(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not PREFILL_TILE <= n <= MAX_PREFILL_CHUNK \
            or n % PREFILL_TILE:
        raise KilnError(f"--prefill-chunk must be a multiple of {PREFILL_TILE} between {PREFILL_TILE} and "
                        f"{MAX_PREFILL_CHUNK} (got {n})")
    return n


def _compile_into(gguf_path: Path, tmp: Path, *, prefill_chunk, shard_bytes, progress, requant):
    """Every stage, writing the artifact's files into the (empty, staged) directory tmp."""
    model = GGUFModel(gguf_path)                                   # 1. read
    cfg = config_stage.read_config(model)                          # 2. config
    _debug("config", cfg.as_dict())
    packer = WeightPacker(model, cfg, shard_bytes, requant)        # 3. weights -> parts
    programs = build_programs(cfg, packer)                         # 4. schedule
    score_tokens = score_chunk(cfg.vocab, prefill_chunk)
    tok_json = build_tokenizer_json(model.reader)
    tok_info = tokenizer_info(model.reader)

    (tmp / "shaders").mkdir()

    kernels = {}                                                   # 5. render WGSL
    for prog in programs.values():
        for s in prog.steps:
            kernels.setdefault(s["kernel"].name, s["kernel"])
    for name, k in kernels.items():
        (tmp / "shaders" / f"{name}.wgsl").write_text(render(k))

    writer = ShardWriter(tmp, shard_bytes)                         # 6. shards
    total = sum(len(r.parts) for r in packer.refs.values())
    weights, done = {}, 0
    for name, ref in packer.refs.items():
        parts = []
        for i, words in packer.packed_parts(name):
            row0, rows = ref.parts[i]
            parts.append({"row0": row0, "rows": rows, **writer.add(words)})
            done += 1
            if progress:
                progress(done, total)
        weights[name] = {"quant": ref.quant, "shape": [ref.rows, ref.k], "parts": parts}
    shards = writer.finish()

    (tmp / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False))
    storage_per_stage = max(len(k.bindings()) for k in kernels.values())
    manifest = {                                                   # 7. manifest
        "model": {"name": cfg.name, "arch": cfg.arch,
                  "source": {"file": gguf_path.name, "bytes": model.file_bytes, "sha256": file_sha256(gguf_path)},
                  "requant": requant},
        "compiler_version": COMPILER_VERSION,
        "config": cfg.as_dict(),
        "tokenizer": {"file": "tokenizer.json", **{k: v for k, v in tok_info.items() if k != "chat_template"}},
        "chat_template": tok_info.get("chat_template"),
        "limits": {"prefill_chunk": prefill_chunk, "score_chunk": score_tokens,
                   "storage_buffers_per_stage": storage_per_stage,
                   "max_part_bytes": max(p["bytes"] for w in weights.values() for p in w["parts"])},
        "buffers": activation_buffers(cfg, score_tokens),
        "weights": weights,
        "weight_bytes_by_quant": _bytes_by_quant(weights),
        "shards": shards,
        "kernels": {n: kernel_entry(k) for n, k in kernels.items()},
        "programs": {n: program_json(p) for n, p in programs.items()},
    }
    _debug("manifest (programs elided)", {k: v for k, v in manifest.items() if k != "programs"})
    write_manifest(tmp, manifest)
