"""Stage 7 — the manifest: everything a runtime needs to run the model, as versioned JSON.

manifest.json (format "kiln", version MANIFEST_VERSION):
  model       {name, arch, source: {file, bytes, sha256}, requant: null | scheme (`kiln compile --quant`)}
  compiler_version  str: artifacts from another compiler version are rebuilt (runtime_py/artifacts.py)
  config      ModelConfig fields (compiler/config.py)
  tokenizer   {file: "tokenizer.json", bos_id, eos_id, add_bos, eog_ids}; chat_template: str | null
  limits      {prefill_chunk: T, score_chunk: tokens per `score` pass, storage_buffers_per_stage, max_part_bytes}
  features    [WebGPU feature names] the kernels need (union of Kernel.features; [] = core WebGPU only)
  buffers     {name: {shape: [int | "T" | "ctx", ...], dtype: "f32" | "u32", programs: [program names]}}
              activations and KV cache; `programs` = the programs that bind it: a runtime allocates a buffer when
              it first runs one of them (`logits_all` is ["score"]: only sessions that score pay for it)
  weights     {name: {quant, shape: [rows, K], parts: [{row0, rows, shard, offset, bytes}]}}
  weight_bytes_by_quant {quant: packed bytes}                                         summary of `weights`
  shards      [{file, bytes, sha256}]                                                  see compiler/shards.py
  kernels     {name: {file: "shaders/<name>.wgsl", params: [[name, "u32"|"f32"]], bindings: [[name, access]]}}
  programs    {prefill, decode, score: [step]}                         steps as compiler/ir.py `Step.json`
  selftest    optional {prompt_ids, top5: [[id, logit]], tolerance}: written by `kiln compile` after a native run
"""
from __future__ import annotations

import json
from pathlib import Path

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"


def kernel_entry(kernel) -> dict:
    return {"file": f"shaders/{kernel.name}.wgsl", "params": [list(p) for p in kernel.params],
            "bindings": [list(b) for b in kernel.bindings()]}


def program_json(program) -> list[dict]:
    return program.json()


def kernel_features(kernels) -> list[str]:
    """The optional WebGPU features any kernel needs, sorted (what web/device.js and runtime_py/device.py request)."""
    return sorted({f for k in kernels for f in k.features})


def bytes_by_quant(weights: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for w in weights.values():
        out[w["quant"]] = out.get(w["quant"], 0) + sum(p["bytes"] for p in w["parts"])
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = Path(out_dir) / MANIFEST_FILE
    path.write_text(json.dumps({"format": "kiln", "version": MANIFEST_VERSION, **manifest}, indent=1))
    return path


def read_manifest(art_dir: Path) -> dict:
    from .errors import ArtifactError
    path = Path(art_dir) / MANIFEST_FILE
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{art_dir}: no {MANIFEST_FILE} (not a compiled kiln artifact)") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e})") from None
    if m.get("format") != "kiln" or m.get("version") != MANIFEST_VERSION:
        raise ArtifactError(f"{path}: manifest format {m.get('format')!r} v{m.get('version')} "
                            f"(this kiln reads kiln v{MANIFEST_VERSION}; recompile the model)")
    return m
