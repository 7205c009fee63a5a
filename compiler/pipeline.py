"""The compiler, top to bottom: `STAGES`, run in order by `compile_model`.

    compile_model("model.gguf", "out/")   writes out/{manifest.json, tokenizer.json, shaders/*.wgsl, shard-*.bin}

    1 read      gguf_file.py   GGUFModel: the memory-mapped file, every tensor checked to lie inside it
    2 config    config.py      ModelConfig from the metadata; refuse.py: what kiln does not implement, by name;
                               tokenizer.py: tokenizer.json + token ids
    3 plan      plan.py        WeightPlan: every tensor's scheme, shape and row parts, sized by formula (nothing packed)
    4 schedule  schedule.py    the programs (prefill, decode, score): kernel steps binding planned parts + activations
    5 render    render.py      one .wgsl per distinct kernel of the programs (kernels.py dataclass -> shaders/*.j2)
    6 shards    shards.py      every part the programs bind, packed once (pack.py, quant/) and appended to a shard
    7 manifest  manifest.py    manifest.json: config, tokenizer, buffers, weights -> parts, shards, kernels, programs

Each stage reads what earlier stages left on the `Compilation` and adds its own result; the types they share are in
ir.py. KILN_DEBUG=1 prints every stage's output as it finishes (programs step by step, every rendered shader).
The artifact is built in a staging directory of its own beside the target and renamed into place at the end
(compiler/output.py), so an interrupted compile never leaves a half-written artifact that looks whole, and never
touches a directory kiln did not make.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import config as config_stage
from .errors import KilnError
from .gguf_file import GGUFModel
from .ir import SHARD_BYTES, Program
from .kernels import Kernel
from .manifest import (bytes_by_quant, file_sha256, kernel_entry, kernel_features, program_dispatches, program_json,
                       write_manifest)
from .output import check_target, write_artifact
from .plan import WeightPlan, plan_weights
from .render import render as render_kernel
from .schedule import PREFILL_TILE, activation_buffers, buffer_programs, build_programs, score_chunk
from .schedule_i8 import program_variants, xq_buffer
from .kernels_rows import KV_PAGE
from .schedule_rows import add_rows_buffers, build_rows_programs, rows_limit
from .shards import write_shards
from .tokenizer import build_tokenizer_json, tokenizer_info

COMPILER_VERSION = "12"   # 2: the `score` program; 3: manifest v2 (manifest_sha256, shader + tokenizer sha256),
                         #    `features`, buffers[].programs, matmul_tt without last_only
                         # 4: "texture" weight bindings, x-window bind refs "buf+OFF", "T>n" / "T<=n"
                         #    dispatches (the CPU-adapter kernels)
                         # 5: fused decode (norm / reduce prologues, RoPE + QK-norm + KV write in attention), Q/K/V
                         #    concatenated by the plan, `dispatches` per program
                         # 6: the `rows` + `rows_head` programs (batched rows over a KV pool), limits.rows
                         # 7: the int8-activation variants (<program>@cpu_i8, program_variants, xq)
                         # 8: paged KV in the rows program (page_table, limits.kv_page)
                         # 9: the @cpu programs' attention_cpu (q bound as a uniform; decode: RoPE / QK-norm / KV
                         #    write as steps before it)
                         # 10: weight textures with the quants of 8 rows interleaved (runtime_py/weight_texture.py),
                         #    matvec_cpu with 4 rows per invocation (32 lanes)
                         # 11: attention_cpu's kv_tex field (K/V from textures; not scheduled yet: a header line)
                         # 12: the @cpu programs' K/V in rgba32float textures (buffers k_tex.L / v_tex.L, `texture`;
                         #     bindings "kv_texture" / "write_texture")
DEFAULT_PREFILL_CHUNK = 128


@dataclass
class Compilation:
    """What the stages hand each other: the inputs, then each stage's result in stage order."""
    gguf_path: Path
    out: Path | None                   # the (temporary) artifact directory the writing stages fill
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    shard_bytes: int = SHARD_BYTES
    requant: str | None = None
    progress: Callable | None = None
    model: GGUFModel | None = None            # 1 read
    cfg: config_stage.ModelConfig | None = None   # 2 config
    tokenizer: dict | None = None             #   (tokenizer.json) and tokenizer_info
    tokenizer_info: dict | None = None
    plan: WeightPlan | None = None            # 3 plan
    programs: dict[str, Program] | None = None   # 4 schedule
    buffers: dict | None = None
    score_tokens: int = 0
    kernels: dict[str, Kernel] | None = None  # 5 render
    weights: dict | None = None               # 6 shards
    shards: list | None = None
    manifest: dict | None = None              # 7 manifest


# -- the stages: each returns what KILN_DEBUG=1 prints --------------------------------------------------------------
def read(c: Compilation):
    c.model = GGUFModel(c.gguf_path)
    return {"file": str(c.gguf_path), "bytes": c.model.file_bytes, "tensors": len(c.model.tensors)}


def config(c: Compilation):
    c.cfg = config_stage.read_config(c.model)
    c.tokenizer = build_tokenizer_json(c.model.reader)     # before the slow stages: an unsupported tokenizer fails fast
    c.tokenizer_info = tokenizer_info(c.model.reader)
    return {"config": c.cfg.as_dict(), "tokenizer": {k: v for k, v in c.tokenizer_info.items() if k != "chat_template"}}


def plan(c: Compilation):
    c.plan = plan_weights(c.model, c.cfg, c.shard_bytes, c.requant)
    return {n: f"{r.quant} ({r.rows}, {r.k}) parts {list(r.parts)}" for n, r in c.plan.refs.items()}


def schedule(c: Compilation):
    assert c.prefill_chunk % PREFILL_TILE == 0
    c.programs = build_programs(c.cfg, c.plan, c.prefill_chunk)
    c.programs.update(build_rows_programs(c.cfg, c.plan, c.prefill_chunk))   # batched rows (schedule_rows.py)
    c.score_tokens = score_chunk(c.cfg.vocab, c.prefill_chunk)
    bound = buffer_programs(c.programs)
    kv_tex = "k_tex.0" in bound   # the @cpu programs keep K/V in textures (schedule_cpu_attention.py cpu_kv_textures)
    c.buffers = add_rows_buffers(activation_buffers(c.cfg, c.score_tokens, kv_tex) | xq_buffer(c.programs),  # xq: int8's
                                 c.cfg, c.programs, rows_limit(c.cfg.vocab, c.prefill_chunk))
    assert {n: b["programs"] for n, b in c.buffers.items()} == bound, "activation_buffers' programs != the programs'"
    steps = [f"{p}[{i}] {json.dumps(s)}" for p, prog in c.programs.items() for i, s in enumerate(program_json(prog))]
    return "\n".join(steps) + "\nbuffers " + json.dumps(c.buffers)


def render(c: Compilation):
    c.kernels = {}
    for prog in c.programs.values():
        for s in prog.steps:
            c.kernels.setdefault(s.kernel.name, s.kernel)
    (c.out / "shaders").mkdir(parents=True)
    for name, k in c.kernels.items():
        (c.out / "shaders" / f"{name}.wgsl").write_text(render_kernel(k))   # prints each shader under KILN_DEBUG
    return list(c.kernels)


def shards(c: Compilation):
    c.weights, c.shards = write_shards(c.model, c.plan, c.programs, c.out, c.shard_bytes, c.progress)
    return {"weights": c.weights, "shards": c.shards}


def manifest(c: Compilation):
    (c.out / "tokenizer.json").write_text(json.dumps(c.tokenizer, ensure_ascii=False))
    cfg, kernels = c.cfg, c.kernels.values()
    c.manifest = {
        "model": {"name": cfg.name, "arch": cfg.arch,
                  "source": {"file": c.gguf_path.name, "bytes": c.model.file_bytes,
                             "sha256": file_sha256(c.gguf_path)},
                  "requant": c.requant},
        "compiler_version": COMPILER_VERSION,
        "config": cfg.as_dict(),
        "tokenizer": {"file": "tokenizer.json", **{k: v for k, v in c.tokenizer_info.items() if k != "chat_template"}},
        "chat_template": c.tokenizer_info.get("chat_template"),
        "limits": {"prefill_chunk": c.prefill_chunk, "score_chunk": c.score_tokens,
                   "rows": rows_limit(c.cfg.vocab, c.prefill_chunk), "kv_page": KV_PAGE,
                   "storage_buffers_per_stage": max(len(k.bindings()) for k in kernels),
                   "max_part_bytes": max(p["bytes"] for w in c.weights.values() for p in w["parts"])},
        "features": kernel_features(kernels),
        "buffers": c.buffers,
        "weights": c.weights,
        "weight_bytes_by_quant": bytes_by_quant(c.weights),
        "shards": c.shards,
        "kernels": {n: kernel_entry(k) for n, k in c.kernels.items()},
        "programs": {n: program_json(p) for n, p in c.programs.items()},
        "program_variants": program_variants(c.programs),
        "dispatches": program_dispatches(c.programs),
    }
    write_manifest(c.out, c.manifest)
    return {k: v for k, v in c.manifest.items() if k not in ("programs", "weights", "buffers")}


STAGES: list[tuple[str, Callable[[Compilation], object]]] = [
    ("read", read),
    ("config", config),
    ("plan", plan),
    ("schedule", schedule),
    ("render", render),
    ("shards", shards),
    ("manifest", manifest),
]


def run_stages(c: Compilation, until: str | None = None) -> Compilation:
    """Runs STAGES in order (up to and including `until`), printing each one's output under KILN_DEBUG=1."""
    for name, stage in STAGES:
        out = stage(c)
        if os.environ.get("KILN_DEBUG"):
            print(f"== {name} ==\n{out if isinstance(out, str) else json.dumps(out, indent=1, default=str)}")
        if name == until:
            break
    return c


def compile_model(gguf_path, out_dir, *, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, shard_bytes: int = SHARD_BYTES,
                  progress=None, requant: str | None = None, finish=None, replace: bool = True) -> Path:
    """progress: optional callable(done_parts, total_parts) for the shard-writing stage.
    shard_bytes: max bytes per shard file (and per tensor part).
    requant: re-quantize every F32/F16/Q8_0 matrix into this scheme ("q8_0", "q4g32", ...; see compiler/quant/).
    finish: optional callable(staged_dir) run on the complete artifact before it is moved into place (the self-test).
    replace: replace an existing kiln artifact at out_dir (False: keep whichever finished first; the cache)."""
    check_prefill_chunk(prefill_chunk)
    check_target(out_dir)                                          # refuse a user's directory before any work
    return write_artifact(Path(out_dir), lambda tmp: run_stages(
        Compilation(Path(gguf_path), tmp, prefill_chunk, shard_bytes, requant, progress)),
        finish=finish, replace=replace)


MAX_PREFILL_CHUNK = 4096


def check_prefill_chunk(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not PREFILL_TILE <= n <= MAX_PREFILL_CHUNK \
            or n % PREFILL_TILE:
        raise KilnError(f"--prefill-chunk must be a multiple of {PREFILL_TILE} between {PREFILL_TILE} and "
                        f"{MAX_PREFILL_CHUNK} (got {n})")
    return n
